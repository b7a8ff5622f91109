"""Grading a model's responses with a verifier task: one implementation for the eval stage, PPO's
held-out accuracy and ``make demo``. Pure functions (no torch, no Ray).

    correct, categories = grade(task, examples, responses)
    verifier_accuracy(correct, categories)
    # {"accuracy": 0.9, "ci": [0.83, 0.94], "n": 200, "correct": 180,
    #  "categories": {"carry": {...}, "no_carry": {...}}}

Intervals are Wilson score intervals (95%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from stages.tasks.base import Task

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion; (0, 1) for n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # The bounds are exactly 0 / 1 at p = 0 / 1 (floating point would leave 1e-16 off).
    return (0.0 if successes <= 0 else max(0.0, centre - half)), (1.0 if successes >= n else min(1.0, centre + half))


def accuracy(correct: Sequence[bool]) -> dict:
    """Fraction correct with its Wilson 95% interval."""
    n, k = len(correct), sum(bool(c) for c in correct)
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else math.nan, "ci": [low, high], "n": n, "correct": k}


def accuracy_by_category(correct: Sequence[bool], categories: Sequence[str]) -> dict[str, dict]:
    """:func:`accuracy` per category, categories in sorted order."""
    groups: dict[str, list[bool]] = {}
    for ok, category in zip(correct, categories):
        groups.setdefault(category, []).append(ok)
    return {category: accuracy(groups[category]) for category in sorted(groups)}


def grade(task: Task, examples: Sequence, responses: Sequence[str]) -> tuple[list[bool], list[str]]:
    """Whether each response is correct for its example, and each example's task category."""
    correct = [bool(task.verify(example, response)) for example, response in zip(examples, responses, strict=True)]
    return correct, [task.category(example) for example in examples]


def verifier_accuracy(correct: Sequence[bool], categories: Sequence[str]) -> dict:
    """:func:`accuracy` overall and per category (``categories``)."""
    return {**accuracy(correct), "categories": accuracy_by_category(correct, categories)}
