"""Few-shot evaluation (``few_shot: k``, stages.evaluate.few_shot): k exemplars from the task's training
split before each held-out prompt, seeded, never from the held-out split; the bad inputs are errors
naming the key; one real eval through Ray records k in the manifest, the metrics and the responses."""

from __future__ import annotations

import json

import pytest

from pipeline.spec import parse_spec
from stages.evaluate.stage import EvalData, check_eval_data, load_eval_data
from stages.tasks import get_task
from tests.helpers import make_spec

KEY = "stages.eval"


def _config(**over):
    raw = {"kind": "eval", "models": ["base"], "tasks": ["addition"], "max_prompts": 60, **over}
    return parse_spec({"name": "t", "stages": {"eval": raw}}).stages["eval"]


def _load(config, root=None) -> EvalData:
    return load_eval_data(config, lambda p: p if p.startswith("builtin:") else str(root / p), KEY)


def _split_questions() -> tuple[set[str], set[str]]:
    train, test = get_task("addition").splits()
    return {p.prompt_text() for p in train}, {p.prompt_text() for p in test}


def _conversation(row: dict) -> list[dict]:
    return json.loads(row.get("gen_messages", row["messages"]))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- the prompts


def test_k_shot_prompts_hold_k_training_exemplars_and_no_held_out_problem():
    k = 3
    data = _load(_config(few_shot=k))
    train, test = _split_questions()
    held_out = [json.loads(p["messages"]) for p in data.prompts]
    assert len(held_out) == 60 and all(m[-1]["content"] in test for m in held_out)
    drawn = set()
    for row, prompt in zip(data.prompts, held_out):
        conversation = _conversation(row)
        users = [m["content"] for m in conversation if m["role"] == "user"]
        answers = [m["content"] for m in conversation if m["role"] == "assistant"]
        # k solved user/assistant turns, alternating, then the held-out prompt itself, unchanged.
        assert len(users) == k + 1 and len(answers) == k and conversation[-1:] == prompt
        assert [m["role"] for m in conversation] == ["user", "assistant"] * k + ["user"]
        exemplars = users[:k]
        assert set(exemplars) <= train and not set(exemplars) & test  # from train only, by set membership
        assert len(set(exemplars)) == k and row["exemplars"] == exemplars
        for question, answer in zip(exemplars, answers):  # solved: the correct sum, not the flawed demonstrator's
            a, b = question.rstrip("=").split("+")
            assert answer == str(int(a) + int(b))
        drawn |= set(exemplars)
    assert len(drawn) > 0.9 * k * len(held_out)  # each prompt draws its own exemplars (7600 to draw from)
    # The batch rows the engines see carry the exemplars; the grading record stays the held-out prompt.
    rows = data.rows(kl_prompts=4)
    assert [json.loads(r["messages"]) for r in rows] == [_conversation(p) for p in data.prompts]
    assert all(p["record"].prompt[-1].content == json.loads(p["messages"])[-1]["content"] for p in data.prompts)


def test_exemplars_are_seeded_and_k_zero_leaves_prompts_unchanged():
    first, again = _load(_config(few_shot=2)), _load(_config(few_shot=2))
    assert [p["gen_messages"] for p in first.prompts] == [p["gen_messages"] for p in again.prompts]
    other = _load(_config(few_shot=2, few_shot_seed=1))
    differ = sum(a["exemplars"] != b["exemplars"] for a, b in zip(first.prompts, other.prompts))
    assert differ >= 55  # a new seed redraws (almost) every prompt's pair from 7600 problems
    # The first prompt's exemplars do not depend on how many prompts are evaluated.
    fewer = _load(_config(few_shot=2, max_prompts=5))
    assert [p["exemplars"] for p in fewer.prompts] == [p["exemplars"] for p in first.prompts[:5]]

    zero, default = _load(_config(few_shot=0)), _load(_config())
    records = get_task("addition").load("prompt", "test", 60).records
    expected = [json.dumps([m.to_dict() for m in r.prompt]) for r in records]
    for data in (zero, default):
        assert all("gen_messages" not in p and "exemplars" not in p for p in data.prompts)
        assert [r["messages"] for r in data.rows(kl_prompts=4)] == expected


def test_file_exemplars_skip_held_out_prompts_and_sft_conversations_count(tmp_path):
    test_questions = [r.prompt[-1].content for r in get_task("addition").load("prompt", "test", 60).records]
    # A "training" file that repeats four held-out problems: those are left out of the pool.
    rows = [{"prompt": q, "answer": "0"} for q in test_questions[:4]] + [{"prompt": f"{a}+1=", "answer": str(a + 1)}
                                                                          for a in range(10, 13)]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    data = _load(_config(few_shot=3, tasks=[{"name": "addition", "few_shot_data": "train.jsonl"}]), tmp_path)
    assert all(sorted(p["exemplars"]) == ["10+1=", "11+1=", "12+1="] for p in data.prompts)
    with pytest.raises(ValueError, match=r"stages\.eval\.few_shot: 4 exemplars per prompt, but train\.jsonl has only 3 "
                                         r"solved exemplars for task 'addition' \(4 more are held-out prompts"):
        _load(_config(few_shot=4, tasks=[{"name": "addition", "few_shot_data": "train.jsonl"}]), tmp_path)
    # SFT conversations are solved exemplars too: the last assistant turn is the answer.
    chats = [{"messages": [{"role": "user", "content": f"{a}+2="}, {"role": "assistant", "content": str(a + 2)}]}
             for a in range(20, 22)]
    _write_jsonl(tmp_path / "chats.jsonl", chats)
    data = _load(_config(few_shot=2, tasks=[{"name": "addition", "few_shot_data": "chats.jsonl"}]), tmp_path)
    assert _conversation(data.prompts[0])[:4] in (
        [{"role": "user", "content": "20+2="}, {"role": "assistant", "content": "22"},
         {"role": "user", "content": "21+2="}, {"role": "assistant", "content": "23"}],
        [{"role": "user", "content": "21+2="}, {"role": "assistant", "content": "23"},
         {"role": "user", "content": "20+2="}, {"role": "assistant", "content": "22"}])


def test_gsm8k_exemplars_come_from_the_train_file(tmp_path):
    train = [{"question": f"Train question {i}?", "answer": f"Work {i}.\n#### {i}"} for i in range(5)]
    test = [{"question": f"Test question {i}?", "answer": f"#### {i}"} for i in range(3)]
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "test.jsonl", test)
    config = _config(tasks=[{"name": "gsm8k", "few_shot_data": "train.jsonl"}], prompts="test.jsonl", few_shot=2)
    data = _load(config, tmp_path)
    assert [p["task"] for p in data.prompts] == ["gsm8k"] * 3
    for row in data.prompts:
        conversation = _conversation(row)
        assert conversation[-1]["content"].startswith("Test question") and len(conversation) == 5
        assert all(m["content"].startswith(("Train question", "Work")) for m in conversation[:4])
        assert conversation[1]["content"].endswith(f"#### {conversation[0]['content'].split()[-1].rstrip('?')}")


# --------------------------------------------------------------------------- bad input


def test_bad_few_shot_settings_are_errors_when_the_file_loads():
    for over, message in [
        ({"few_shot": -1}, r"stages\.eval\.few_shot: Input should be greater than or equal to 0"),
        ({"few_shot": 2, "tasks": ["gsm8k"], "prompts": "t.jsonl"},
         r"few_shot is 2, but task 'gsm8k' has no built-in training split; give its solved training examples as "
         r"tasks\[0\]\.few_shot_data"),
        ({"few_shot": 2, "tasks": [], "prompts": "t.jsonl"}, r"the eval has no tasks"),
        ({"tasks": [{"name": "addition", "few_shot_data": "train.jsonl"}]},
         r"tasks\[0\]\.few_shot_data applies with few_shot > 0"),
        ({"few_shot_seed": 3}, r"few_shot_seed applies with few_shot > 0"),
    ]:
        with pytest.raises(Exception, match=message):
            _config(**over)
    assert [d.path for d in _config(few_shot=1).few_shot_data] == ["builtin:addition/train"]
    assert _config().few_shot_data == []  # k = 0: no exemplar source is read or fingerprinted


def test_unsolved_data_and_too_many_exemplars_are_errors_naming_the_key(tmp_path):
    _write_jsonl(tmp_path / "questions.jsonl", [{"prompt": f"{a}+3="} for a in range(10, 20)])
    with pytest.raises(ValueError, match=r"stages\.eval\.tasks\[0\]\.few_shot_data: questions\.jsonl: none of its 10 "
                                         r"records has a solved answer"):
        _load(_config(few_shot=1, tasks=[{"name": "addition", "few_shot_data": "questions.jsonl"}]), tmp_path)
    with pytest.raises(ValueError, match=r"stages\.eval\.few_shot: 8000 exemplars per prompt, but "
                                         r"builtin:addition/train has only 7600"):
        _load(_config(few_shot=8000))
    limited = {"name": "addition", "few_shot_data": {"path": "builtin:addition/train", "limit": 5}}
    with pytest.raises(ValueError, match=r"6 exemplars per prompt, but builtin:addition/train has only 5"):
        _load(_config(few_shot=6, tasks=[limited]))


def test_prompts_longer_than_the_context_with_k_exemplars_are_errors():
    """The tiny base's context is 256 tokens; an addition exemplar is ~29 of them in its chat template."""
    from stages.tiny_base import build_char_tokenizer

    tokenizer = build_char_tokenizer(model_max_length=256)
    template = tokenizer.chat_template
    generation = {"max_new_tokens": 8}
    check_eval_data(_config(few_shot=7, generation=generation), str, KEY, tokenizer, 256, "the tiny base")
    with pytest.raises(ValueError, match=r"stages\.eval\.few_shot: held-out prompt 1 with 8 exemplars is \d+ tokens, "
                                         r"and with generation\.max_new_tokens \(8\) that is over the context of "
                                         r"the tiny base \(256 tokens\); 60 of 60 prompts"):
        check_eval_data(_config(few_shot=8, generation=generation), str, KEY, tokenizer, 256, "the tiny base")
    with pytest.raises(ValueError, match=r"stages\.eval\.generation\.max_new_tokens: .* with 0 exemplars"):
        check_eval_data(_config(generation={"max_new_tokens": 240}), str, KEY, tokenizer, 256, "the tiny base")
    # The eval's chat_template choice renders a copy: the caller's tokenizer keeps its own template.
    check_eval_data(_config(few_shot=2, chat_template="alpaca"), str, KEY, tokenizer, 256, "the tiny base")
    assert tokenizer.chat_template == template


# --------------------------------------------------------------------------- the records of k


def test_summary_and_responses_record_k():
    from stages.evaluate.generation import _output_row
    from stages.evaluate.stage import summarize

    config = _config(few_shot=2, max_prompts=6)
    data = _load(config)
    rows = [_output_row(p["row"], "gen", text=p["answer"], tokens=2, finished=True) for p in data.prompts]
    entry, responses = summarize(rows, data, config, None)
    assert entry["metrics"]["few_shot"] == 2 and entry["metrics"]["summary"]["few_shot"] == 2
    assert entry["metrics"]["tasks"]["addition"]["accuracy"] == 1.0  # graded against the held-out prompt only
    assert all(len(r["exemplars"]) == 2 and r["prompt"] == json.loads(p["messages"])[-1]["content"]
               for r, p in zip(responses, data.prompts))


@pytest.mark.slow
def test_a_few_shot_eval_through_ray_records_k(ray_cluster, tiny_base, tmp_path):
    from pipeline.runner import run_pipeline
    from stages.evaluate.stage import format_table

    k = 2
    eval_stage = {"kind": "eval", "models": ["base"], "tasks": ["addition"], "max_prompts": 8, "few_shot": k,
                  "generation": {"engine": "hf", "max_new_tokens": 4, "num_samples": 0, "batch_size": 8}}
    artifact = run_pipeline(make_spec(tmp_path, tiny_base, {"eval": eval_stage}), only=["eval"])["eval"]
    info = artifact.manifest["eval"]
    assert info["few_shot"] == {"k": k, "seed": 0, "sources": {"addition": "builtin:addition/train"}}
    base = artifact.metrics["base"]
    assert base["few_shot"] == k and base["summary"]["few_shot"] == k and base["tasks"]["addition"]["n"] == 8
    assert "few_shot" in format_table(artifact).splitlines()[1]
    key = info["models"]["base"]["key"]
    responses = [json.loads(line) for line in (artifact.path / "responses" / f"{key}.jsonl").read_text().splitlines()]
    train, test = _split_questions()
    assert len(responses) == 8 and all(len(r["exemplars"]) == k and set(r["exemplars"]) <= train for r in responses)
    assert {r["prompt"] for r in responses} <= test
