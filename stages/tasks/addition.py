"""The built-in verifiable task: 2-digit addition with a deliberately flawed demonstrator.

Usage::

    task = AdditionTask()                       # defaults as in STACK.md's calibration
    sft = task.load("sft", "train", None)       # 32k demonstrations from the flawed demonstrator
    pairs = task.load("preference", "train", None)
    test = task.load("prompt", "test", None)    # 500 held-out prompts, answer = correct sum
    task.verify(test.records[0], "85"); task.category(test.records[0])  # "carry" / "no_carry"

Text formats (exact, no spaces):
  * user message: ``f"{a}+{b}="``, e.g. ``47+38=``; an optional system message comes first;
  * assistant message: the sum in decimal digits, e.g. ``85``.

Problems are all pairs ``a, b`` in 10..99 (8100). A problem *needs a carry* when its units digits sum
to 10 or more (45% of problems). The held-out test split is a stratified sample (``n_test``, default
500, carry share 45%) drawn with ``test_seed``; it does not depend on ``seed``, so every run is
scored on the same prompts. Train records only use the other 7600 problems.

The demonstrator drops the carry (answers ``a+b-10``, e.g. 47+38 -> 75) with probability
``flaw_rate`` on carry problems and is correct otherwise, so SFT on its demonstrations learns the
flaw. Preference pairs: chosen = correct; rejected = the dropped-carry answer on carry problems and,
on no-carry problems, a plausible wrong answer (a phantom carry +10, -10, or the units digit off by
one) so that pairs also cover the cases the demonstrator gets right (carry-only pairs over-correct).
KTO examples are both halves of such pairs: chosen labelled True, rejected False.

Every record list is generated from its own seeded stream per (kind, split), one record after the
other, so ``limit=n`` returns exactly the first n records of the full list.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

from stages.data.records import (
    KTOExample,
    LoadedData,
    Message,
    PreferencePair,
    PromptExample,
    SFTExample,
)
from stages.tasks.base import Task, check_kind_split, last_user_content

LOW, HIGH = 10, 99  # operand range, inclusive
_PROMPT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


@dataclass(frozen=True, order=True)
class Problem:
    """One addition problem ``a + b``."""

    a: int
    b: int

    @property
    def total(self) -> int:
        return self.a + self.b

    @property
    def carry(self) -> bool:
        """True when the units digits sum to 10 or more."""
        return self.a % 10 + self.b % 10 >= 10

    @property
    def dropped_carry_total(self) -> int:
        """The demonstrator's flawed answer: the units carry is never added to the tens."""
        return self.total - 10 if self.carry else self.total

    def prompt_text(self) -> str:
        return f"{self.a}+{self.b}="


def all_problems() -> list[Problem]:
    """Every problem, in (a, b) order."""
    return [Problem(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


def parse_problem(prompt: PromptExample | tuple) -> Problem:
    """The problem a prompt asks (from its last user message); ValueError if it is not ``a+b=``."""
    text = last_user_content(prompt)
    match = _PROMPT_RE.match(text)
    if not match:
        raise ValueError(f"not an addition prompt: {text!r}")
    return Problem(int(match.group(1)), int(match.group(2)))


def is_carry(prompt: PromptExample) -> bool:
    """Whether the prompt's problem needs a carry."""
    return parse_problem(prompt).carry


def plausible_wrong_total(problem: Problem, rng: random.Random) -> int:
    """A wrong answer a careless adder might give: phantom carry (+10), -10, or units digit off by one."""
    total = problem.total
    # The units-digit errors stay within the same tens (19 -> 18, never 20) so they differ in one digit.
    units_down = total - 1 if total % 10 else total + 1
    units_up = total + 1 if total % 10 != 9 else total - 1
    candidates = sorted({total + 10, total - 10, units_down, units_up} - {total})
    return rng.choice(candidates)


class AdditionTask(Task):
    """2-digit addition with a flawed demonstrator (see the module docstring)."""

    name: ClassVar[str] = "addition"
    version: ClassVar[str] = "addition/1"
    categories: ClassVar[tuple[str, ...]] = ("carry", "no_carry")

    def __init__(
        self,
        *,
        flaw_rate: float = 0.65,
        n_sft: int = 32000,
        n_preference: int = 5000,
        n_kto: int = 10000,
        n_test: int = 500,
        seed: int = 0,
        test_seed: int = 1234,
        system: str | None = None,
    ) -> None:
        if not 0.0 <= flaw_rate <= 1.0:
            raise ValueError(f"flaw_rate must be in [0, 1], got {flaw_rate}")
        if not 0 < n_test < len(all_problems()):
            raise ValueError(f"n_test must be in 1..{len(all_problems()) - 1}, got {n_test}")
        self.flaw_rate = flaw_rate
        self.n_sft, self.n_preference, self.n_kto, self.n_test = n_sft, n_preference, n_kto, n_test
        self.seed, self.test_seed = seed, test_seed
        self.system = system
        self._splits: tuple[list[Problem], list[Problem]] | None = None

    def params(self) -> dict:
        return {
            "flaw_rate": self.flaw_rate,
            "n_sft": self.n_sft,
            "n_preference": self.n_preference,
            "n_kto": self.n_kto,
            "n_test": self.n_test,
            "seed": self.seed,
            "test_seed": self.test_seed,
            "system": self.system,
        }

    # --- problems and splits ---------------------------------------------------------------

    def splits(self) -> tuple[list[Problem], list[Problem]]:
        """``(train_problems, test_problems)``: disjoint; test is stratified by carry, train sorted."""
        if self._splits is None:
            problems = all_problems()
            carry = [p for p in problems if p.carry]
            plain = [p for p in problems if not p.carry]
            rng = random.Random(f"addition/test-split/{self.test_seed}")
            n_carry = round(self.n_test * len(carry) / len(problems))
            test = rng.sample(carry, n_carry) + rng.sample(plain, self.n_test - n_carry)
            rng.shuffle(test)
            held_out = set(test)
            self._splits = ([p for p in problems if p not in held_out], test)
        return self._splits

    def _problem_stream(self, split: str, stream: str):
        """Problems to build records from: random draws from train, or each test problem once."""
        train, test = self.splits()
        if split == "test":
            yield from test
            return
        rng = random.Random(f"addition/{stream}/problems/{self.seed}")
        while True:
            yield rng.choice(train)

    # --- text ------------------------------------------------------------------------------

    def prompt_messages(self, problem: Problem) -> tuple[Message, ...]:
        head = (Message("system", self.system),) if self.system else ()
        return (*head, Message("user", problem.prompt_text()))

    def demonstrate(self, problem: Problem, rng: random.Random) -> int:
        """The flawed demonstrator's answer: drops the carry with probability ``flaw_rate``."""
        if problem.carry and rng.random() < self.flaw_rate:
            return problem.dropped_carry_total
        return problem.total

    def rejected_total(self, problem: Problem, rng: random.Random) -> int:
        """The rejected answer of a pair: the dropped carry, or a plausible error on no-carry problems."""
        return problem.dropped_carry_total if problem.carry else plausible_wrong_total(problem, rng)

    # --- record generators -----------------------------------------------------------------

    def _count(self, kind: str, split: str, limit: int | None) -> int:
        defaults = {"sft": self.n_sft, "preference": self.n_preference, "kto": self.n_kto}
        train, test = self.splits()
        if split == "test":
            n = self.n_test * 2 if kind == "kto" else self.n_test
        else:
            n = len(train) if kind == "prompt" else defaults[kind]
        return n if limit is None else max(0, min(n, limit))

    def sft_examples(self, split: str, n: int) -> list[SFTExample]:
        rng = random.Random(f"addition/sft/{split}/flaw/{self.seed}")
        problems = self._problem_stream(split, "sft")
        out = []
        for _ in range(n):
            problem = next(problems)
            answer = Message("assistant", str(self.demonstrate(problem, rng)))
            out.append(SFTExample((*self.prompt_messages(problem), answer)))
        return out

    def preference_pairs(self, split: str, n: int, stream: str = "preference") -> list[PreferencePair]:
        rng = random.Random(f"addition/{stream}/{split}/rejected/{self.seed}")
        problems = self._problem_stream(split, stream)
        out = []
        for _ in range(n):
            problem = next(problems)
            out.append(
                PreferencePair(
                    prompt=self.prompt_messages(problem),
                    chosen=(Message("assistant", str(problem.total)),),
                    rejected=(Message("assistant", str(self.rejected_total(problem, rng))),),
                )
            )
        return out

    def kto_examples(self, split: str, n: int) -> list[KTOExample]:
        pairs = self.preference_pairs(split, (n + 1) // 2, stream="kto")
        out = []
        for pair in pairs:
            out.append(KTOExample(pair.prompt, pair.chosen, True))
            out.append(KTOExample(pair.prompt, pair.rejected, False))
        return out[:n]

    def prompt_examples(self, split: str, n: int) -> list[PromptExample]:
        train, test = self.splits()
        problems = list(test)
        if split == "train":
            # A seeded permutation: any prefix is a set of distinct problems.
            problems = list(train)
            random.Random(f"addition/prompt/train/{self.seed}").shuffle(problems)
        return [PromptExample(self.prompt_messages(p), str(p.total)) for p in problems[:n]]

    # --- Task API --------------------------------------------------------------------------

    def load(self, kind: str, split: str, limit: int | None = None) -> LoadedData:
        check_kind_split(kind, split)
        n = self._count(kind, split, limit)
        builders = {
            "sft": self.sft_examples,
            "preference": self.preference_pairs,
            "kto": self.kto_examples,
            "prompt": self.prompt_examples,
        }
        records = builders[kind](split, n)
        return LoadedData(records=records, format=f"builtin:{self.name}", files=[], read=len(records))

    def verify(self, prompt: PromptExample, response: str) -> bool:
        """Exact match of the stripped response with the correct sum (``prompt.answer`` if set)."""
        answer = prompt.answer if prompt.answer is not None else str(parse_problem(prompt).total)
        return response.strip() == answer.strip()

    def category(self, prompt: PromptExample) -> str:
        return "carry" if is_carry(prompt) else "no_carry"
