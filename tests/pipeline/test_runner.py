"""The runner on real stages: caching, selective reruns, --only/--input (interrupted runs: test_faults.py)."""

from __future__ import annotations

import pytest

from pipeline.runner import RunError, plan, run_pipeline
from tests.helpers import QUICK_TRAIN, make_spec, quick_sft

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

    # One value of sft_a changed: sft_a and its downstream sft_b are to rerun, sft_c is not. (What a run
    # executes is this plan's uncached nodes; the rerun itself is not repeated here: two more Ray fits.)
    stages["sft_a"]["train"]["lr"] = 1.0e-3
    changed = plan(make_spec(tmp_path, tiny_base, stages))
    assert changed.cached["sft_c"].path == first["sft_c"].path
    assert changed.cached["sft_a"] is None and changed.cached["sft_b"] is None
    assert changed.fingerprints["sft_a"] != first["sft_a"].fingerprint
    assert changed.fingerprints["sft_b"] != first["sft_b"].fingerprint
    assert changed.why_stale["sft_b"] and set(changed.why_stale) == {"sft_a", "sft_b"}, changed.why_stale

    # --only takes upstream results from the store; a stage without one is named in the error.
    stages["sft_a"]["train"]["lr"] = QUICK_TRAIN["lr"]  # back to the stored configuration
    only_b = run_pipeline(make_spec(tmp_path, tiny_base, stages), only=["sft_b"])
    assert only_b["sft_b"].fingerprint == first["sft_b"].fingerprint
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
