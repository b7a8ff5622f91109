"""Data formats: how to recognise each one and how to turn its records into canonical records.

Each format is registered by the name users write as ``format:`` in a config, with a detection
predicate (looks at one raw record) and one converter per record kind it can give. A converter
takes one ``RawRecord`` and returns a list of canonical records and ``Skip`` markers: a list
because one record can give several (an OASST tree gives many pairs), and ``Skip`` because a
valid-but-unusable record (an empty response) must be counted, never silently dropped. Invalid
records (wrong types, missing fields, unknown roles) raise ``DataError`` instead.

Choices worth knowing (also in the docstrings below):
- Alpaca/Dolly: the user turn is ``instruction``, then a blank line, then ``input``/``context``
  when that is non-empty.
- Conversations -> ``prompt`` records: everything except the final assistant turn.
- Records with a ``label`` (KTO data) give ``sft`` records only from ``label: true`` rows.
- HH-RLHF: the prompt is the longest shared run of turns of ``chosen`` and ``rejected`` that
  ends with a Human turn; consecutive turns of one speaker are merged (joined by a blank line).
- OASST trees: ``sft``/``prompt`` follow the top-ranked path; ``preference`` uses every ranked
  sibling group. See ``_oasst_sft`` and ``_oasst_preference``.
- ``prompt`` format: MT-Bench ``turns`` -> the first turn only (a single-turn prompt; later turns
  depend on the model's own first answer, so they cannot be fixed in advance).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from stages.data import oasst
from stages.data.errors import DataError
from stages.data.fields import (
    Converter,
    Item,
    MESSAGE_ROLES,
    SHAREGPT_ROLES,
    Skip,
    as_object,
    conversation_field,
    expect,
    is_blank,
    is_obj_with,
    kto_item,
    kto_label,
    margin_value,
    optional_field,
    pair_item,
    parse_message,
    parse_messages,
    prompt_item,
    prompt_of,
    prompt_response_converters,
    required,
    sft_item,
    split_shared_prefix,
    string_field,
    type_name,
    user_text,
)
from stages.data.readers import RawRecord
from stages.data.records import Conversation, Message


@dataclass(frozen=True)
class Format:
    name: str
    shape: str  # the fields that identify it, for error messages
    detect: Callable[[Any], bool]
    converters: Mapping[str, Converter]  # record kind -> converter

    def converter(self, kind: str, path: str | None = None) -> Converter:
        if kind not in self.converters:
            gives = ", ".join(self.converters)
            raise DataError(f"format '{self.name}' cannot give '{kind}' records (it gives: {gives})", path=path)
        return self.converters[kind]


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


# --- alpaca -----------------------------------------------------------------------------------------


def _alpaca_history(rec: RawRecord, obj: dict) -> Conversation:
    """LLaMA-Factory's ``history``: earlier [query, response] turns before this one."""
    history = optional_field(rec, obj, "history", list, "list of [query, response] pairs") or []
    turns: list[Message] = []
    for i, pair in enumerate(history):
        field = f"history[{i}]"
        if not (isinstance(pair, list) and len(pair) == 2):
            raise rec.error(f"expected a [query, response] pair, got {type_name(pair)}", field=field)
        query = expect(rec, pair[0], f"{field}[0]", str, "string")
        response = expect(rec, pair[1], f"{field}[1]", str, "string")
        turns += [Message("user", query), Message("assistant", response)]
    return tuple(turns)


def _parse_alpaca(rec: RawRecord) -> tuple[Conversation, str, str | None]:
    obj = as_object(rec, rec.data)
    instruction = string_field(rec, obj, "instruction", "alpaca")
    output = string_field(rec, obj, "output", "alpaca")
    extra = optional_field(rec, obj, "input", str, "string")
    system = optional_field(rec, obj, "system", str, "string")
    head = (Message("system", system),) if system and not is_blank(system) else ()
    user = Message("user", user_text(instruction, extra))
    return head + _alpaca_history(rec, obj) + (user,), output, None


register(
    Format(
        "alpaca",
        "instruction, output [, input, system, history]",
        lambda r: is_obj_with(r, "instruction", "output"),
        prompt_response_converters(_parse_alpaca),
    )
)


# --- dolly ------------------------------------------------------------------------------------------


def _parse_dolly(rec: RawRecord) -> tuple[Conversation, str, str | None]:
    obj = as_object(rec, rec.data)
    instruction = string_field(rec, obj, "instruction", "dolly")
    response = string_field(rec, obj, "response", "dolly")
    context = optional_field(rec, obj, "context", str, "string")
    return (Message("user", user_text(instruction, context)),), response, None


register(
    Format(
        "dolly",
        "instruction, response [, context, category]",
        lambda r: is_obj_with(r, "instruction", "response"),
        prompt_response_converters(_parse_dolly),
    )
)


# --- question_answer (GSM8K) ------------------------------------------------------------------------


def _parse_question_answer(rec: RawRecord) -> tuple[Conversation, str, str | None]:
    obj = as_object(rec, rec.data)
    question = string_field(rec, obj, "question", "question_answer")
    answer = string_field(rec, obj, "answer", "question_answer")
    return (Message("user", question),), answer, answer  # the full answer string stays the reference


register(
    Format(
        "question_answer",
        "question, answer",
        lambda r: is_obj_with(r, "question", "answer"),
        prompt_response_converters(_parse_question_answer),
    )
)


# --- sharegpt (plain and LLaMA-Factory pairwise) -----------------------------------------------------


def _sharegpt_turn(rec: RawRecord, obj: dict, key: str) -> Conversation:
    """A pairwise ``chosen``/``rejected`` entry: one {from, value} assistant message."""
    message = parse_message(rec, required(rec, obj, key, "sharegpt"), key, "sharegpt", "from", "value", SHAREGPT_ROLES)
    if message.role != "assistant":
        raise rec.error(f"expected an assistant message (from: gpt/assistant), got role {message.role!r}", field=key)
    return (message,)


def _parse_sharegpt(rec: RawRecord) -> tuple[dict, Conversation]:
    obj = as_object(rec, rec.data)
    turns = required(rec, obj, "conversations", "sharegpt")
    conv = parse_messages(rec, turns, "conversations", "sharegpt", "from", "value", SHAREGPT_ROLES)
    return obj, conv


def _is_pairwise(obj: dict) -> bool:
    return "chosen" in obj or "rejected" in obj


def _sharegpt_sft(rec: RawRecord) -> list[Item]:
    obj, conv = _parse_sharegpt(rec)
    return [sft_item(conv + _sharegpt_turn(rec, obj, "chosen") if _is_pairwise(obj) else conv)]


def _sharegpt_prompt(rec: RawRecord) -> list[Item]:
    obj, conv = _parse_sharegpt(rec)
    return [prompt_item(conv if _is_pairwise(obj) else prompt_of(conv))]


def _sharegpt_preference(rec: RawRecord) -> list[Item]:
    obj, conv = _parse_sharegpt(rec)
    if not _is_pairwise(obj):
        has = ", ".join(obj)
        raise rec.error(
            "missing; preference records from format 'sharegpt' need pairwise rows with 'chosen' and "
            f"'rejected' (the record has: {has})",
            field="chosen",
        )
    chosen, rejected = _sharegpt_turn(rec, obj, "chosen"), _sharegpt_turn(rec, obj, "rejected")
    return [pair_item(conv, chosen, rejected, margin_value(rec, obj))]


register(
    Format(
        "sharegpt",
        "conversations: [{from, value}] [, chosen, rejected]",
        lambda r: isinstance(r, dict) and isinstance(r.get("conversations"), list),
        {"sft": _sharegpt_sft, "prompt": _sharegpt_prompt, "preference": _sharegpt_preference},
    )
)


# --- messages (OpenAI/HF chat; optional KTO label) ----------------------------------------------------


def _parse_messages(rec: RawRecord) -> tuple[dict, Conversation]:
    obj = as_object(rec, rec.data)
    turns = required(rec, obj, "messages", "messages")
    conv = parse_messages(rec, turns, "messages", "messages", "role", "content", MESSAGE_ROLES)
    return obj, conv


def _labelled_false(rec: RawRecord, obj: dict) -> bool:
    # SFT learns to imitate, so rows labelled undesirable must not be trained on.
    return optional_field(rec, obj, "label", bool, "bool (true/false)") is False


def _messages_sft(rec: RawRecord) -> list[Item]:
    obj, conv = _parse_messages(rec)
    return [Skip("label_false") if _labelled_false(rec, obj) else sft_item(conv)]


def _messages_prompt(rec: RawRecord) -> list[Item]:
    _, conv = _parse_messages(rec)
    return [prompt_item(prompt_of(conv))]


def _messages_kto(rec: RawRecord) -> list[Item]:
    obj, conv = _parse_messages(rec)
    label = kto_label(rec, obj, "messages")
    return [kto_item(conv[:-1], conv[-1:], label)]


register(
    Format(
        "messages",
        "messages: [{role, content}] [, label]",
        lambda r: isinstance(r, dict) and isinstance(r.get("messages"), list),
        {"sft": _messages_sft, "prompt": _messages_prompt, "kto": _messages_kto},
    )
)


# --- hh_rlhf (Anthropic transcripts) -------------------------------------------------------------------

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_transcript(rec: RawRecord, obj: dict, key: str) -> Conversation:
    text = string_field(rec, obj, key, "hh_rlhf")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise rec.error(r"expected a transcript of '\n\nHuman: ...\n\nAssistant: ...' turns", field=key)
    turns: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], content.strip()
        if turns and turns[-1].role == role:  # the same speaker twice in a row: one message
            turns[-1] = Message(role, f"{turns[-1].content}\n\n{content}")
        else:
            turns.append(Message(role, content))
    return tuple(turns)


def _parse_hh(rec: RawRecord) -> tuple[Conversation, Conversation, Conversation]:
    obj = as_object(rec, rec.data)
    return split_shared_prefix(_hh_transcript(rec, obj, "chosen"), _hh_transcript(rec, obj, "rejected"))


def _hh_preference(rec: RawRecord) -> list[Item]:
    prompt, chosen, rejected = _parse_hh(rec)
    return [pair_item(prompt, chosen, rejected, None)]


def _hh_sft(rec: RawRecord) -> list[Item]:
    prompt, chosen, _ = _parse_hh(rec)
    return [sft_item(prompt + chosen)]


def _hh_prompt(rec: RawRecord) -> list[Item]:
    prompt, _, _ = _parse_hh(rec)
    return [prompt_item(prompt)]


def _looks_hh(r: Any) -> bool:
    return (
        is_obj_with(r, "chosen", "rejected")
        and "prompt" not in r
        and isinstance(r["chosen"], str)
        and r["chosen"].lstrip(" \n").startswith("Human:")
    )


register(
    Format(
        "hh_rlhf",
        "chosen, rejected: '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts",
        _looks_hh,
        {"preference": _hh_preference, "sft": _hh_sft, "prompt": _hh_prompt},
    )
)


# --- preference (TRL style: explicit or implicit prompt) -------------------------------------------------


def _parse_preference(rec: RawRecord) -> tuple[Conversation, Conversation, Conversation, float | None]:
    obj = as_object(rec, rec.data)
    margin = margin_value(rec, obj)
    if "prompt" in obj:
        prompt = conversation_field(rec, obj, "prompt", "preference", "user")
        chosen = conversation_field(rec, obj, "chosen", "preference", "assistant")
        rejected = conversation_field(rec, obj, "rejected", "preference", "assistant")
        return prompt, chosen, rejected, margin
    # Implicit prompt (TRL): chosen/rejected are whole conversations sharing their beginning.
    for key in ("chosen", "rejected"):
        if not isinstance(required(rec, obj, key, "preference"), list):
            raise rec.error(
                "expected a list of messages (without a 'prompt' field the prompt is the shared start of "
                f"chosen and rejected), got {type_name(obj[key])}",
                field=key,
            )
    full_chosen = conversation_field(rec, obj, "chosen", "preference", "assistant")
    full_rejected = conversation_field(rec, obj, "rejected", "preference", "assistant")
    return (*split_shared_prefix(full_chosen, full_rejected), margin)


def _preference_preference(rec: RawRecord) -> list[Item]:
    return [pair_item(*_parse_preference(rec))]


def _preference_sft(rec: RawRecord) -> list[Item]:
    prompt, chosen, _, _ = _parse_preference(rec)
    return [sft_item(prompt + chosen)]


def _preference_prompt(rec: RawRecord) -> list[Item]:
    return [prompt_item(_parse_preference(rec)[0])]


register(
    Format(
        "preference",
        "prompt, chosen, rejected (strings or message lists) [, margin, score_chosen, score_rejected]",
        lambda r: is_obj_with(r, "chosen", "rejected") and ("prompt" in r or isinstance(r["chosen"], list)),
        {"preference": _preference_preference, "sft": _preference_sft, "prompt": _preference_prompt},
    )
)


# --- prompt_completion (TRL style; optional KTO label) ----------------------------------------------------


def _parse_prompt_completion(rec: RawRecord) -> tuple[dict, Conversation, Conversation]:
    obj = as_object(rec, rec.data)
    prompt = conversation_field(rec, obj, "prompt", "prompt_completion", "user")
    completion = conversation_field(rec, obj, "completion", "prompt_completion", "assistant")
    return obj, prompt, completion


def _prompt_completion_sft(rec: RawRecord) -> list[Item]:
    obj, prompt, completion = _parse_prompt_completion(rec)
    return [Skip("label_false") if _labelled_false(rec, obj) else sft_item(prompt + completion)]


def _prompt_completion_prompt(rec: RawRecord) -> list[Item]:
    return [prompt_item(_parse_prompt_completion(rec)[1])]


def _prompt_completion_kto(rec: RawRecord) -> list[Item]:
    obj, prompt, completion = _parse_prompt_completion(rec)
    return [kto_item(prompt, completion, kto_label(rec, obj, "prompt_completion"))]


register(
    Format(
        "prompt_completion",
        "prompt, completion (strings or message lists) [, label]",
        lambda r: is_obj_with(r, "prompt", "completion"),
        {"sft": _prompt_completion_sft, "prompt": _prompt_completion_prompt, "kto": _prompt_completion_kto},
    )
)


# --- oasst_tree (Open-Assistant export message trees: stages.data.oasst) ----------------------------------

register(
    Format(
        "oasst_tree",
        "message_tree_id, prompt: {text, role, replies: [...]}",
        lambda r: isinstance(r, dict)
        and isinstance(r.get("prompt"), dict)
        and ("replies" in r["prompt"] or "message_tree_id" in r),
        {"sft": oasst.oasst_sft, "preference": oasst.oasst_preference, "prompt": oasst.oasst_prompt},
    )
)


# --- prompt (bare prompts) -----------------------------------------------------------------------------

_PROMPT_KEYS = ("prompt", "question", "text", "turns")


def _prompt_text(rec: RawRecord, obj: dict) -> Conversation:
    key = next((k for k in _PROMPT_KEYS if k in obj), None)
    if key is None:
        has = ", ".join(obj) or "no fields"
        needs = ", ".join(_PROMPT_KEYS)
        raise rec.error(f"missing; format 'prompt' needs one of {needs} (the record has: {has})", field="prompt")
    if key == "turns":  # MT-Bench: the first turn only, see the module docstring
        turns = expect(rec, obj[key], key, list, "non-empty list of strings")
        if not turns:
            raise rec.error("expected a non-empty list of strings, got an empty list", field=key)
        return (Message("user", expect(rec, turns[0], "turns[0]", str, "string")),)
    return conversation_field(rec, obj, key, "prompt", "user")


def _prompt_answer(rec: RawRecord, obj: dict) -> str | None:
    """A reference answer: ``answer``, or MT-Bench's ``reference`` for the first turn."""
    answer = optional_field(rec, obj, "answer", str, "string")
    if answer is not None:
        return answer
    reference = optional_field(rec, obj, "reference", list, "list of strings")
    return expect(rec, reference[0], "reference[0]", str, "string") if reference else None


def _prompt_prompt(rec: RawRecord) -> list[Item]:
    if isinstance(rec.data, str):  # a JSON Lines file of bare strings
        return [prompt_item((Message("user", rec.data),))]
    obj = as_object(rec, rec.data)
    system = optional_field(rec, obj, "system", str, "string")
    head = (Message("system", system),) if system and not is_blank(system) else ()
    return [prompt_item(head + _prompt_text(rec, obj), _prompt_answer(rec, obj))]


register(
    Format(
        "prompt",
        'a bare JSON string, or one of prompt / question / text / turns (MT-Bench) [, answer, reference, system]',
        lambda r: isinstance(r, str) or (isinstance(r, dict) and any(k in r for k in _PROMPT_KEYS)),
        {"prompt": _prompt_prompt},
    )
)


# --- detection -------------------------------------------------------------------------------------------

DETECT_SAMPLE = 5  # records looked at; all must fit, so one odd first record cannot mislead


def detect_format(records: list[RawRecord]) -> str:
    """The first registered format whose predicate fits every sampled record (registry order = priority)."""
    sample = records[:DETECT_SAMPLE]
    for name in DETECTION_ORDER:
        if all(FORMATS[name].detect(r.data) for r in sample):
            return name
    first = sample[0]
    guess = next((name for name in DETECTION_ORDER if FORMATS[name].detect(first.data)), None)
    if guess is not None:  # the first record fits a format but a later one does not: point at that one
        odd = next(r for r in sample if not FORMATS[guess].detect(r.data))
        raise odd.error(
            f"does not look like format '{guess}' ({FORMATS[guess].shape}), which the first record has; "
            "fix the record or set `format:` explicitly"
        )
    data = first.data
    shape = f"fields: {', '.join(map(str, data))}" if isinstance(data, dict) else f"a JSON {type_name(data)}"
    known = "; ".join(f"{f.name} ({f.shape})" for f in FORMATS.values())
    raise DataError(
        f"cannot detect the data format from the first records ({shape}); known formats: {known}. "
        "Set `format:` to one of them.",
        path=first.source,
    )


# Most specific first: e.g. a sharegpt pairwise row also has chosen/rejected, a GSM8K row has `question`.
DETECTION_ORDER = (
    "oasst_tree",
    "sharegpt",
    "messages",
    "hh_rlhf",
    "preference",
    "prompt_completion",
    "alpaca",
    "dolly",
    "question_answer",
    "prompt",
)
