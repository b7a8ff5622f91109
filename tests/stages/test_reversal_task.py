"""The second built-in task, ``reversal``: exact answers, seeded disjoint splits, its verifier, and that it is a
data source everywhere ``addition`` is (``builtin:reversal``). Pure Python, no Ray."""

from __future__ import annotations

from collections import Counter

import pytest

from stages.data.records import Message, PromptExample
from stages.sources import fingerprint_source, load_records
from stages.tasks import TASKS, get_task
from stages.tasks.reversal import ReversalTask, parse_digits


def user_text(record) -> str:
    messages = record.messages if hasattr(record, "messages") else record.prompt
    return next(m.content for m in messages if m.role == "user")


def test_answers_are_the_exact_reversal():
    task = ReversalTask()
    sft = task.load("sft", "train", 300).records
    assert len(sft) == 300
    for record in sft:
        digits = parse_digits(record.messages)
        assert user_text(record) == f"rev {digits}=" and record.messages[-1].content == digits[::-1]
        assert 3 <= len(digits) <= 5
    assert task.verify(PromptExample((Message("user", "rev 120="),)), "021")  # leading zeros are kept
    assert not task.verify(PromptExample((Message("user", "rev 120="),)), "21")
    assert task.verify(PromptExample((Message("user", "rev 4821="),)), " 1284\n")
    assert not task.verify(PromptExample((Message("user", "rev 4821="),)), "4821")
    with pytest.raises(ValueError, match="not a reversal prompt"):
        parse_digits(PromptExample((Message("user", "47+38="),)))


def test_splits_are_seeded_disjoint_and_stratified():
    task = ReversalTask()
    test = task.load("prompt", "test").records
    assert len(test) == 500 and len({user_text(p) for p in test}) == 500
    assert all(task.verify(p, p.answer) and p.answer == parse_digits(p)[::-1] for p in test)
    # Equal share of each length (500 = 166 + 166 + 168).
    assert Counter(task.category(p) for p in test) == {"3_digits": 166, "4_digits": 166, "5_digits": 168}
    held_out = {user_text(p) for p in test}
    for kind in ("sft", "preference", "kto", "prompt"):
        train = {user_text(r) for r in task.load(kind, "train", 2000).records}
        assert not train & held_out, f"{kind} train records reuse held-out problems"
    # The test split depends on test_seed only; the train stream on seed.
    assert ReversalTask(seed=5).load("prompt", "test").records == test
    assert ReversalTask(test_seed=5).load("prompt", "test").records != test
    assert ReversalTask(seed=5).load("sft", "train", 50).records != task.load("sft", "train", 50).records
    # limit=n is the first n records of the full list.
    assert task.load("sft", "train", 40).records == task.load("sft", "train", 400).records[:40]
    prompts = task.load("prompt", "train", 300).records
    assert len({user_text(p) for p in prompts}) == 300  # distinct


def test_pairs_kto_and_the_flawed_demonstrator():
    task = ReversalTask()
    pairs = task.load("preference", "train", 400).records
    for pair in pairs:
        digits = parse_digits(pair.prompt)
        assert pair.chosen[0].content == digits[::-1] and pair.rejected[0].content != digits[::-1]
        assert len(pair.rejected[0].content) == len(digits)
    kto = task.load("kto", "test", 10).records
    assert [k.label for k in kto] == [True, False] * 5
    flawed = ReversalTask(flaw_rate=1.0).load("sft", "train", 200).records
    assert all(r.messages[-1].content == parse_digits(r.messages) for r in flawed)  # the unreversed copy


def test_registered_as_a_builtin_source_like_addition():
    assert TASKS["reversal"] is ReversalTask and get_task("reversal").has_generator
    data = load_records("builtin:reversal/test", "prompt", limit=5)
    assert data.format == "builtin:reversal" and len(data.records) == 5
    assert data.records == get_task("reversal").load("prompt", "test", 5).records
    assert fingerprint_source("builtin:reversal") != fingerprint_source("builtin:addition")
    assert fingerprint_source("builtin:reversal") != fingerprint_source("builtin:reversal/test")
    assert get_task("reversal").fingerprint() != get_task("reversal", max_digits=6).fingerprint()
    assert get_task("reversal").reward(data.records[0], data.records[0].answer) == 1.0
    with pytest.raises(ValueError, match="min_digits"):
        ReversalTask(min_digits=4, max_digits=3)
