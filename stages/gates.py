"""Quality gates: conditions on a stage's metrics, checked when the stage completes (``gate:``).

    reward:
      gate: ["heldout_accuracy >= 0.65"]
    eval:
      gate: ["accuracy[dpo] >= accuracy[sft]", "kl[ppo] < 2.0"]

A condition is ``LEFT OP RIGHT`` with OP one of ``>= > <= < == !=`` and each side a number or a
metric. A metric is a name from the stage's manifest metrics (``final_loss``, ``heldout_accuracy``);
on an eval stage it is a column of one evaluated model's summary row, ``NAME[model]``, where
``accuracy`` stands for ``accuracy/<task>`` when the eval has one task. Which names a stage kind
reports is its config's business (``StageConfig.gate_metric_problem``); this module parses and checks.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne,
}
_CONDITION = re.compile(r"^\s*(?P<left>[^<>=!\s]+)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<right>[^<>=!\s]+)\s*$")
_METRIC = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_./-]*)(\[(?P<model>[a-z][a-z0-9_-]*)\])?$")


class GateError(ValueError):
    """A condition that cannot be parsed or names a metric the stage does not report."""


@dataclass(frozen=True)
class Metric:
    name: str
    model: str | None = None

    def __str__(self) -> str:
        return f"{self.name}[{self.model}]" if self.model else self.name


Operand = Metric | float


@dataclass(frozen=True)
class Condition:
    text: str
    left: Operand
    op: str
    right: Operand

    def metrics(self) -> list[Metric]:
        return [side for side in (self.left, self.right) if isinstance(side, Metric)]


@dataclass(frozen=True)
class Check:
    """One condition's outcome, as recorded in the manifest and printed when it blocks a stage."""

    condition: str
    left: float | None
    right: float | None
    passed: bool
    problem: str | None = None  # a metric the finished stage did not report

    def describe(self, condition: Condition) -> str:
        if self.problem:
            return f"{self.condition}: {self.problem}"
        sides = [f"{side} = {_number(value)}" for side, value in ((condition.left, self.left),
                                                                     (condition.right, self.right))
                 if isinstance(side, Metric)]
        threshold = condition.right if isinstance(condition.right, Metric) else _number(self.right)
        return f"{', '.join(sides)}; the gate needs {condition.left} {condition.op} {threshold}"

    def as_dict(self) -> dict:
        return {"condition": self.condition, "left": self.left, "right": self.right, "passed": self.passed,
                **({"problem": self.problem} if self.problem else {})}


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def parse_operand(text: str) -> Operand:
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise GateError(f"{text!r} is not a finite number")
        return value
    match = _METRIC.fullmatch(text)
    if not match:
        raise GateError(f"{text!r} is neither a number nor a metric (NAME, or NAME[model] on an eval stage)")
    return Metric(match["name"], match["model"])


def parse_condition(text: str) -> Condition:
    """``"heldout_accuracy >= 0.65"`` -> a :class:`Condition`; a :class:`GateError` says what is wrong."""
    if not isinstance(text, str):
        raise GateError(f"expected a condition such as 'heldout_accuracy >= 0.65', got {text!r}")
    match = _CONDITION.fullmatch(text)
    if not match:
        raise GateError(f"{text!r} is not a condition: expected 'METRIC OP VALUE' with OP one of "
                        f"{' '.join(OPERATORS)}, e.g. 'heldout_accuracy >= 0.65'")
    condition = Condition(text.strip(), parse_operand(match["left"]), match["op"], parse_operand(match["right"]))
    if not condition.metrics():
        raise GateError(f"{text!r} compares two numbers: name a metric of the stage")
    return condition


def check(condition: Condition, lookup: Callable[[Metric], float | None]) -> Check:
    """Evaluate one condition; ``lookup`` gives a metric's value, None when the stage did not report it."""
    values: list[float | None] = []
    for side in (condition.left, condition.right):
        if isinstance(side, Metric):
            value = lookup(side)
            if value is None or not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value):
                return Check(condition.text, None, None, False,
                             problem=f"{side} was not reported by the stage (or is not a finite number)")
            values.append(float(value))
        else:
            values.append(side)
    left, right = values
    return Check(condition.text, left, right, OPERATORS[condition.op](left, right))


@dataclass
class GateResult:
    """A stage's gate: every check; ``passed`` when all hold."""

    checks: list[Check]
    conditions: list[Condition]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [c.describe(cond) for c, cond in zip(self.checks, self.conditions) if not c.passed]

    def as_dict(self, ignored: bool = False) -> dict:
        return {"passed": self.passed, "ignored": ignored and not self.passed,
                "checks": [c.as_dict() for c in self.checks]}


def evaluate_gate(conditions: list[str], lookup: Callable[[Metric], float | None]) -> GateResult:
    parsed = [parse_condition(text) for text in conditions]
    return GateResult([check(c, lookup) for c in parsed], parsed)
