"""The runner on real stages: caching, selective reruns, --only/--input (interrupted runs: test_faults.py)."""

from __future__ import annotations

import pytest

from pipeline.runner import RunError, plan, run_pipeline
from tests.helpers import make_spec, quick_sft

pytestmark = pytest.mark.slow


def started(artifacts) -> dict[str, str]:
    return {node: a.manifest.get("started") for node, a in artifacts.items() if node != "base"}


def test_cache_skips_unchanged_and_reruns_only_downstream(ray_cluster, tiny_base, tmp_path):
    stages = {"sft_a": quick_sft(), "sft_b": quick_sft(**{"from": "sft_a"}), "sft_c": quick_sft()}
    first = run_pipeline(make_spec(tmp_path, tiny_base, stages))
    assert first["sft_b"].manifest["inputs"] == {"sft_a": first["sft_a"].fingerprint}

    # Nothing changed: every stage comes from the store.
    again = run_pipeline(make_spec(tmp_path, tiny_base, stages))
    assert started(again) == started(first)
    assert all(status is not None for status in plan(make_spec(tmp_path, tiny_base, stages)).cached.values())

    # One value of sft_a changed: sft_a and its downstream sft_b rerun, sft_c does not.
    stages["sft_a"]["train"]["lr"] = 1.0e-3
    changed = run_pipeline(make_spec(tmp_path, tiny_base, stages))
    assert changed["sft_c"].manifest["started"] == first["sft_c"].manifest["started"]
    assert changed["sft_a"].fingerprint != first["sft_a"].fingerprint
    assert changed["sft_b"].fingerprint != first["sft_b"].fingerprint
    assert changed["sft_b"].manifest["inputs"] == {"sft_a": changed["sft_a"].fingerprint}

    # --only takes upstream results from the store; a stage without one is named in the error.
    only_b = run_pipeline(make_spec(tmp_path, tiny_base, stages), only=["sft_b"])
    assert only_b["sft_b"].fingerprint == changed["sft_b"].fingerprint
    with pytest.raises(RunError, match="'sft_a' is needed upstream"):
        run_pipeline(make_spec(tmp_path / "empty", tiny_base, stages), only=["sft_b"])


def test_input_uses_an_existing_hf_folder(ray_cluster, tiny_base, tmp_path):
    stages = {"sft_a": quick_sft(), "sft_b": quick_sft(**{"from": "sft_a"})}
    artifacts = run_pipeline(make_spec(tmp_path, tiny_base, stages), only=["sft_b"], inputs={"sft_a": str(tiny_base)})
    assert artifacts["sft_a"].path == tiny_base
    assert artifacts["sft_b"].manifest["status"] == "complete"
    assert not (tmp_path / "t" / "sft_a").exists(), "--input must not run the stage"
    # The raw output of every Ray process stays reachable from the run folder (quiet or verbose).
    ray_logs = tmp_path / "t" / "logs" / "ray"
    assert ray_logs.is_symlink() and any(ray_logs.glob("worker-*.out")), ray_logs
