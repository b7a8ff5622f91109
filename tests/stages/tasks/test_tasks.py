"""Built-in tasks: the addition generator (determinism, splits, the flaw) and the verifiers."""

from __future__ import annotations

from decimal import Decimal

import pytest

from stages.data.records import KTOExample, Message, PreferencePair, PromptExample, SFTExample
from stages.tasks import TASKS, get_task
from stages.tasks.addition import AdditionTask, Problem, parse_problem
from stages.tasks.gsm8k import answers_match, extract_gold, extract_prediction


def prompt(text: str, answer: str | None = None) -> PromptExample:
    return PromptExample((Message("user", text),), answer)


@pytest.fixture(scope="module")
def task() -> AdditionTask:
    return AdditionTask(n_sft=4000, n_preference=2000, n_kto=1000)


# --- registry -----------------------------------------------------------------------------


def test_registry_and_unknown_name():
    assert {"addition", "gsm8k"} <= set(TASKS)
    assert isinstance(get_task("addition", flaw_rate=0.5), AdditionTask)
    with pytest.raises(ValueError, match="addition.*gsm8k"):
        get_task("nope")


def test_fingerprint_follows_parameters():
    assert AdditionTask().fingerprint() == AdditionTask().fingerprint()
    assert AdditionTask().fingerprint() != AdditionTask(flaw_rate=0.5).fingerprint()
    assert AdditionTask().fingerprint().startswith(AdditionTask.version)


def test_unknown_kind_or_split(task):
    with pytest.raises(ValueError, match="valid kinds"):
        task.load("rl", "train")
    with pytest.raises(ValueError, match="valid splits"):
        task.load("sft", "dev")


# --- addition data ------------------------------------------------------------------------


def test_formats_and_record_types(task):
    sft = task.load("sft", "train", 5).records[0]
    assert isinstance(sft, SFTExample)
    user, answer = sft.messages
    assert user.role == "user" and parse_problem(sft.messages[:1]).prompt_text() == user.content
    assert answer.role == "assistant" and answer.content.isdigit()
    assert isinstance(task.load("preference", "train", 1).records[0], PreferencePair)
    assert isinstance(task.load("kto", "train", 1).records[0], KTOExample)
    p = task.load("prompt", "test", 1).records[0]
    assert p.answer == str(parse_problem(p).total)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = AdditionTask(), AdditionTask(), AdditionTask(seed=1)
    for kind in ("sft", "preference", "kto", "prompt"):
        assert a.load(kind, "train", 300).records == b.load(kind, "train", 300).records
        assert a.load(kind, "train", 300).records != c.load(kind, "train", 300).records
    # The held-out split does not move with the training seed.
    assert a.load("prompt", "test", None).records == c.load("prompt", "test", None).records


def test_limit_is_a_prefix(task):
    full = task.load("sft", "train", None).records
    assert len(full) == 4000
    assert task.load("sft", "train", 100).records == full[:100]


def test_train_and_test_problems_are_disjoint(task):
    train, test = task.splits()
    assert len(test) == 500 and len(set(test)) == 500
    assert not set(train) & set(test)
    assert len(train) + len(test) == 90 * 90
    # Carry share of the test split matches the population (45%).
    assert sum(p.carry for p in test) == 225
    test_problems = {parse_problem(p) for p in task.load("prompt", "test", None).records}
    assert test_problems == set(test)
    for kind in ("sft", "preference", "kto", "prompt"):
        for record in task.load(kind, "train", None).records:
            messages = record.messages[:-1] if kind == "sft" else record.prompt
            assert parse_problem(messages) not in test_problems


def test_demonstrator_drops_the_carry_at_flaw_rate(task):
    wrong = carry = 0
    for example in task.load("sft", "train", None).records:
        problem = parse_problem(example.messages[:-1])
        given = int(example.messages[-1].content)
        if problem.carry:
            carry += 1
            assert given in (problem.total, problem.total - 10)
            wrong += given != problem.total
        else:
            assert given == problem.total
    assert abs(wrong / carry - 0.65) < 0.04


def test_flaw_example():
    assert Problem(47, 38).dropped_carry_total == 75
    assert Problem(57, 68).dropped_carry_total == 115
    assert not Problem(42, 31).carry and Problem(42, 31).dropped_carry_total == 73


def test_preference_pairs_cover_carry_and_no_carry(task):
    pairs = task.load("preference", "train", None).records
    kinds = set()
    for pair in pairs:
        problem = parse_problem(pair.prompt)
        chosen, rejected = int(pair.chosen[0].content), int(pair.rejected[0].content)
        assert chosen == problem.total and rejected != chosen
        if problem.carry:
            assert rejected == problem.total - 10
        kinds.add(problem.carry)
    carry_share = sum(parse_problem(p.prompt).carry for p in pairs) / len(pairs)
    assert kinds == {True, False} and 0.35 < carry_share < 0.55


def test_kto_labels(task):
    for example in task.load("kto", "train", None).records:
        correct = int(example.completion[0].content) == parse_problem(example.prompt).total
        assert example.label == correct


# --- verifiers ----------------------------------------------------------------------------


def test_addition_verify_reward_and_category(task):
    p = prompt("47+38=", "85")
    assert task.verify(p, "85") and task.verify(p, " 85\n")
    assert not task.verify(p, "75") and not task.verify(p, "85.") and not task.verify(p, "")
    assert task.reward(p, "85") == 1.0 and task.reward(p, "75") == 0.0
    assert task.category(p) == "carry" and task.category(prompt("42+31=")) == "no_carry"
    assert task.verify(prompt("42+31="), "73")  # no answer stored: computed from the prompt


def test_gsm8k_gold_extraction():
    assert extract_gold("9 * 120 = <<9*120=1080>>1080 dollars.\n#### 1,080") == Decimal(1080)
    assert extract_gold("It cools by 3.\n#### -3") == Decimal(-3)
    assert extract_gold("#### 72") == Decimal(72)
    assert extract_gold("72") == Decimal(72)


def test_gsm8k_prediction_extraction():
    assert extract_prediction("So 5 + 3 = 8 and then 8 * 2 = 16.") == Decimal(16)
    assert extract_prediction("#### 1,080 (checked 3 times)") == Decimal(1080)
    assert extract_prediction("The answer is $1,080.") == Decimal(1080)
    assert extract_prediction("1,2,3") == Decimal(3)
    assert extract_prediction("no number") is None


def test_gsm8k_verify():
    gsm8k = get_task("gsm8k")
    p = prompt("How much?", "She pays 9 * 120 = 1080.\n#### 1,080")
    assert gsm8k.verify(p, "9*120 is 1080.") and gsm8k.verify(p, "#### 1080.00")
    assert not gsm8k.verify(p, "1,000 or so") and not gsm8k.verify(p, "I don't know")
    assert gsm8k.reward(prompt("t?", "#### -3"), "The change is -3 degrees") == 1.0
    assert answers_match("#### -3", "3") is False
    with pytest.raises(ValueError, match="real GSM8K"):
        gsm8k.load("prompt", "train")
