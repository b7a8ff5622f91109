"""GSM8K answer matching: a verifier/reward only (the data comes from the real GSM8K files).

Usage::

    from stages.tasks.gsm8k import answers_match, extract_gold, extract_prediction

    extract_gold("... so 9 * 120 = 1,080.\\n#### 1,080")   # Decimal('1080')
    extract_prediction("... The answer is 42.")            # Decimal('42')
    answers_match("#### -3", "so it drops by 3 degrees: -3")  # True

    task = get_task("gsm8k")             # from stages.tasks
    task.verify(prompt, response)        # prompt.answer: a GSM8K answer ("... #### 72") or a bare number

Gold: the text after the last ``#### `` (the whole string if there is none), thousands separators
removed, sign kept. Prediction: the first number after the last ``####`` in the response if it has
one, else the last number in the response. Numbers compare as decimals, so ``72``, ``72.0`` and
``72.00`` match; ``$`` and commas between digit groups are ignored.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import ClassVar

from stages.data.records import LoadedData, PromptExample
from stages.tasks.base import Task, check_kind_split

# Grouped thousands ("1,080", "12,345.5") first, so "1,080" is one number but "1,2,3" is three.
_NUMBER_RE = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MARKER = "####"


def _to_decimal(token: str) -> Decimal | None:
    try:
        return Decimal(token.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def _numbers(text: str) -> list[Decimal]:
    values = (_to_decimal(m.group(0)) for m in _NUMBER_RE.finditer(text))
    return [v for v in values if v is not None]


def extract_gold(answer: str) -> Decimal | None:
    """The gold number of a GSM8K answer (after the last ``####``), or None if there is none."""
    tail = answer.rsplit(_MARKER, 1)[-1]
    numbers = _numbers(tail)
    return numbers[0] if _MARKER in answer and numbers else (numbers[-1] if numbers else None)


def extract_prediction(response: str) -> Decimal | None:
    """The model's final number: first number after the last ``####``, else the last number at all."""
    if _MARKER in response:
        numbers = _numbers(response.rsplit(_MARKER, 1)[-1])
        if numbers:
            return numbers[0]
    numbers = _numbers(response)
    return numbers[-1] if numbers else None


def answers_match(gold_answer: str, response: str) -> bool:
    """True when the response's final number equals the gold answer's number."""
    gold, predicted = extract_gold(gold_answer), extract_prediction(response)
    return gold is not None and predicted is not None and gold == predicted


class GSM8KTask(Task):
    """Verifier for GSM8K-style prompts; ``prompt.answer`` holds the gold answer text or number."""

    name: ClassVar[str] = "gsm8k"
    version: ClassVar[str] = "gsm8k-match/1"
    has_generator: ClassVar[bool] = False

    def load(self, kind: str, split: str, limit: int | None = None) -> LoadedData:
        check_kind_split(kind, split)
        raise ValueError(
            "task 'gsm8k' has no built-in generator: load the real GSM8K files (e.g. the "
            "openai/gsm8k train/test jsonl with question/answer fields) through the data loader; "
            "the 'gsm8k' task only verifies and rewards responses"
        )

    def verify(self, prompt: PromptExample, response: str) -> bool:
        if prompt.answer is None:
            raise ValueError("gsm8k verify needs prompt.answer (the gold GSM8K answer)")
        return answers_match(prompt.answer, response)
