"""The building blocks of the data formats: field access that names the record and field on error,
chat messages, and canonical records with the "usable?" checks in one place (``stages.data.formats``
and ``stages.data.oasst`` are built from them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from stages.data.readers import RawRecord
from stages.data.records import (
    Conversation,
    KTOExample,
    Message,
    PreferencePair,
    PromptExample,
    Record,
    SFTExample,
)


@dataclass(frozen=True)
class Skip:
    """A valid record that gives nothing for the requested kind; ``reason`` is what gets counted."""

    reason: str


Item = Record | Skip
Converter = Callable[[RawRecord], list[Item]]


# --- field access with located errors -------------------------------------------------------------


def type_name(value: Any) -> str:
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def article(expected: str) -> str:
    return "an" if expected[0] in "aeiou" else "a"


def expect(rec: RawRecord, value: Any, field: str, types: type | tuple[type, ...], expected: str) -> Any:
    # bool is an int subclass in Python; a JSON true is never a valid number here.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in as_tuple(types)):
        raise rec.error(f"expected {article(expected)} {expected}, got {type_name(value)}", field=field)
    return value


def as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def as_object(rec: RawRecord, value: Any, field: str | None = None) -> dict:
    if not isinstance(value, dict):
        raise rec.error(f"expected a JSON object, got {type_name(value)}", field=field)
    return value


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def required(rec: RawRecord, obj: dict, key: str, fmt: str, prefix: str = "") -> Any:
    if key not in obj:
        has = ", ".join(map(str, obj)) or "no fields"
        raise rec.error(f"missing; format '{fmt}' requires it (the record has: {has})", field=join_key(prefix, key))
    return obj[key]


def string_field(rec: RawRecord, obj: dict, key: str, fmt: str, prefix: str = "") -> str:
    return expect(rec, required(rec, obj, key, fmt, prefix), join_key(prefix, key), str, "string")


def optional_field(rec: RawRecord, obj: dict, key: str, types: type | tuple[type, ...], expected: str) -> Any:
    """An optional field; JSON null counts as absent (Parquet/Arrow fill missing columns with null)."""
    value = obj.get(key)
    return None if value is None else expect(rec, value, key, types, expected)


def kto_label(rec: RawRecord, obj: dict, fmt: str) -> bool:
    return expect(rec, required(rec, obj, "label", fmt), "label", bool, "bool (true/false)")


def margin_value(rec: RawRecord, obj: dict) -> float | None:
    """``margin``, else ``score_chosen - score_rejected`` when both scores are given."""
    margin = optional_field(rec, obj, "margin", (int, float), "number")
    if margin is not None:
        return float(margin)
    chosen = optional_field(rec, obj, "score_chosen", (int, float), "number")
    rejected = optional_field(rec, obj, "score_rejected", (int, float), "number")
    return float(chosen - rejected) if chosen is not None and rejected is not None else None


# --- messages ---------------------------------------------------------------------------------------

# Role names as they appear in the wild -> canonical role.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "prompter": "user"}


def parse_message(
    rec: RawRecord, value: Any, field: str, fmt: str, role_key: str, content_key: str, roles: Mapping[str, str]
) -> Message:
    obj = as_object(rec, value, field)
    role = string_field(rec, obj, role_key, fmt, field)
    if role not in roles:
        allowed = ", ".join(roles)
        raise rec.error(f"unknown role {role!r}; allowed: {allowed}", field=f"{field}.{role_key}")
    return Message(roles[role], string_field(rec, obj, content_key, fmt, field))


def parse_messages(
    rec: RawRecord, value: Any, field: str, fmt: str, role_key: str, content_key: str, roles: Mapping[str, str]
) -> Conversation:
    items = expect(rec, value, field, list, "list of messages")
    return tuple(
        parse_message(rec, item, f"{field}[{i}]", fmt, role_key, content_key, roles) for i, item in enumerate(items)
    )


def conversation_field(rec: RawRecord, obj: dict, key: str, fmt: str, default_role: str) -> Conversation:
    """A field that is either plain text (one ``default_role`` message) or a list of role/content messages."""
    value = required(rec, obj, key, fmt)
    if isinstance(value, str):
        return (Message(default_role, value),)
    if isinstance(value, list):
        return parse_messages(rec, value, key, fmt, "role", "content", MESSAGE_ROLES)
    raise rec.error(f"expected a string or a list of messages, got {type_name(value)}", field=key)


# --- canonical records with the "usable?" checks in one place -------------------------------------


def is_blank(text: str) -> bool:
    return not text.strip()


def prompt_problem(prompt: Conversation) -> str | None:
    # A prompt is answered by the model, so it must end with a non-empty user turn.
    if not prompt or prompt[-1].role != "user":
        return "prompt_not_ending_with_user"
    return "empty_prompt" if is_blank(prompt[-1].content) else None


def response_problem(response: Conversation) -> str | None:
    if not any(m.role == "assistant" for m in response):
        return "no_assistant_turn"
    if response[-1].role != "assistant":
        return "last_turn_not_assistant"
    return "empty_response" if is_blank(response[-1].content) else None


def sft_item(conversation: Conversation) -> Item:
    problem = response_problem(conversation) or prompt_problem(conversation[:-1])
    return Skip(problem) if problem else SFTExample(conversation)


def prompt_item(prompt: Conversation, answer: str | None = None) -> Item:
    problem = prompt_problem(prompt)
    return Skip(problem) if problem else PromptExample(prompt, answer)


def pair_item(prompt: Conversation, chosen: Conversation, rejected: Conversation, margin: float | None) -> Item:
    problem = prompt_problem(prompt) or response_problem(chosen) or response_problem(rejected)
    if problem:
        return Skip(problem)
    if chosen == rejected:  # no preference signal: DPO loss is constant on such a pair
        return Skip("chosen_equals_rejected")
    return PreferencePair(prompt, chosen, rejected, margin)


def kto_item(prompt: Conversation, completion: Conversation, label: bool) -> Item:
    problem = prompt_problem(prompt) or response_problem(completion)
    return Skip(problem) if problem else KTOExample(prompt, completion, label)


def prompt_of(conversation: Conversation) -> Conversation:
    """The prompt part of a conversation: everything but the final assistant turn."""
    return conversation[:-1] if conversation and conversation[-1].role == "assistant" else conversation


def split_shared_prefix(
    chosen: Conversation, rejected: Conversation
) -> tuple[Conversation, Conversation, Conversation]:
    """(prompt, chosen rest, rejected rest): the prompt is the longest shared run ending with a user turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].role != "user":
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


# --- converters built from one parse function -----------------------------------------------------

# parse(rec) -> (prompt, response, reference answer) for formats with one response per record.
ParsePR = Callable[[RawRecord], tuple[Conversation, str, str | None]]


def prompt_response_converters(parse: ParsePR) -> dict[str, Converter]:
    def sft(rec: RawRecord) -> list[Item]:
        prompt, response, _ = parse(rec)
        return [sft_item(prompt + (Message("assistant", response),))]

    def prompt(rec: RawRecord) -> list[Item]:
        prompt_, _, answer = parse(rec)
        return [prompt_item(prompt_, answer)]

    return {"sft": sft, "prompt": prompt}


def user_text(*parts: str | None) -> str:
    """Instruction and its input joined by a blank line, leaving out empty parts."""
    return "\n\n".join(p for p in parts if p and not is_blank(p))


def is_obj_with(value: Any, *keys: str) -> bool:
    return isinstance(value, dict) and all(k in value for k in keys)
