"""The ``Task`` interface: a built-in data generator plus a verifier/reward for its prompts.

Usage::

    task = get_task("addition")            # from stages.tasks
    data = task.load("sft", "train", limit=1000)   # -> LoadedData of SFTExample
    prompts = task.load("prompt", "test", None).records
    ok = task.verify(prompts[0], "85")     # exact check of a model response
    r = task.reward(prompts[0], "85")      # 1.0 / 0.0
    task.category(prompts[0])              # e.g. "carry" / "no_carry", for per-category accuracy

``version`` names the generator and verifier logic; ``fingerprint()`` adds the task's parameters, so
it changes whenever the generated data or the scoring could change (it goes into cache keys).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import ClassVar

from stages.data.records import RECORD_TYPES, Conversation, LoadedData, PromptExample

KINDS = tuple(RECORD_TYPES)  # sft, preference, prompt, kto
SPLITS = ("train", "test")


class Task(ABC):
    """A verifiable task. Subclasses set ``name`` and ``version`` and implement ``load`` and ``verify``."""

    name: ClassVar[str]
    version: ClassVar[str]
    has_generator: ClassVar[bool] = True  # False: verifier only, the data comes from files
    categories: ClassVar[tuple[str, ...]] = ("all",)

    @abstractmethod
    def load(self, kind: str, split: str, limit: int | None = None) -> LoadedData:
        """Records of ``kind`` (sft/preference/prompt/kto) for ``split`` (train/test), at most ``limit``."""

    @abstractmethod
    def verify(self, prompt: PromptExample, response: str) -> bool:
        """Whether ``response`` (the assistant text, special tokens removed) answers ``prompt`` correctly."""

    def reward(self, prompt: PromptExample, response: str) -> float:
        """1.0 for a verified response, 0.0 otherwise."""
        return 1.0 if self.verify(prompt, response) else 0.0

    def category(self, prompt: PromptExample) -> str:
        """The category an eval reports this prompt under (one of ``categories``)."""
        return "all"

    def params(self) -> dict:
        """The parameters that shape generated data or scoring (JSON-serialisable)."""
        return {}

    def fingerprint(self) -> str:
        """``version`` plus parameters, stable across runs: a cache key component."""
        return f"{self.version}:{json.dumps(self.params(), sort_keys=True)}"


def check_kind_split(kind: str, split: str) -> None:
    """Raise ValueError naming the valid values when ``kind`` or ``split`` is unknown."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; valid kinds: {list(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")


def last_user_content(prompt: PromptExample | Conversation) -> str:
    """The content of the last user message of a prompt (a ``PromptExample`` or a conversation)."""
    messages = prompt.prompt if isinstance(prompt, PromptExample) else prompt
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    raise ValueError("prompt has no user message")
