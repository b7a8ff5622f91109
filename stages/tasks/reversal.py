"""The second built-in verifiable task: reverse a string of digits (``builtin:reversal``).

Usage::

    task = ReversalTask()
    sft = task.load("sft", "train", None)        # 32k demonstrations
    test = task.load("prompt", "test", None)     # 500 held-out prompts, answer = the reversed digits
    task.verify(test.records[0], "1284"); task.category(test.records[0])  # "3_digits" .. "5_digits"

Text formats (exact):
  * user message: ``f"rev {digits}="``, e.g. ``rev 4821=``; an optional system message comes first;
  * assistant message: the digits in reverse order, e.g. ``1284`` (leading zeros kept: ``rev 120=`` -> ``021``).

It is made to interfere with ``addition``: the same characters in and out (digits, then ``=``) and answers
of the same length, but a different map from prompt to answer, so training on one task moves the other.

Problems are all digit strings of ``min_digits``..``max_digits`` characters (defaults 3..5: 111,000 problems).
The held-out test split (``n_test``, default 500) has the same number of problems of each length (the
remainder to the longest), drawn with ``test_seed`` only, so every run is scored on the same prompts; train
records are seeded draws (``seed``) from the other problems. The category of a prompt is its length.

The demonstrator copies the digits unreversed (the tiny base's pretrained echo) with probability
``flaw_rate`` (default 0: correct demonstrations). Preference pairs: chosen = reversed; rejected = the
unreversed copy, or for a palindrome (whose copy is right) the reversal with one digit changed. KTO
examples are both halves of such pairs. As in ``addition``, every record list comes from its own seeded
stream per (kind, split), so ``limit=n`` returns the first n records of the full list.
"""

from __future__ import annotations

import random
import re
from typing import ClassVar

from stages.data.records import KTOExample, LoadedData, Message, PreferencePair, PromptExample, SFTExample
from stages.tasks.base import Task, check_kind_split, last_user_content

_PROMPT_RE = re.compile(r"^\s*rev\s+(\d+)\s*=\s*$")


def parse_digits(prompt: PromptExample | tuple) -> str:
    """The digit string a prompt asks to reverse; ValueError if it is not ``rev <digits>=``."""
    text = last_user_content(prompt)
    match = _PROMPT_RE.match(text)
    if not match:
        raise ValueError(f"not a reversal prompt: {text!r}")
    return match.group(1)


def wrong_reversal(digits: str, rng: random.Random) -> str:
    """A plausible wrong answer: the unreversed copy, or (for a palindrome) the reversal with one digit changed."""
    answer = digits[::-1]
    if digits != answer:
        return digits
    i = rng.randrange(len(answer))
    changed = str((int(answer[i]) + rng.randrange(1, 10)) % 10)
    return answer[:i] + changed + answer[i + 1:]


class ReversalTask(Task):
    """Reverse a string of digits (see the module docstring)."""

    name: ClassVar[str] = "reversal"
    version: ClassVar[str] = "reversal/1"

    def __init__(
        self,
        *,
        min_digits: int = 3,
        max_digits: int = 5,
        flaw_rate: float = 0.0,
        n_sft: int = 32000,
        n_preference: int = 5000,
        n_kto: int = 10000,
        n_test: int = 500,
        seed: int = 0,
        test_seed: int = 1234,
        system: str | None = None,
    ) -> None:
        if not 1 <= min_digits <= max_digits <= 9:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 9, got {min_digits}..{max_digits}")
        if not 0.0 <= flaw_rate <= 1.0:
            raise ValueError(f"flaw_rate must be in [0, 1], got {flaw_rate}")
        lengths = range(min_digits, max_digits + 1)
        if not 0 < n_test <= min(10 ** n for n in lengths) // 2 * len(lengths):
            raise ValueError(f"n_test must leave most problems of each length for training, got {n_test}")
        self.min_digits, self.max_digits, self.flaw_rate = min_digits, max_digits, flaw_rate
        self.n_sft, self.n_preference, self.n_kto, self.n_test = n_sft, n_preference, n_kto, n_test
        self.seed, self.test_seed, self.system = seed, test_seed, system
        self.categories = tuple(f"{n}_digits" for n in lengths)
        self._test: list[str] | None = None

    def params(self) -> dict:
        return {"min_digits": self.min_digits, "max_digits": self.max_digits, "flaw_rate": self.flaw_rate,
                "n_sft": self.n_sft, "n_preference": self.n_preference, "n_kto": self.n_kto, "n_test": self.n_test,
                "seed": self.seed, "test_seed": self.test_seed, "system": self.system}

    # --- problems and splits ---------------------------------------------------------------

    def _random_digits(self, rng: random.Random, length: int | None = None) -> str:
        # Each length equally often (uniform over all strings would make nearly all of them max_digits long).
        length = length or rng.randint(self.min_digits, self.max_digits)
        return "".join(rng.choice("0123456789") for _ in range(length))

    def test_problems(self) -> list[str]:
        """The held-out digit strings, in a fixed order: the same count of each length, from ``test_seed``."""
        if self._test is None:
            rng = random.Random(f"reversal/test-split/{self.test_seed}")
            lengths = list(range(self.min_digits, self.max_digits + 1))
            per_length = [self.n_test // len(lengths)] * len(lengths)
            per_length[-1] += self.n_test - sum(per_length)
            test: list[str] = []
            for length, count in zip(lengths, per_length):
                chosen: set[str] = set()
                while len(chosen) < count:
                    chosen.add(self._random_digits(rng, length))
                test += sorted(chosen)
            rng.shuffle(test)
            self._test = test
        return self._test

    def _problem_stream(self, split: str, stream: str):
        """Digit strings to build records from: seeded draws outside the test split, or each test problem once."""
        if split == "test":
            yield from self.test_problems()
            return
        held_out = set(self.test_problems())
        rng = random.Random(f"reversal/{stream}/problems/{self.seed}")
        while True:
            digits = self._random_digits(rng)
            if digits not in held_out:
                yield digits

    # --- record generators -----------------------------------------------------------------

    def prompt_messages(self, digits: str) -> tuple[Message, ...]:
        head = (Message("system", self.system),) if self.system else ()
        return (*head, Message("user", f"rev {digits}="))

    def _count(self, kind: str, split: str, limit: int | None) -> int:
        if split == "test":
            n = self.n_test * 2 if kind == "kto" else self.n_test
        else:
            n = {"sft": self.n_sft, "preference": self.n_preference, "kto": self.n_kto, "prompt": self.n_sft}[kind]
        return n if limit is None else max(0, min(n, limit))

    def sft_examples(self, split: str, n: int) -> list[SFTExample]:
        rng = random.Random(f"reversal/sft/{split}/flaw/{self.seed}")
        problems = self._problem_stream(split, "sft")
        out = []
        for _ in range(n):
            digits = next(problems)
            answer = digits if rng.random() < self.flaw_rate else digits[::-1]
            out.append(SFTExample((*self.prompt_messages(digits), Message("assistant", answer))))
        return out

    def preference_pairs(self, split: str, n: int, stream: str = "preference") -> list[PreferencePair]:
        rng = random.Random(f"reversal/{stream}/{split}/rejected/{self.seed}")
        problems = self._problem_stream(split, stream)
        out = []
        for _ in range(n):
            digits = next(problems)
            out.append(PreferencePair(prompt=self.prompt_messages(digits),
                                      chosen=(Message("assistant", digits[::-1]),),
                                      rejected=(Message("assistant", wrong_reversal(digits, rng)),)))
        return out

    def kto_examples(self, split: str, n: int) -> list[KTOExample]:
        out = []
        for pair in self.preference_pairs(split, (n + 1) // 2, stream="kto"):
            out += [KTOExample(pair.prompt, pair.chosen, True), KTOExample(pair.prompt, pair.rejected, False)]
        return out[:n]

    def prompt_examples(self, split: str, n: int) -> list[PromptExample]:
        if split == "test":
            problems = self.test_problems()[:n]
        else:  # distinct train problems in draw order
            seen: dict[str, None] = {}
            stream = self._problem_stream("train", "prompt")
            while len(seen) < n:
                seen.setdefault(next(stream))
            problems = list(seen)
        return [PromptExample(self.prompt_messages(d), d[::-1]) for d in problems]

    # --- Task API --------------------------------------------------------------------------

    def load(self, kind: str, split: str, limit: int | None = None) -> LoadedData:
        check_kind_split(kind, split)
        n = self._count(kind, split, limit)
        builders = {"sft": self.sft_examples, "preference": self.preference_pairs, "kto": self.kto_examples,
                    "prompt": self.prompt_examples}
        records = builders[kind](split, n)
        return LoadedData(records=records, format=f"builtin:{self.name}", files=[], read=len(records))

    def verify(self, prompt: PromptExample, response: str) -> bool:
        """Exact match of the stripped response with the reversed digits (``prompt.answer`` if set)."""
        answer = prompt.answer if prompt.answer is not None else parse_digits(prompt)[::-1]
        return response.strip() == answer.strip()

    def category(self, prompt: PromptExample) -> str:
        return f"{len(parse_digits(prompt))}_digits"
