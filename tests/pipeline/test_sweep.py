"""Sweeps as nodes of the DAG: the space, the metric and the scheduler are checked when the file loads;
a real 4-trial Ray Tune sweep of a LoRA SFT over rank x schedule in which ASHA stops the bad trials; the
best trial's model is the stage's output, which a downstream stage trains from; a rerun launches no trial."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from pipeline.runner import plan, run_pipeline
from pipeline.spec import SpecError, apply_override, load_spec, parse_spec
from pipeline.sweep import describe_trials, resolve_sweep, set_flags, trial_spec
from tests.helpers import make_spec, quick_sft

REPO = Path(__file__).resolve().parents[2]


def _raw(storage, sweep: dict, **sft) -> dict:
    return {"name": "sw", "storage": str(storage), "base": {"model": "builtin:tiny-llama"},
            "stages": {"sft": quick_sft(sweep=sweep, **sft)}}


@pytest.mark.parametrize("sweep, message", [
    ({"search_space": {}}, "stages.sft.sweep.search_space: empty"),
    ({"search_space": {"train.lerning_rate": [1e-3]}}, "stages.sft.sweep.search_space.train.lerning_rate: "
                                                       "'lerning_rate' is not a sweepable key of train"),
    ({"search_space": {"train": [1]}}, "'train' is a section; sweep one of its keys"),
    ({"search_space": {"train.lr_schedule": {"choice": ["cosine", "cosin"]}}},
     "stages.sft.sweep.search_space.train.lr_schedule: value 'cosin' is not valid"),
    ({"search_space": {"peft.r": [4]}, "metric": "heldout_acc"}, "stages.sft.sweep.metric: sft stages do not report"),
    ({"search_space": {"peft.r": [4]}, "metric": "global_step"}, "asha stops trials on a metric logged during"),
    ({"search_space": {"peft.r": [4]}, "metric": "best_eval_loss"}, "needs held-out data"),
    ({"search_space": {"train.lr": {"grid": [1e-3], "loguniform": [1e-4, 1e-2]}}}, "exactly one of"),
    ({"search_space": {"train.lr": {"loguniform": [0, 1e-2]}}}, "loguniform: low must be > 0"),
])
def test_a_bad_sweep_fails_when_the_file_loads(tmp_path, sweep, message):
    with pytest.raises(SpecError) as err:
        parse_spec(_raw(tmp_path, sweep))
    assert message in str(err.value)


def test_the_old_top_level_section_says_where_it_went(tmp_path):
    raw = {"name": "sw", "sweep": {"stage": "sft", "search_space": {"peft.r": [4]}},
           "stages": {"sft": {"data": "builtin:addition"}}}
    with pytest.raises(SpecError, match=r"sweep: a sweep is a section of the stage it sweeps: move it to "
                                        r"stages\.sft\.sweep"):
        parse_spec(raw)


def test_values_are_read_as_the_stage_reads_them_and_the_sweep_is_in_the_fingerprint(tmp_path):
    # YAML reads 1e-3 as a string: the trial gets the float the config reads.
    spec = parse_spec(_raw(tmp_path, {"search_space": {"train.lr": ["1e-3", 3.0e-3], "peft.r": [4, 8]}}))
    stage, space = resolve_sweep(spec)
    assert stage == "sft" and space["train.lr"].grid == [1e-3, 3e-3] and space["peft.r"].grid == [4, 8]
    seeded = parse_spec(_raw(tmp_path, {"search_space": {"train.lr": ["1e-3", 3.0e-3], "peft.r": [4, 8]}, "seed": 1}))
    assert plan(seeded).fingerprints["sft"] != plan(spec).fingerprints["sft"]
    lines = describe_trials(spec, "sft", {"from": plan(spec).fingerprints["base"]})
    assert lines[0].startswith("sweep: 4 trials (grid, seed 0) of train.lr, peft.r -> min final_loss")
    assert len(lines) == 5 and all("to run" in line for line in lines[1:])


def test_a_trial_has_the_fingerprint_its_set_flags_give(tmp_path):
    """A trial is the stage without the sweep plus its overrides: a pipeline file with those values
    (the --set flags) has the same fingerprint, and so finds the trial in the store."""
    raw = _raw(tmp_path, {"search_space": {"peft.r": [4]}})
    spec = parse_spec(raw)
    overrides = {"train.lr": 1e-05, "peft.r": 8, "train.lr_schedule": "linear", "data.limit": 64}
    trial = trial_spec(spec, "sft", overrides)
    flags = set_flags("sft", overrides)
    assert flags[0] == "stages.sft.train.lr=1.0e-05"  # YAML 1.1 reads "1e-05" as a string
    edited = copy.deepcopy(raw)
    del edited["stages"]["sft"]["sweep"]
    for flag in flags:
        apply_override(edited, flag)
    assert plan(parse_spec(edited)).fingerprints["sft"] == plan(trial).fingerprints["sft"]
    assert trial.stages["sft"].sweep is None


def test_shipped_sweeps_are_valid(tmp_path):
    # The GPU config ships its sweep commented out (a default run would train four 8B models).
    text = (REPO / "configs" / "gpu-8b-qlora.yaml").read_text()
    block = text[text.index("    # sweep:"):].split("\n\n")[0]
    (tmp_path / "gpu.yaml").write_text(text.replace(block, block.replace("    # ", "    ")))
    stage, space = resolve_sweep(load_spec(tmp_path / "gpu.yaml"))
    assert stage == "sft" and set(space) == {"peft.r", "train.lr"}
    stage, space = resolve_sweep(load_spec(REPO / "configs" / "sweep.yaml"))
    assert stage == "sft_swept" and {k: d.grid for k, d in space.items()} == {
        "peft.r": [4, 8, 16], "train.lr_schedule": ["cosine", "constant"]}


# 4 trials, one at a time: LoRA rank 4 or 16 x lr_schedule constant or cosine. The stage warms up over
# 90% of its 24 steps; HF's constant schedule has no warmup, cosine follows it, so the cosine trials train
# at a fraction of the lr for most of the run and are clearly bad (their loss stays near where it starts).
# Tune runs the grid with the first key fastest: both constant trials first. ASHA (grace 2 reports,
# halving) stops a trial at a rung where it is worse than the better half of the trials that reached it.
# (Two at a time saved nothing on 2 cores, 146 s against 153 s, and let ASHA stop a constant trial at
# its last report, so it counted as stopped after running every step.)
SWEEP = {"search_space": {"peft.r": [4, 16], "train.lr_schedule": ["constant", "cosine"]}, "metric": "final_loss",
         "mode": "min", "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2}}
SWEEP_TRAIN = {"max_steps": 24, "logging_steps": 3, "lr": 3.0e-3, "warmup_ratio": 0.9,
               "save_steps": 12}  # checkpoint reports too
MARGIN = 0.3  # the best trial's final loss under every cosine trial's last value (measured: see the printout)


@pytest.mark.slow
def test_sweep_node_stops_bad_trials_and_promotes_the_best(ray_cluster, tiny_base, tmp_path):
    stages = {"sft": quick_sft(train=SWEEP_TRAIN, sweep=SWEEP),
              # downstream: trains from the sweep's output
              "sft2": quick_sft(**{"from": "sft"}, train={"max_steps": 2})}
    spec = make_spec(tmp_path / "store", tiny_base, stages, name="sw")
    artifacts = run_pipeline(spec)
    sweep_artifact = artifacts["sft"]
    results = sweep_artifact.manifest["sweep"]
    trials = results["trials"]
    print("\nsweep trials:", [(t["overrides"], t["status"], t.get("value")) for t in trials])
    assert len(trials) == 4 and len({t["fingerprint"] for t in trials}) == 4
    bad = [t for t in trials if t["overrides"]["train.lr_schedule"] == "cosine"]
    good = [t for t in trials if t["overrides"]["train.lr_schedule"] == "constant"]
    assert results["stopped_early"] >= 1 and any(t["status"] == "stopped" for t in bad), trials
    for trial in trials:
        assert trial["status"] in ("ok", "stopped"), trial
        assert len(trial["curve"]) >= 2, trial  # reported at every logging step, not once at the end
        if trial["status"] == "stopped":  # stopped before its last step, and never committed
            assert trial["curve"][-1]["step"] < SWEEP_TRAIN["max_steps"], trial
            assert not (spec.run_root() / "sft" / trial["fingerprint"] / "manifest.json").exists()
    best = results["best"]
    assert best["overrides"]["train.lr_schedule"] == "constant"
    assert best["value"] == min(t["value"] for t in good if "value" in t)
    assert best["value"] < min(t["value"] for t in bad) - MARGIN, trials

    # The best trial's model is the sweep's output (the same files, linked), and sft2 trains from it.
    best_dir = Path(best["artifact"])
    for weights in (best_dir / "model").glob("*.safetensors"):
        assert os.path.samefile(weights, sweep_artifact.model_dir / weights.name)
    assert sweep_artifact.manifest["metrics"]["final_loss"] == best["value"]
    downstream = artifacts["sft2"].manifest
    assert downstream["inputs"] == {"sft": sweep_artifact.fingerprint}
    assert downstream["fingerprint_parts"]["upstream"] == {"from": sweep_artifact.fingerprint}
    assert (sweep_artifact.path / "sweep.png").stat().st_size > 5000

    # A rerun is one cache hit: no trial is launched.
    again = run_pipeline(spec)
    assert again["sft"].manifest["started"] == sweep_artifact.manifest["started"]
    assert again["sft2"].fingerprint == artifacts["sft2"].fingerprint
    # The best trial alone, as a plain stage with its --set flags, is the trial's artifact.
    raw = {"name": "sw", "storage": str(tmp_path / "store"), "base": {"model": str(tiny_base)},
           "stages": {"sft": quick_sft(train=SWEEP_TRAIN)}}
    for flag in best["set"]:
        apply_override(raw, flag)
    assert str(plan(parse_spec(raw)).cached["sft"].path) == best["artifact"]
    assert json.loads((best_dir / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_redoing_finished_trials(ray_cluster, tiny_base, tmp_path):
    """The driver of a 2-trial sweep is killed once the first trial is in the store; the rerun restores
    the Tune experiment (Tuner.restore) and finishes without training that trial again."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    sweep = {"search_space": {"peft.r": [4, 8]}, "scheduler": {"name": "none"}}
    raw = {"name": "sw", "storage": str(tmp_path / "store"), "base": {"model": str(tiny_base)},
           "ray": {"address": ray_cluster.get_runtime_context().gcs_address},
           "stages": {"sft": quick_sft(train={"max_steps": 6, "logging_steps": 3}, sweep=sweep)}}
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    stage_dir = tmp_path / "store" / "sw" / "sft"
    run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    finished: list[Path] = []
    while not finished and time.monotonic() < deadline and run.poll() is None:
        finished = [m.parent for m in stage_dir.glob("*/manifest.json") if not m.parent.name.startswith(".")]
        time.sleep(0.5)
    assert finished, "no trial finished before the deadline (or the run ended early)"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    first = json.loads((finished[0] / "manifest.json").read_text())
    assert first["status"] == "complete"
    assert list(stage_dir.glob(".sweep-*/tune/experiment_state*.json")), "no Tune state to restore"

    spec = load_spec(config)
    artifacts = run_pipeline(spec)
    results = artifacts["sft"].manifest["sweep"]
    assert [t["status"] for t in results["trials"]] == ["ok"] * 2
    again = json.loads((finished[0] / "manifest.json").read_text())
    assert again["started"] == first["started"]  # the finished trial was not trained again
    kept = [t for t in results["trials"] if t["fingerprint"] == finished[0].name]
    assert len(kept) == 1 and kept[0]["artifact"] == str(finished[0])
