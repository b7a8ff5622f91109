"""The reward and dpo stages end to end: real Ray Train workers, real TRL, the builtin addition task
and real preference files.

Ray ``fit()`` calls (each ~25 s of fixed cost): dpo (full, RPO) + reward (full) on the addition task from
the session's SFT policy are the shipped tiny DAG's (``tiny_dag``); reward (HH-RLHF, LoRA, 2 workers
ZeRO-2) + dpo (LoRA, LLaMA-Factory pairs) run in another pipeline. The learning thresholds sit on one-worker runs, which repeat bit for bit
on this kind of machine; two workers under ZeRO-2 do not (held-out accuracy 0.596-0.812 over seven runs).
Each pipeline runs once per session (module fixtures) and several tests read its manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.spec import parse_spec
from tests.tiny_dag import REWARD_STEPS

DPO_STEPS = 150
# The tiny.yaml recipe on half its steps (400 steps of 32 pairs at lr 5e-4, warmup 5%, cosine), one worker
# under ZeRO-2, in the shared tiny DAG: seeded (the score head included), it repeats bit for bit. Measured
# held-out pairwise accuracy on the 500 test pairs (95% CI +-0.043 at chance): 0.702 (carry pairs 0.916,
# no-carry 0.527, margin 0.296); at 800 steps 0.798 (carry 0.987, margin 1.61). The earlier one-worker
# fixture without DeepSpeed: 0.722 at 800 steps; in-process with TRL and seeds 0/1/2, 0.734/0.828/0.764.
# Unseeded, on 2 workers under ZeRO-2 or at batch 16 it ranged 0.528-0.812 over ten runs. Most errors are
# on the no-carry pairs: the model learns to spot a missing carry before, and far more reliably than, it
# learns to check a sum.
REWARD_THRESHOLD = 0.6
CARRY_THRESHOLD = 0.75  # measured on the 225 carry pairs: 0.916 here, 0.95-1.0 in-process


def run(raw: dict, tiny_base: Path, **inputs):
    from pipeline.runner import run_pipeline

    return run_pipeline(parse_spec(raw), inputs={"base": str(tiny_base), **{k: str(v) for k, v in inputs.items()}})


# --------------------------------------------------------------------------- the addition task


@pytest.fixture(scope="module")
def addition_run(tiny_dag):
    """reward and dpo from the session's SFT policy (``--input sft=...``): the shipped tiny DAG's stages
    (tests/tiny_dag.py), tiny.yaml's recipes on one worker under ZeRO-2."""
    return tiny_dag.artifacts


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(addition_run):
    reward = addition_run["reward"]
    m = reward.metrics
    print("reward metrics", m)
    assert m["heldout_pairs"] == 500  # builtin:addition/test, all within max_length
    assert m["heldout_accuracy"] >= REWARD_THRESHOLD, m
    # Mean chosen-minus-rejected margin on the held-out pairs: measured 0.296 at 400 steps, 1.61 at 800 (0.41-3.26
    # in the unseeded two-worker runs at 800); an untrained head gives ~0.
    assert m["heldout_margin"] >= 0.2, m
    # The missing carry, the demonstrator's flaw, it spots; most of its errors are on the no-carry pairs (README).
    assert m["heldout_accuracy/carry"] >= CARRY_THRESHOLD, m
    assert m["global_step"] == REWARD_STEPS
    losses = [p["value"] for p in reward.manifest["curves"]["loss"]]
    # From the ln 2 plateau (0.695 at the first logging step) to 0.603 by the end (0.87x); at 800 steps 0.75x,
    # 0.50x-0.84x unseeded.
    assert len(losses) == REWARD_STEPS // 40 and losses[-1] <= 0.95 * losses[0], losses
    assert reward.manifest["data"]["data"]["eval"]["format"] == "builtin:addition"


@pytest.mark.slow
def test_reward_output_is_a_plain_sequence_classifier(addition_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = addition_run["reward"]
    assert reward.manifest["model_type"] == "full" and reward.manifest["head"] == "reward"
    model = AutoModelForSequenceClassification.from_pretrained(str(reward.model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(reward.model_dir))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id

    # Loaded with plain transformers and scored one conversation at a time (no padding), the folder ranks
    # the held-out carry pairs as the stage reported, and above the measured floor.
    from stages.data.records import PromptExample
    from stages.tasks import get_task

    task = get_task("addition")
    pairs = [p for p in task.load("preference", "test").records
             if task.category(PromptExample.from_trl(p.to_trl())) == "carry"]

    def score(conversation) -> float:
        ids = tokenizer.apply_chat_template([m.to_dict() for m in conversation], return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            return model(**ids).logits.item()

    wins = [score(p.prompt + p.chosen) > score(p.prompt + p.rejected) for p in pairs]
    accuracy = sum(wins) / len(wins)
    assert accuracy >= CARRY_THRESHOLD, accuracy
    assert accuracy == pytest.approx(reward.metrics["heldout_accuracy/carry"], abs=1.5 / len(wins))


@pytest.mark.slow
def test_dpo_raises_margin_with_a_frozen_reference(addition_run):
    dpo = addition_run["dpo"]
    m = dpo.metrics
    print("dpo metrics", {k: v for k, v in m.items() if not k.startswith("final_")})
    # The chosen-minus-rejected margin grows from ~0 (policy == reference at step 0), in training and held out.
    # Measured at tiny.yaml's lr 4e-4: training margin 0.078 at the first logging step -> 0.369; held-out
    # margin 0.373 and ranking accuracy 0.905. At the earlier lr 5e-5: 0.072 -> 0.176, 0.1795 and 0.799 (the
    # same in four runs: one worker repeats exactly).
    assert m["margin"] >= m["first_margin"] + 0.05, m
    assert m["heldout_rewards/margins"] >= 0.15 and m["heldout_rewards/accuracies"] >= 0.75, m
    for key in ("rewards_chosen", "rewards_rejected", "accuracy", "logps_chosen", "logps_rejected"):
        assert key in m
    assert dpo.manifest["reference"] == "frozen copy" and dpo.manifest["ref_model_is_none"] is False
    assert m["ref_parameters"] == m["policy_parameters"]
    assert len(dpo.manifest["curves"]["loss"]) == DPO_STEPS // 10


@pytest.mark.slow
def test_dpo_with_nll_beats_sft_on_held_out_prompts(addition_run, addition_sft):
    from stages.task_accuracy import heldout_accuracy

    accuracy = {name: heldout_accuracy(Path(model), "addition")
                for name, model in (("sft", addition_sft), ("dpo", addition_run["dpo"].model_dir))}
    print("verifier accuracy", accuracy)
    # Measured with this fixture: SFT 57.2% (carry 5%), DPO + NLL 96.2% (previous recipe run),
    # then 93.2% in two runs (carry 99%) at lr 5e-5, and 98.6% (carry 100%) at tiny.yaml's lr 4e-4.
    assert accuracy["dpo"]["accuracy"] >= accuracy["sft"]["accuracy"] + 0.2, accuracy


# --------------------------------------------------------------------------- real files


@pytest.fixture(scope="module")
def real_run(ray_cluster, tiny_base, shared_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("reward-dpo-real")
    hh = shared_data / "preference" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    demo = shared_data / "preference" / "llamafactory" / "dpo_en_demo.json"
    small = {"max_steps": 4, "lr": 1e-3, "batch_size": 4, "max_length": 256, "logging_steps": 1}
    raw = {
        "name": "real", "storage": str(storage), "tracking": {"backend": "none"},
        "stages": {
            "rm": {"kind": "reward", "from": "base", "data": {"path": str(hh), "eval_fraction": 0.05},
                   "peft": {"method": "lora", "r": 8}, "train": small,
                   "scaling": {"num_workers": 2}, "deepspeed": {"zero_stage": 2}},
            "dpo": {"from": "base", "data": {"path": str(demo), "eval_fraction": 0.1},
                    "peft": {"method": "lora", "r": 8}, "loss": "sigmoid", "train": small},
        },
    }
    return run(raw, tiny_base)


@pytest.mark.slow
def test_reward_on_hh_rlhf(real_run):
    rm = real_run["rm"]
    data = rm.manifest["data"]["data"]
    assert data["format"] == "hh_rlhf"
    assert data["skipped"] == {"chosen_equals_rejected": 2, "empty_response": 4}
    assert data["train_records"] + data["eval_records"] == 2348
    m = rm.metrics
    assert m["global_step"] == 4 and len(rm.manifest["curves"]["loss"]) == 4
    # The per-character tokenizer makes most HH-RLHF pairs longer than 256 tokens; those are dropped and counted.
    assert 0 < m["train_pairs_used"] < data["train_records"]
    assert m["train_pairs_used"] + m["train_pairs_too_long"] == data["train_records"]
    # Held-out accuracy against a known answer: the eval pairs the stage wrote, scored again here one pair at
    # a time (no padding) by the merged classifier loaded with plain transformers.
    expected = _pairwise_accuracy(rm.model_dir, rm.path / "data" / "eval.jsonl", max_length=256)
    assert m["heldout_pairs"] == expected["pairs"] >= 10, (m, expected)  # 17 of 117 fit in 256 tokens
    assert m["heldout_pairs_too_long"] == expected["too_long"]
    assert m["heldout_accuracy"] == pytest.approx(expected["accuracy"], abs=1.5 / expected["pairs"]), (m, expected)
    # LoRA: the adapter (score head trained in full) is kept, model/ holds the merged plain classifier.
    adapter = json.loads((rm.path / "adapter" / "adapter_config.json").read_text())
    assert "score" in adapter["modules_to_save"] and adapter["task_type"] == "SEQ_CLS"
    assert rm.manifest["model_type"] == "full" and rm.manifest["adapter_dir"] == "adapter"


@pytest.mark.slow
def test_dpo_lora_on_llamafactory_pairs_uses_adapter_disabled_base(real_run):
    dpo = real_run["dpo"]
    data = dpo.manifest["data"]["data"]
    assert data["format"] == "sharegpt" and data["read"] == 300 and data["skipped"] == {}
    assert dpo.manifest["model_type"] == "adapter"
    # One model's parameters in memory: TRL's ref_model is None, the reference is the adapter-disabled base.
    assert dpo.manifest["reference"] == "adapter-disabled base" and dpo.manifest["ref_model_is_none"] is True
    assert dpo.metrics["ref_parameters"] == 0
    assert 0 < dpo.metrics["trainable_parameters"] < dpo.metrics["policy_parameters"]
    assert dpo.metrics["global_step"] == 4 and "heldout_loss" in dpo.metrics


# --------------------------------------------------------------------------- bad input (no Ray)


def stage_context(tmp_path, stage: dict, tiny_base):
    from pipeline.runner import run_services
    from pipeline.store import Artifact, ArtifactStore
    from stages.stage import StageContext

    spec = parse_spec({"name": "bad", "storage": str(tmp_path), "stages": {"s": stage}})
    return StageContext(name="s", config=spec.stages["s"], run=run_services(spec, ArtifactStore(spec.run_root())),
                        inputs={"from": Artifact.external("base", str(tiny_base))},
                        work_dir=tmp_path / "work", fingerprint="f")


def test_preference_file_without_rejected_fails_before_training(tmp_path, tiny_base):
    from stages import reward
    from stages.data.errors import DataError

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    with pytest.raises(DataError, match="cannot give 'preference' records"):
        reward.run(stage_context(tmp_path, {"kind": "reward", "data": str(path)}, tiny_base))


def test_pair_with_empty_response_is_skipped_and_counted(tmp_path, tiny_base):
    from stages import training_data

    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "hi", "chosen": "hello", "rejected": "go away"},
            {"prompt": "hi", "chosen": "", "rejected": "go away"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = stage_context(tmp_path, {"kind": "dpo", "data": str(path)}, tiny_base)
    prepared = training_data.prepare(ctx, ctx.config.data, "preference")
    assert prepared.summary["skipped"] == {"empty_response": 1} and prepared.summary["train_records"] == 1
    only_empty = tmp_path / "empty.jsonl"
    only_empty.write_text(json.dumps(rows[1]) + "\n")
    from stages import dpo

    with pytest.raises(ValueError, match="no usable preference records"):
        dpo.run(stage_context(tmp_path, {"kind": "dpo", "data": str(only_empty)}, tiny_base))


def test_sharegpt_pair_with_unknown_role(tmp_path, tiny_base):
    from stages import dpo
    from stages.data.errors import DataError

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "hi"}],
                                 "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}]))
    with pytest.raises(DataError, match="unknown role 'robot'"):
        dpo.run(stage_context(tmp_path, {"kind": "dpo", "data": str(path)}, tiny_base))


def test_held_out_accuracy_per_task_category(tmp_path, tiny_base):
    """Builtin held-out pairs are scored per category, and the categories add up to the overall accuracy."""
    from stages import reward
    from stages.config import DataConfig
    from stages.files import write_jsonl
    from stages.tasks import get_task
    from stages.tasks.addition import parse_problem
    from stages.training_data import held_out_task, with_default_eval

    assert held_out_task(with_default_eval(DataConfig(path="builtin:addition"))) == "addition"
    assert held_out_task(DataConfig(path="builtin:addition", eval_fraction=0.1)) == "addition"
    assert held_out_task(DataConfig(path="pairs.jsonl", eval_path="builtin:addition/test")) == "addition"
    assert held_out_task(DataConfig(path="pairs.jsonl", eval_fraction=0.1)) is None

    pairs = get_task("addition").load("preference", "test", 40).records
    path = write_jsonl(tmp_path / "eval.jsonl", (p.to_trl() for p in pairs))
    categories = reward.pair_categories(str(path), "addition")
    assert categories == ["carry" if parse_problem(pair.prompt).carry else "no_carry" for pair in pairs]
    # The tiny base with a fresh score head is a (random) reward model; only the bookkeeping is under test.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(model_dir)
    m = reward.score_pairs(model_dir, str(path), max_length=32, categories=categories)
    n_carry = categories.count("carry")
    assert m["heldout_pairs"] == 40 and 0 < n_carry < 40
    overall = (m["heldout_accuracy/carry"] * n_carry + m["heldout_accuracy/no_carry"] * (40 - n_carry)) / 40
    assert m["heldout_accuracy"] == pytest.approx(overall)
    line = reward.describe_heldout(m)
    assert line.startswith(f"held-out pairwise accuracy {m['heldout_accuracy']:.1%} on 40 pairs (carry "), line


def test_unknown_loss_name_lists_valid_ones(tmp_path):
    from pipeline.spec import SpecError, load_spec

    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  dpo: {data: builtin:addition, loss: dpop}\n")
    with pytest.raises(SpecError, match=r"stages\.dpo\.loss: unknown loss 'dpop'; valid losses: "
                                        r"hinge, ipo, kto, orpo, robust, sigmoid, simpo"):
        load_spec(path)


def test_kto_loss_reads_unpaired_kto_file(shared_data):
    from pipeline.validate import validate_pipeline

    kto = shared_data / "chat" / "messages" / "kto_en_demo.json"
    spec = parse_spec({"name": "k", "stages": {"dpo": {"data": str(kto), "loss": "kto"}}})
    lines = validate_pipeline(spec)
    assert any("300 usable kto records" in line for line in lines), lines


def _pairwise_accuracy(model_dir: Path, pairs_file: Path, max_length: int) -> dict:
    """Chosen-over-rejected accuracy of a saved sequence classifier on a TRL pairs file, pair by pair."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    wins, too_long = [], 0
    for line in pairs_file.read_text().splitlines():
        row = json.loads(line)
        ids = [tokenizer.apply_chat_template(row["prompt"] + row[side], return_tensors="pt", return_dict=True)
               for side in ("chosen", "rejected")]
        if max(i["input_ids"].shape[1] for i in ids) > max_length:
            too_long += 1
            continue
        with torch.no_grad():
            chosen, rejected = (model(**i).logits.item() for i in ids)
        wins.append(chosen > rejected)
    return {"pairs": len(wins), "too_long": too_long, "accuracy": sum(wins) / max(1, len(wins))}
