"""Canonical records: every data format the loader reads becomes one of these.

The stages only ever see these types; ``to_trl`` turns them into the conversational
dicts that TRL's trainers take (``messages``; ``prompt``/``chosen``/``rejected``;
``prompt``/``completion``/``label``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


Conversation = tuple[Message, ...]


@dataclass(frozen=True)
class SFTExample:
    """A conversation whose last message is the assistant's (the part trained on)."""

    messages: Conversation

    def to_trl(self) -> dict:
        return {"messages": [m.to_dict() for m in self.messages]}


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and two assistant continuations, ``chosen`` preferred over ``rejected``."""

    prompt: Conversation
    chosen: Conversation
    rejected: Conversation
    margin: float | None = None

    def to_trl(self) -> dict:
        row = {
            "prompt": [m.to_dict() for m in self.prompt],
            "chosen": [m.to_dict() for m in self.chosen],
            "rejected": [m.to_dict() for m in self.rejected],
        }
        if self.margin is not None:
            row["margin"] = float(self.margin)
        return row


@dataclass(frozen=True)
class PromptExample:
    """A prompt without a response; ``answer`` is a reference for verifiers (GSM8K, built-in tasks)."""

    prompt: Conversation
    answer: str | None = None

    def to_trl(self) -> dict:
        row = {"prompt": [m.to_dict() for m in self.prompt]}
        if self.answer is not None:
            row["answer"] = self.answer
        return row

    @classmethod
    def from_trl(cls, row: dict) -> PromptExample:
        """The inverse of :meth:`to_trl`; reads any prepared row with a ``prompt`` (preference rows too)."""
        return cls(tuple(Message(m["role"], m["content"]) for m in row["prompt"]), row.get("answer"))


@dataclass(frozen=True)
class KTOExample:
    """An unpaired completion labelled desirable (True) or undesirable (False)."""

    prompt: Conversation
    completion: Conversation
    label: bool

    def to_trl(self) -> dict:
        return {
            "prompt": [m.to_dict() for m in self.prompt],
            "completion": [m.to_dict() for m in self.completion],
            "label": bool(self.label),
        }


Record = SFTExample | PreferencePair | PromptExample | KTOExample

# What a stage asks the loader for.
RECORD_TYPES: dict[str, type] = {
    "sft": SFTExample,
    "preference": PreferencePair,
    "prompt": PromptExample,
    "kto": KTOExample,
}


@dataclass
class LoadedData:
    """What the loader returns: the usable records and an account of everything read."""

    records: list
    format: str
    files: list[str]
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def summary(self) -> dict:
        return {
            "format": self.format,
            "files": self.files,
            "read": self.read,
            "used": len(self.records),
            "skipped": dict(self.skipped),
        }
