"""Multi-task data mixtures: a training stage's ``data`` as a weighted list of datasets.

The sampler (``stages.data.mixture``) respects its weights and temperature; a single dataset's config keeps
its fingerprint; bad mixtures are errors naming the key; a mixture is prepared with per-source counts; and one
real SFT stage on an addition + reversal mixture records every task in its manifest."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from pipeline.spec import SpecError, parse_spec
from pipeline.stage_run import fingerprint_parts
from stages.config import DataConfig, DataSource
from stages.data.mixture import mixture_probabilities, sample_mixture
from stages.stage import data_sources
from tests.helpers import make_spec, quick_sft

MIXTURE = [{"path": "builtin:addition", "weight": 3, "limit": 300}, {"path": "builtin:reversal", "weight": 1,
                                                                     "limit": 300}]


def spec_with(data, tmp_path, **stage):
    return parse_spec({"name": "mix", "storage": str(tmp_path), "stages": {
        "sft": {"data": data, "train": {"max_steps": 1}, **stage}}})


# --------------------------------------------------------------------------- the sampler


def test_probabilities_follow_weights_and_temperature_flattens():
    assert mixture_probabilities([3, 1]) == pytest.approx([0.75, 0.25])
    assert mixture_probabilities([3, 1], temperature=2.0) == pytest.approx([3 ** 0.5 / (3 ** 0.5 + 1), 1 / (3 ** 0.5 + 1)])
    flatter = [mixture_probabilities([8, 1, 1], t)[0] for t in (0.5, 1.0, 2.0, 10.0, 1000.0)]
    assert flatter == sorted(flatter, reverse=True) and flatter[-1] == pytest.approx(1 / 3, abs=0.01)
    with pytest.raises(ValueError, match="positive"):
        mixture_probabilities([1, 0])


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sampler_respects_its_probabilities(temperature):
    """2000 draws at weights 0.75 / 0.25: the share of each source within ±0.03 (3 binomial standard deviations:
    sqrt(0.75 * 0.25 / 2000) = 0.0097) of its probability; at T = 4 that is 0.568 / 0.432."""
    probabilities = mixture_probabilities([0.75, 0.25], temperature)
    order = sample_mixture([3000, 3000], probabilities, seed=0)[:2000]
    share = Counter(source for source, _ in order)[0] / len(order)
    assert share == pytest.approx(probabilities[0], abs=0.03), (share, probabilities)
    if temperature > 1:
        assert share < 0.75 - 0.1  # visibly flatter than the weights


def test_sampler_is_seeded_and_never_repeats_a_record_until_a_source_runs_out():
    first = sample_mixture([300, 100], [0.5, 0.5], seed=1)
    assert first == sample_mixture([300, 100], [0.5, 0.5], seed=1) != sample_mixture([300, 100], [0.5, 0.5], seed=2)
    assert len(set(first)) == len(first)  # first_exhausted: no record twice
    counts = Counter(s for s, _ in first)
    assert counts[1] == 100 and counts[0] < 300  # stopped when the small source ran out
    everything = sample_mixture([300, 100], [0.5, 0.5], seed=1, stopping_strategy="all_exhausted")
    assert {p for s, p in everything if s == 0} == set(range(300))  # every record of both used
    assert {p for s, p in everything if s == 1} == set(range(100))


# --------------------------------------------------------------------------- config


def test_single_dataset_config_keeps_its_fingerprint(tmp_path):
    """The data part of a single-dataset stage's fingerprint, computed with the code before mixtures existed
    (the rest, e.g. the code hash and other sections, changes for other reasons)."""
    expected = {
        "builtin:addition": "c6f0a1516ee12766a5355cfc60df3cb90b3ad98a32e511d8991c9e257df5bca5",
        json.dumps({"path": "builtin:addition", "limit": 64, "eval_fraction": 0.1, "format": None}):
            "0e7f931e050997fd8d8bd7cb7c08e461fead7f1fb3fe2b9eb6673aebe04909ee",
    }
    for data, digest in expected.items():
        spec = spec_with(data if data.startswith("builtin") else json.loads(data), tmp_path)
        assert type(spec.stages["sft"].data) is DataConfig
        parts = fingerprint_parts(spec, "sft", {"from": "x"})
        blob = json.dumps({"config_data": parts["config"]["data"], "data": parts["data"]}, sort_keys=True)
        assert hashlib.sha256(blob.encode()).hexdigest() == digest, blob


def test_mixture_config_is_a_list_of_weighted_sources(tmp_path):
    spec = spec_with([*MIXTURE, "builtin:reversal/test"], tmp_path)
    data = spec.stages["sft"].data
    assert [type(d) for d in data] == [DataSource] * 3 and [d.weight for d in data] == [3, 1, 1]
    # Every source is a data input of its own: validated, fingerprinted and fetched like a single dataset.
    assert list(data_sources(spec.stages["sft"])) == ["data[0]", "data[1]", "data[2]"]
    parts = fingerprint_parts(spec, "sft", {"from": "x"})
    assert set(parts["data"]) == {"data[0]", "data[1]", "data[2]"}
    assert parts["config"]["data"][0]["weight"] == 3
    heavier = spec_with([{**MIXTURE[0], "weight": 4}, MIXTURE[1]], tmp_path)
    assert fingerprint_parts(heavier, "sft", {"from": "x"}) != fingerprint_parts(
        spec_with(MIXTURE, tmp_path), "sft", {"from": "x"})


@pytest.mark.parametrize("data, message", [
    ([{"path": "builtin:addition", "weight": 0}], "stages.sft.data.0.weight: Input should be greater than 0"),
    ([MIXTURE[0], {"path": "builtin:reversal", "weight": -1}], "stages.sft.data.1.weight: Input should be greater"),
    ([MIXTURE[0], {"path": "builtin:reversal", "weight": "heavy"}], "stages.sft.data.1.weight: Input should be a valid number"),
    ([MIXTURE[0], {"path": "builtin:reversal", "sampling_temperature": 0}],
     "stages.sft.data.1.sampling_temperature: Input should be greater than 0"),
    ([{**MIXTURE[0], "sampling_temperature": 2}, {**MIXTURE[1], "sampling_temperature": 3}],
     "stages.sft.data: sampling_temperature is the whole mixture's, and its items disagree (data[0] 2.0, data[1] 3.0)"),
    ([MIXTURE[0], {"path": "builtin:reversal", "stopping_strategy": "never"}], "stages.sft.data.1.stopping_strategy"),
    ([MIXTURE[0], {"path": "builtin:reversal", "wieght": 1}], "stages.sft.data.1.wieght: unknown key; did you mean weight?"),
    ({"path": "builtin:addition", "lmit": 1}, "stages.sft.data.lmit: unknown key; did you mean limit?"),
    ([], "stages.sft.data: List should have at least 1 item"),
    ({"path": "builtin:addition", "weight": 2}, "stages.sft.data.weight: applies to the datasets of a mixture"),
])
def test_bad_mixture_is_an_error_naming_the_key(data, message, tmp_path):
    with pytest.raises(SpecError) as err:
        spec_with(data, tmp_path)
    assert message in str(err.value)


def test_sweep_on_eval_metric_sees_held_out_data_of_a_mixture(tmp_path):
    sweep = {"search_space": {"train.lr": [1e-3, 2e-3]}, "metric": "best_eval_loss", "mode": "min",
             "scheduler": {"name": "none"}}
    with pytest.raises(SpecError, match="needs held-out data"):
        spec_with(MIXTURE, tmp_path, sweep=sweep)
    spec_with([MIXTURE[0], {**MIXTURE[1], "eval_fraction": 0.1}], tmp_path, sweep=sweep)


# --------------------------------------------------------------------------- preparing a mixture


def context(tmp_path, data):
    from pipeline.runner import run_services
    from pipeline.store import ArtifactStore
    from stages.stage import StageContext

    spec = spec_with(data, tmp_path)
    return StageContext(name="sft", config=spec.stages["sft"], run=run_services(spec, ArtifactStore(spec.run_root())),
                        inputs={}, work_dir=tmp_path / "work", fingerprint="f")


def test_prepared_mixture_counts_every_source(tmp_path):
    from stages.training_data import prepare, with_default_eval

    ctx = context(tmp_path, MIXTURE)
    prepared = prepare(ctx, with_default_eval(ctx.config.data), "sft", seed=0)
    summary = prepared.summary
    add, rev = summary["sources"]["addition"], summary["sources"]["reversal"]
    # first_exhausted at 0.75 / 0.25: addition runs out first, after about 300 / 0.75 = 400 draws, 100 of them
    # reversal; measured over 40 seeds: mean 100.4, sd 16 (seed 0: 127), so ±50 is 3 sd.
    assert add["train_records"] == 300 and add["unused_train_records"] == 0
    assert rev["train_records"] == pytest.approx(100, abs=50) and rev["available_train_records"] == 300
    assert summary["train_records"] == 300 + rev["train_records"] and summary["read"] == 600
    assert add["probability"] == 0.75 and add["weight"] == 3 and add["path"] == "builtin:addition"
    # Held-out data per source: each built-in task's test split, in one eval file and in one per task.
    assert add["eval_records"] == rev["eval_records"] == 500 and summary["eval_records"] == 1000
    assert sorted(prepared.eval_files) == ["addition", "reversal"]
    rows = [json.loads(line) for line in prepared.train_file.read_text().splitlines()]
    users = Counter("rev" if r["messages"][0]["content"].startswith("rev ") else "add" for r in rows)
    assert users == {"add": 300, "rev": rev["train_records"]}
    eval_rows = prepared.eval_files["reversal"].read_text().splitlines()
    assert len(eval_rows) == 500 and all("rev " in line for line in eval_rows)


# --------------------------------------------------------------------------- one real stage


@pytest.mark.slow
def test_sft_stage_on_a_two_task_mixture(ray_cluster, tiny_base, tmp_path):
    from pipeline.runner import run_pipeline

    stage = quick_sft(data=[{"path": "builtin:addition", "limit": 96, "weight": 1, "eval_fraction": 0.125},
                            {"path": "builtin:reversal", "limit": 96, "weight": 1, "eval_fraction": 0.25,
                             "sampling_temperature": 1.0}],
                      train={"max_steps": 4, "logging_steps": 4})
    artifact = run_pipeline(make_spec(tmp_path, tiny_base, {"sft": stage}))["sft"]
    data = artifact.manifest["data"]["data"]
    sources = data["sources"]
    assert set(sources) == {"addition", "reversal"}
    assert sources["reversal"]["eval_records"] == 24 and sources["reversal"]["available_train_records"] == 72
    assert sources["addition"]["eval_records"] == 12 and sources["addition"]["available_train_records"] == 84
    assert data["train_records"] == sum(s["train_records"] for s in sources.values()) > 72
    m = artifact.manifest["metrics"]
    assert artifact.manifest["status"] == "complete" and m["global_step"] == 4
    # Each task's held-out loss on the final model, beside the loss on both together (evaluated at step 4,
    # the last: the same model), which is a mean over the same records and so lies between them.
    per_task = {task: m[f"heldout_loss/{task}"] for task in ("addition", "reversal")}
    print("held-out loss per task", per_task, "both", m["final_eval_loss"])
    assert all(0 < loss < 20 for loss in per_task.values()) and per_task["addition"] != per_task["reversal"]
    assert min(per_task.values()) * 0.98 <= m["final_eval_loss"] <= max(per_task.values()) * 1.02, (per_task, m)
    assert not any(name.startswith(("eval_addition", "eval_reversal")) for name in artifact.manifest["curves"])
