"""Quality gates: the conditions (stages.gates), what each stage kind lets a gate name (the configs),
and that a gate never changes a fingerprint (pipeline.runner). The run-level behaviour (a failed gate
stops the stages downstream, --ignore-gates, the report) is tests/e2e/test_tiny_dag.py's."""

from __future__ import annotations

import pytest

from pipeline.runner import plan
from pipeline.spec import SpecError, load_spec, parse_spec
from stages.gates import GateError, Metric, evaluate_gate, parse_condition
from tests.conftest import REPO


@pytest.mark.parametrize("text, left, op, right", [
    ("heldout_accuracy >= 0.65", Metric("heldout_accuracy"), ">=", 0.65),
    ("  final_loss<2  ", Metric("final_loss"), "<", 2.0),
    ("accuracy[dpo] >= accuracy[sft]", Metric("accuracy", "dpo"), ">=", Metric("accuracy", "sft")),
    ("0.5 != heldout_accuracy/carry", 0.5, "!=", Metric("heldout_accuracy/carry")),
    ("kl[ppo] <= 1e-1", Metric("kl", "ppo"), "<=", 0.1),
])
def test_conditions_parse(text, left, op, right):
    condition = parse_condition(text)
    assert (condition.left, condition.op, condition.right) == (left, op, right)


@pytest.mark.parametrize("text, message", [
    ("heldout_accuracy => 0.65", "is not a condition"),
    ("heldout_accuracy", "is not a condition"),
    ("0.5 < 0.7", "compares two numbers"),
    ("accuracy[DPO] >= 0.5", "neither a number nor a metric"),
    ("loss >= nan", "not a finite number"),
    (0.65, "expected a condition"),
])
def test_bad_conditions_say_what_is_wrong(text, message):
    with pytest.raises(GateError, match=message):
        parse_condition(text)


def test_checks_compare_values_and_a_missing_metric_fails():
    metrics = {"heldout_accuracy": 0.72, "final_loss": 0.3, "broken": float("nan")}
    def lookup(metric):
        return metrics.get(metric.name)

    result = evaluate_gate(["heldout_accuracy >= 0.65", "final_loss < 0.3"], lookup)
    assert [c.passed for c in result.checks] == [True, False] and not result.passed
    assert result.failures() == ["final_loss = 0.3; the gate needs final_loss < 0.3"]
    assert evaluate_gate(["heldout_accuracy >= 0.72"], lookup).passed  # the boundary holds
    missing = evaluate_gate(["heldout_margin > 0", "broken > 0"], lookup)
    assert [c.problem for c in missing.checks] == [
        "heldout_margin was not reported by the stage (or is not a finite number)",
        "broken was not reported by the stage (or is not a finite number)"]
    assert missing.as_dict(ignored=True) == {
        "passed": False, "ignored": True,
        "checks": [{"condition": "heldout_margin > 0", "left": None, "right": None, "passed": False,
                    "problem": "heldout_margin was not reported by the stage (or is not a finite number)"},
                   {"condition": "broken > 0", "left": None, "right": None, "passed": False,
                    "problem": "broken was not reported by the stage (or is not a finite number)"}]}


def test_metric_against_metric_names_both_values():
    values = {("accuracy", "dpo"): 0.61, ("accuracy", "sft"): 0.64}
    result = evaluate_gate(["accuracy[dpo] >= accuracy[sft]"], lambda m: values[(m.name, m.model)])
    assert result.failures() == ["accuracy[dpo] = 0.61, accuracy[sft] = 0.64; the gate needs accuracy[dpo] >= "
                                 "accuracy[sft]"]


def tiny(*overrides: str):
    return load_spec(REPO / "configs" / "tiny.yaml", list(overrides))


def test_eval_gates_read_the_summary_row_of_a_model():
    config = tiny('stages.eval.gate=["accuracy[dpo] >= accuracy[sft]", "kl[ppo] < 2"]').stages["eval"]
    metrics = {"dpo": {"summary": {"accuracy/addition": 0.9, "kl": 0.1}}, "sft": {"summary": {"accuracy/addition": 0.5}}}
    assert config.gate_value(metrics, "accuracy", "dpo") == 0.9  # one task: accuracy is accuracy/addition
    assert config.gate_value(metrics, "accuracy/addition", "sft") == 0.5
    assert config.gate_value(metrics, "kl", "ppo") is None


@pytest.mark.parametrize("gate, message", [
    ('stages.reward.gate=["heldout_acuracy >= 0.6"]', "reward stages do not report 'heldout_acuracy'; did you "
                                                       "mean heldout_accuracy?"),
    ('stages.sft.gate=["final_los < 1"]', "did you mean final_loss?"),  # a near miss, though final_* matches
    ('stages.sft.gate=["heldout_accuracy >= 0.5"]', "sft stages do not report 'heldout_accuracy'"),
    ('stages.sft.gate=["loss[sft] < 1"]', "only an eval stage's metrics name a model; write loss"),
    ('stages.eval.gate=["accuracy >= 0.5"]', "name the evaluated model: accuracy[base]"),
    ('stages.eval.gate=["win_rat[ppo] >= 0.5"]', "the eval reports no 'win_rat'; did you mean win_rate?"),
])
def test_a_gate_names_only_what_its_stage_reports(gate, message):
    with pytest.raises(SpecError, match=r"stages\.\w+\.gate: ") as err:
        tiny(gate)
    assert message in str(err.value)


def test_every_kind_accepts_its_headline_metrics():
    spec = tiny('stages.sft.gate=["final_loss < 2", "final_mean_token_accuracy > 0.1"]',
                'stages.reward.gate="heldout_accuracy/carry >= 0.5"',  # a single condition: the string form
                'stages.dpo.gate=["heldout_rewards/accuracies >= 0.5"]',
                'stages.ppo.gate=["heldout_accuracy >= initial_heldout_accuracy", "late_kl < 1"]',
                'stages.eval.gate=["accuracy/addition[grpo] >= 0.5", "perplexity[sft] < 10"]')
    assert spec.stages["reward"].gate == ["heldout_accuracy/carry >= 0.5"]


def test_a_gate_is_not_part_of_any_fingerprint(tmp_path):
    plain = plan(tiny(f"storage={tmp_path}", "stages.reward.gate=[]"))
    gated = plan(tiny(f"storage={tmp_path}", 'stages.reward.gate=["heldout_accuracy >= 0.99"]',
                      'stages.eval.gate=["accuracy[dpo] > accuracy[sft]"]'))
    assert gated.fingerprints == plain.fingerprints


def test_a_pipeline_without_gates_parses_as_before():
    spec = parse_spec({"name": "p", "stages": {"sft": {"data": "builtin:addition"}}})
    assert spec.stages["sft"].gate == []
