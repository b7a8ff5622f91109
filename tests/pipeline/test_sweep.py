"""Sweeps: the search space is checked before anything trains; a real 2-trial Ray Tune sweep of SFT."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipeline.runner import plan
from pipeline.spec import SpecError, apply_override, load_spec, parse_spec
from pipeline.sweep import resolve_sweep, run_sweep, set_flags, sweep_dir, trial_spec
from tests.helpers import make_spec, quick_sft

REPO = Path(__file__).resolve().parents[2]


def _raw(storage, base, sweep: dict, **sft) -> dict:
    return {"name": "sw", "storage": str(storage), "base": {"model": str(base)},
            "stages": {"sft": quick_sft(**sft)}, "sweep": sweep}


def test_search_space_is_checked_before_training(tmp_path):
    def resolve(sweep, **sft):
        return resolve_sweep(parse_spec(_raw(tmp_path, "builtin:tiny-llama", sweep, **sft)))

    # A list is a grid; YAML reads 1e-3 as a string, the sweep hands Tune the float the config reads.
    stage, space = resolve({"stage": "sft", "search_space": {"train.lr": ["1e-3", 3.0e-3], "peft.r": [4, 8]}})
    assert stage == "sft" and space["train.lr"].grid == [1e-3, 3e-3] and space["peft.r"].grid == [4, 8]
    # No search space: a grid around the stage's lr.
    _, space = resolve({"stage": "sft"})
    assert space["train.lr"].grid == pytest.approx([1e-3, 3e-3, 9e-3])

    with pytest.raises(SpecError, match=r"sweep.search_space.train.lerning_rate: 'lerning_rate' is not a sweepable"):
        resolve({"stage": "sft", "search_space": {"train.lerning_rate": [1e-3]}})
    with pytest.raises(SpecError, match=r"'train' is a section"):
        resolve({"stage": "sft", "search_space": {"train": [1]}})
    with pytest.raises(SpecError, match=r"sweep.search_space.train.lr_schedule: value 'cosin' is not valid"):
        resolve({"stage": "sft", "search_space": {"train.lr_schedule": {"choice": ["cosine", "cosin"]}}})
    with pytest.raises(SpecError, match="needs eval data"):
        resolve({"stage": "sft", "metric": "best_eval_loss"})
    with pytest.raises(SpecError, match="no stage to sweep"):
        resolve({})
    with pytest.raises(SpecError, match="not a stage of this pipeline"):
        resolve({"stage": "dpo"})
    with pytest.raises(SpecError, match="exactly one of"):
        resolve({"stage": "sft", "search_space": {"train.lr": {"grid": [1e-3], "loguniform": [1e-4, 1e-2]}}})
    with pytest.raises(SpecError, match="loguniform: low must be > 0"):
        resolve({"stage": "sft", "search_space": {"train.lr": {"loguniform": [0, 1e-2]}}})


def test_a_trial_has_the_fingerprint_its_set_flags_give(tmp_path):
    """The best trial's --set flags make `rayalign run` compute the trial's fingerprint (and so reuse it)."""
    raw = _raw(tmp_path, "builtin:tiny-llama", {"stage": "sft"})
    spec = parse_spec(raw)
    overrides = {"train.lr": 1e-05, "peft.r": 8, "train.lr_schedule": "linear", "data.limit": 64}
    trial = trial_spec(spec, "sft", overrides)
    flags = set_flags("sft", overrides)
    assert flags[0] == "stages.sft.train.lr=1.0e-05"  # YAML 1.1 reads "1e-05" as a string
    edited = copy.deepcopy(raw)
    for flag in flags:
        apply_override(edited, flag)
    assert plan(parse_spec(edited)).fingerprints["sft"] == plan(trial).fingerprints["sft"]
    assert plan(spec).fingerprints["sft"] != plan(trial).fingerprints["sft"]


def test_shipped_gpu_config_sweep_is_valid():
    stage, space = resolve_sweep(load_spec(REPO / "configs" / "gpu-8b-qlora.yaml"))
    assert stage == "sft" and set(space) == {"peft.r", "train.lr"}


@pytest.mark.slow
def test_two_trial_sft_sweep(ray_cluster, tiny_base, tmp_path):
    sweep = {"stage": "sft", "metric": "final_loss", "mode": "min", "max_concurrent_trials": 1,
             "search_space": {"train.lr": [1.0e-3, 5.0e-3]}}
    spec = make_spec(tmp_path / "store", tiny_base, {"sft": quick_sft(train={"max_steps": 3})}, name="sw",
                     sweep=sweep)
    results = run_sweep(spec)

    trials = results["trials"]
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials), trials
    assert sorted(t["overrides"]["train.lr"] for t in trials) == [1e-3, 5e-3]
    assert len({t["fingerprint"] for t in trials}) == 2
    for trial in trials:
        manifest = json.loads((Path(trial["artifact"]) / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["config"]["train"]["lr"] == trial["overrides"]["train.lr"]
        assert manifest["metrics"]["global_step"] == 3 and trial["value"] == manifest["metrics"]["final_loss"]
        assert Path(trial["artifact"]).parent == spec.run_root() / "sft"  # in the store like any stage run
        assert not trial["cached"]
    best = results["best"]
    assert best["value"] == min(t["value"] for t in trials)
    assert best["trial"] in {t["trial"] for t in trials}

    out = sweep_dir(spec, "sft")
    assert json.loads((out / "results.json").read_text())["best"] == best
    assert (out / "results.png").stat().st_size > 1000

    # The best trial's --set flags find its artifact in the store: nothing to train.
    raw = {"name": "sw", "storage": str(tmp_path / "store"), "base": {"model": str(tiny_base)},
           "stages": {"sft": quick_sft(train={"max_steps": 3})}}
    for flag in best["set"]:
        apply_override(raw, flag)
    cached = plan(parse_spec(raw)).cached["sft"]
    assert cached is not None and str(cached.path) == best["artifact"]
    print(f"\nsweep: {[(t['overrides'], round(t['value'], 4), t['seconds']) for t in trials]}")
