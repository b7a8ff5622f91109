"""The eval stage: metric functions on known answers, the verifier on hand-made responses, and real
evals of the tiny base through Ray Data (a model against itself; adding a model evaluates only it)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from pipeline.spec import parse_spec
from stages.evaluate import metrics as M
from tests.helpers import make_spec

# --------------------------------------------------------------------------- pure metrics


def test_wilson_interval_on_a_known_count():
    low, high = M.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)  # the textbook Wilson interval of 8/10
    assert M.wilson_interval(0, 10)[0] == 0.0 and M.wilson_interval(10, 10)[1] == 1.0
    result = M.accuracy([True] * 8 + [False] * 2)
    assert result["accuracy"] == 0.8 and result["correct"] == 8 and result["n"] == 10
    assert result["ci"] == list(M.wilson_interval(8, 10))


def test_win_rate_counts_ties_half():
    result = M.win_rate([1.0, 0.2, 0.0, 0.5], [0.5, 0.2, 0.1, 0.9], same=[False, False, False, True])
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (1, 2, 1, 4)
    assert result["win_rate"] == 0.5
    itself = M.win_rate([0.3, 0.7, 0.1], [0.3, 0.7, 0.1])
    assert itself["win_rate"] == 0.5 and itself["ties"] == 3 and itself["ci"] == [0.5, 0.5]


def test_kl_estimate_known_values():
    assert M.kl_estimate([[-1.0, -2.0]], [[-1.0, -2.0]])["kl"] == 0.0
    result = M.kl_estimate([[-1.0, -2.0], [-0.5]], [[-1.5, -2.5], [-1.5]])
    assert result["kl"] == pytest.approx(1.0) and result["per_token"] == pytest.approx(2.0 / 3)
    assert result["samples"] == 2 and result["tokens"] == 3 and result["k3_per_token"] > 0


def test_perplexity_and_implicit_ranking():
    assert M.perplexity([[-0.1, -0.3], [-0.2]])["perplexity"] == pytest.approx(math.exp(0.2))
    ranking = M.implicit_reward_ranking([-1.0, -1.0, -2.0], [-2.0, -1.0, -2.0], [-3.0, -1.0, -1.0], [-3.0, -1.0, -2.0])
    # pair 1: chosen +1 vs rejected 0 (right); pair 2: a tie; pair 3: chosen 0 vs rejected +1 (wrong)
    assert ranking["accuracy"] == pytest.approx(0.5) and ranking["ties"] == 1 and ranking["n"] == 3


# --------------------------------------------------------------------------- the verifier through summarize


def _config(**over):
    raw = {"kind": "eval", "models": ["base"], "tasks": ["addition"], "num_examples": 3, **over}
    return parse_spec({"name": "t", "stages": {"eval": raw}}).stages["eval"]


def _addition_data(n: int):
    from stages.evaluate.stage import EvalData, _messages
    from stages.tasks import get_task

    data = EvalData()
    for i, record in enumerate(get_task("addition").load("prompt", "test", n).records):
        data.prompts.append({"row": i, "set": "task:addition", "task": "addition", "messages": _messages(record.prompt),
                             "answer": record.answer, "record": record})
    return data


def test_verifier_accuracy_on_hand_made_responses():
    from stages.evaluate.generation import _output_row
    from stages.evaluate.stage import summarize

    data = _addition_data(20)
    rows, expected = [], []
    for p in data.prompts:
        right = p["row"] % 3 != 0  # every third answer wrong
        text = p["answer"] if right else str(int(p["answer"]) + 10)
        rows.append(_output_row(p["row"], "gen", text=f" {text}\n" if right else text, tokens=3, finished=True,
                                reward=1.0 if right else 0.0))
        expected.append(right)
    entry, responses = summarize(rows, data, _config(), reference_rows=None)
    result = entry["metrics"]["tasks"]["addition"]
    assert result["correct"] == sum(expected) and result["n"] == 20
    assert result["ci"] == list(M.wilson_interval(sum(expected), 20))
    carry = [e for e, r in zip(expected, responses) if r["category"] == "carry"]
    assert result["categories"]["carry"]["correct"] == sum(carry) and result["categories"]["carry"]["n"] == len(carry)
    assert [r["correct"] for r in responses] == expected
    # the reference against itself: every response ties
    assert entry["metrics"]["win_rate"]["win_rate"] == 0.5 and entry["metrics"]["win_rate"]["ties"] == 20
    assert len(entry["samples"]) == 3 and entry["samples"][0]["prompt"].endswith("=")


def test_spec_edges_and_validation():
    spec = parse_spec({"name": "t", "stages": {
        "sft": {"data": "builtin:addition"}, "rm": {"kind": "reward", "from": "sft", "data": "builtin:addition"},
        "eval": {"models": ["base", "sft"], "reward": "rm", "tasks": ["addition", {"name": "gsm8k"}],
                 "prompts": "x.jsonl", "generation": {"max_new_tokens": 4}}}})
    config = spec.stages["eval"]
    assert config.upstream() == {"models[0]": "base", "models[1]": "sft", "reward": "rm"}
    assert [d.path for d in config.task_data] == ["builtin:addition/test"]  # gsm8k reads prompts:
    from stages.evaluate.stage import choose_reference

    assert choose_reference(config, {name: c.kind for name, c in spec.stages.items()}) == "sft"
    with pytest.raises(Exception, match="unknown task 'additon'; did you mean addition"):
        parse_spec({"name": "t", "stages": {"eval": {"models": ["base"], "tasks": ["additon"]}}})
    with pytest.raises(Exception, match="something to evaluate"):
        parse_spec({"name": "t", "stages": {"eval": {"models": ["base"]}}})


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def model_folders(tiny_base, tmp_path_factory):
    """A perturbed copy of the tiny base (a second policy) and a reward model built from the base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("eval-models")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    shutil.copytree(tiny_base, root / "base-copy")
    return {"policy": root / "policy", "reward": root / "reward", "base_copy": root / "base-copy"}


def test_kl_of_identical_weights_in_separate_engines_is_zero(tiny_base, model_folders):
    """Two engines (policy and reference loaded separately) of the same weights: KL is 0 up to float noise."""
    from stages.evaluate.generation import EvalWorker
    from stages.tasks import get_task

    worker = EvalWorker(str(tiny_base), str(model_folders["base_copy"]), engine="hf",
                        sampling={"max_new_tokens": 6, "temperature": 0.0},
                        kl_sampling={"max_new_tokens": 6, "temperature": 1.0, "n": 3, "seed": 0})
    prompts = get_task("addition").load("prompt", "test", 4).records
    batch = {"row": list(range(4)), "purpose": ["gen"] * 4, "kl": [True] * 4, "target": [""] * 4,
             "messages": [json.dumps([m.to_dict() for m in p.prompt]) for p in prompts]}
    out = worker(batch)
    kl_rows = [i for i, purpose in enumerate(out["purpose"]) if purpose == "kl"]
    assert len(kl_rows) == 12 and worker.reference is not worker.policy
    result = M.kl_estimate([json.loads(out["policy_lp"][i]) for i in kl_rows],
                           [json.loads(out["ref_lp"][i]) for i in kl_rows])
    assert abs(result["kl"]) < 1e-4 and result["tokens"] > 12


def _eval_spec(tmp_path, tiny_base, models, max_concurrent_models=1):
    stages = {
        "policy": {"kind": "sft", "data": "builtin:addition"},  # provided with --input (no training here)
        "reward": {"kind": "reward", "data": "builtin:addition"},
        "eval": {"kind": "eval", "models": models, "reward": "reward", "reference": "base", "tasks": ["addition"],
                 "sft_data": {"path": "builtin:addition/test", "limit": 8},
                 "preference_data": {"path": "builtin:addition/test", "limit": 8}, "max_prompts": 16,
                 "generation": {"engine": "hf", "max_new_tokens": 6, "num_samples": 2, "kl_prompts": 4,
                                "batch_size": 8, "max_concurrent_models": max_concurrent_models}},
    }
    return make_spec(tmp_path, tiny_base, stages)


@pytest.mark.slow
def test_eval_on_the_tiny_base_then_only_the_added_model(ray_cluster, tiny_base, model_folders, tmp_path):
    from pipeline.runner import run_pipeline
    from stages.tasks import get_task

    inputs = {"reward": str(model_folders["reward"]), "policy": str(model_folders["policy"])}
    first = run_pipeline(_eval_spec(tmp_path, tiny_base, ["base"]), only=["eval"], inputs=inputs)["eval"]
    info = first.manifest["eval"]
    assert info["computed"] == ["base"] and info["reused"] == [] and info["engine"] == "hf"
    assert info["sampling"]["temperature"] == 0.0 and info["sampling"]["num_samples"] == 2
    base = first.metrics["base"]
    # A model against itself: every response ties, KL is exactly zero, implicit rewards are all ties.
    assert base["win_rate"]["win_rate"] == 0.5 and base["win_rate"]["ties"] == 16
    assert base["kl"]["kl"] == 0.0 and base["kl"]["samples"] == 8
    assert base["preference"]["accuracy"] == 0.5 and base["preference"]["n"] == 8
    assert math.isfinite(base["perplexity"]["perplexity"]) and base["perplexity"]["examples"] == 8
    assert math.isfinite(base["reward"]["mean"]) and base["reward"]["n"] == 16
    # The accuracy is the verifier's verdict on the saved responses, with the Wilson interval of that count.
    entries = json.loads((first.path / "metrics.json").read_text())["models"]
    key = info["models"]["base"]["key"]
    assert entries[key]["fingerprint"] == first.manifest["inputs"]["base"]
    responses = [json.loads(line) for line in (first.path / "responses" / f"{key}.jsonl").read_text().splitlines()]
    task, prompts = get_task("addition"), get_task("addition").load("prompt", "test", 16).records
    correct = sum(task.verify(p, r["response"]) for p, r in zip(prompts, responses))
    assert base["tasks"]["addition"]["correct"] == correct
    assert base["tasks"]["addition"]["ci"] == list(M.wilson_interval(correct, 16))
    assert len(first.manifest["eval"]["samples"]["base"]) == 5

    # models: grew -> base's results are reused, only the policy is evaluated.
    second = run_pipeline(_eval_spec(tmp_path, tiny_base, ["base", "policy"]), only=["eval"], inputs=inputs)["eval"]
    info = second.manifest["eval"]
    assert info["reused"] == ["base"] and info["computed"] == ["policy"]
    assert second.metrics["base"] == first.metrics["base"]
    policy = second.metrics["policy"]
    assert policy["kl"]["kl"] != 0.0 and math.isfinite(policy["kl"]["kl"])
    # The win rate against a known answer: the saved responses of both models, scored again here one by one
    # by the reward model loaded with plain transformers, compared prompt by prompt.
    wins = policy["win_rate"]
    expected = _win_rate_from_saved_responses(second.path / "responses", info["models"], model_folders["reward"])
    assert {k: wins[k] for k in ("wins", "ties", "losses", "n")} == expected["counts"], (wins, expected)
    assert wins["win_rate"] == pytest.approx(expected["win_rate"], abs=1e-12)
    assert expected["counts"]["ties"] < 16  # the perturbed policy answers some prompts differently
    assert (second.path / "responses" / f"{info['models']['base']['key']}.jsonl").exists()

    # Both models at once, in a new store: each in its own Ray Data pass, with the same results to the bit.
    together = run_pipeline(_eval_spec(tmp_path / "together", tiny_base, ["base", "policy"], max_concurrent_models=2),
                            only=["eval"], inputs=inputs)["eval"]
    assert together.manifest["eval"]["computed"] == ["base", "policy"]
    assert together.metrics == second.metrics


def _win_rate_from_saved_responses(folder, models: dict, reward_dir) -> dict:
    """Wins/ties/losses of ``policy`` against ``base`` recomputed from the eval's saved responses, each
    response scored on its own (no padding) by the reward model loaded with plain transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.tasks import get_task

    def saved(name):
        return [json.loads(line) for line in (folder / f"{models[name]['key']}.jsonl").read_text().splitlines()]

    policy, base = saved("policy"), saved("base")
    prompts = get_task("addition").load("prompt", "test", len(policy)).records
    tokenizer = AutoTokenizer.from_pretrained(str(reward_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir)).eval()

    def scores(rows):
        values = []
        for prompt, row in zip(prompts, rows):
            conversation = [m.to_dict() for m in prompt.prompt] + [{"role": "assistant", "content": row["response"]}]
            ids = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                values.append(model(**ids).logits.item())
        # The eval stored the same scores (batched with padding, which moves only the last bits).
        assert values == pytest.approx([r["reward"] for r in rows], abs=1e-4)
        return values

    outcomes = [M.outcome(mine, ref, a["response"] == b["response"])
                for mine, ref, a, b in zip(scores(policy), scores(base), policy, base)]
    counts = {"wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0),
              "n": len(outcomes)}
    return {"counts": counts, "win_rate": sum(outcomes) / len(outcomes)}
