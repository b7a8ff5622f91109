"""The runner on real stages: caching, selective reruns, --only/--input, and interrupted stages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from pipeline.runner import RunError, plan, run_pipeline
from pipeline.store import ArtifactStore
from tests.helpers import kill_at_first_checkpoint, make_spec, quick_sft

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


def test_killed_stage_leaves_nothing_complete_and_resumes(ray_cluster, tiny_base, tmp_path):
    stage = quick_sft(train={"max_steps": 160, "save_steps": 20, "logging_steps": 20, "batch_size": 4})
    raw = {"name": "t", "storage": str(tmp_path), "base": {"model": str(tiny_base)}, "stages": {"sft": stage},
           "ray": {"address": ray_cluster.get_runtime_context().gcs_address}}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))

    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage_dir = tmp_path / "t" / "sft"
    kill_at_first_checkpoint(run, stage_dir, ".partial-*/checkpoints/checkpoint-*/trainer_state.json", timeout=240,
                             settle=1)

    store = ArtifactStore(tmp_path / "t")
    assert store.latest("sft") is None
    for manifest in stage_dir.glob("*/manifest.json"):
        assert json.loads(manifest.read_text())["status"] != "complete"

    spec = make_spec(tmp_path, tiny_base, {"sft": stage})
    artifact = run_pipeline(spec)["sft"]
    assert artifact.manifest["resumed_from"], "the rerun started over instead of resuming"
    resumed_step = artifact.manifest["resumed_step"]
    assert resumed_step >= 20
    steps = [p["step"] for p in artifact.manifest["curves"]["loss"]]
    assert steps[-1] == 160 and min(steps) <= resumed_step  # history carried over from the checkpoint
