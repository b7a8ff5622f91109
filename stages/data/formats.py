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
from itertools import combinations
from typing import Any

from stages.data.errors import DataError
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


# --- field access with located errors -------------------------------------------------------------


def type_name(value: Any) -> str:
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _article(expected: str) -> str:
    return "an" if expected[0] in "aeiou" else "a"


def _expect(rec: RawRecord, value: Any, field: str, types: type | tuple[type, ...], expected: str) -> Any:
    # bool is an int subclass in Python; a JSON true is never a valid number here.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise rec.error(f"expected {_article(expected)} {expected}, got {type_name(value)}", field=field)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _object(rec: RawRecord, value: Any, field: str | None = None) -> dict:
    if not isinstance(value, dict):
        raise rec.error(f"expected a JSON object, got {type_name(value)}", field=field)
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _required(rec: RawRecord, obj: dict, key: str, fmt: str, prefix: str = "") -> Any:
    if key not in obj:
        has = ", ".join(map(str, obj)) or "no fields"
        raise rec.error(f"missing; format '{fmt}' requires it (the record has: {has})", field=_join(prefix, key))
    return obj[key]


def _string(rec: RawRecord, obj: dict, key: str, fmt: str, prefix: str = "") -> str:
    return _expect(rec, _required(rec, obj, key, fmt, prefix), _join(prefix, key), str, "string")


def _optional(rec: RawRecord, obj: dict, key: str, types: type | tuple[type, ...], expected: str) -> Any:
    """An optional field; JSON null counts as absent (Parquet/Arrow fill missing columns with null)."""
    value = obj.get(key)
    return None if value is None else _expect(rec, value, key, types, expected)


def _label(rec: RawRecord, obj: dict, fmt: str) -> bool:
    return _expect(rec, _required(rec, obj, "label", fmt), "label", bool, "bool (true/false)")


def _margin(rec: RawRecord, obj: dict) -> float | None:
    """``margin``, else ``score_chosen - score_rejected`` when both scores are given."""
    margin = _optional(rec, obj, "margin", (int, float), "number")
    if margin is not None:
        return float(margin)
    chosen = _optional(rec, obj, "score_chosen", (int, float), "number")
    rejected = _optional(rec, obj, "score_rejected", (int, float), "number")
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


def _message(
    rec: RawRecord, value: Any, field: str, fmt: str, role_key: str, content_key: str, roles: Mapping[str, str]
) -> Message:
    obj = _object(rec, value, field)
    role = _string(rec, obj, role_key, fmt, field)
    if role not in roles:
        allowed = ", ".join(roles)
        raise rec.error(f"unknown role {role!r}; allowed: {allowed}", field=f"{field}.{role_key}")
    return Message(roles[role], _string(rec, obj, content_key, fmt, field))


def _messages(
    rec: RawRecord, value: Any, field: str, fmt: str, role_key: str, content_key: str, roles: Mapping[str, str]
) -> Conversation:
    items = _expect(rec, value, field, list, "list of messages")
    return tuple(
        _message(rec, item, f"{field}[{i}]", fmt, role_key, content_key, roles) for i, item in enumerate(items)
    )


def _conversation(rec: RawRecord, obj: dict, key: str, fmt: str, default_role: str) -> Conversation:
    """A field that is either plain text (one ``default_role`` message) or a list of role/content messages."""
    value = _required(rec, obj, key, fmt)
    if isinstance(value, str):
        return (Message(default_role, value),)
    if isinstance(value, list):
        return _messages(rec, value, key, fmt, "role", "content", MESSAGE_ROLES)
    raise rec.error(f"expected a string or a list of messages, got {type_name(value)}", field=key)


# --- canonical records with the "usable?" checks in one place -------------------------------------


def _blank(text: str) -> bool:
    return not text.strip()


def _prompt_problem(prompt: Conversation) -> str | None:
    # A prompt is answered by the model, so it must end with a non-empty user turn.
    if not prompt or prompt[-1].role != "user":
        return "prompt_not_ending_with_user"
    return "empty_prompt" if _blank(prompt[-1].content) else None


def _response_problem(response: Conversation) -> str | None:
    if not any(m.role == "assistant" for m in response):
        return "no_assistant_turn"
    if response[-1].role != "assistant":
        return "last_turn_not_assistant"
    return "empty_response" if _blank(response[-1].content) else None


def sft_item(conversation: Conversation) -> Item:
    problem = _response_problem(conversation) or _prompt_problem(conversation[:-1])
    return Skip(problem) if problem else SFTExample(conversation)


def prompt_item(prompt: Conversation, answer: str | None = None) -> Item:
    problem = _prompt_problem(prompt)
    return Skip(problem) if problem else PromptExample(prompt, answer)


def pair_item(prompt: Conversation, chosen: Conversation, rejected: Conversation, margin: float | None) -> Item:
    problem = _prompt_problem(prompt) or _response_problem(chosen) or _response_problem(rejected)
    if problem:
        return Skip(problem)
    if chosen == rejected:  # no preference signal: DPO loss is constant on such a pair
        return Skip("chosen_equals_rejected")
    return PreferencePair(prompt, chosen, rejected, margin)


def kto_item(prompt: Conversation, completion: Conversation, label: bool) -> Item:
    problem = _prompt_problem(prompt) or _response_problem(completion)
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


def _prompt_response_converters(parse: ParsePR) -> dict[str, Converter]:
    def sft(rec: RawRecord) -> list[Item]:
        prompt, response, _ = parse(rec)
        return [sft_item(prompt + (Message("assistant", response),))]

    def prompt(rec: RawRecord) -> list[Item]:
        prompt_, _, answer = parse(rec)
        return [prompt_item(prompt_, answer)]

    return {"sft": sft, "prompt": prompt}


def _user_text(*parts: str | None) -> str:
    """Instruction and its input joined by a blank line, leaving out empty parts."""
    return "\n\n".join(p for p in parts if p and not _blank(p))


def _is_obj_with(value: Any, *keys: str) -> bool:
    return isinstance(value, dict) and all(k in value for k in keys)


# --- alpaca -----------------------------------------------------------------------------------------


def _alpaca_history(rec: RawRecord, obj: dict) -> Conversation:
    """LLaMA-Factory's ``history``: earlier [query, response] turns before this one."""
    history = _optional(rec, obj, "history", list, "list of [query, response] pairs") or []
    turns: list[Message] = []
    for i, pair in enumerate(history):
        field = f"history[{i}]"
        if not (isinstance(pair, list) and len(pair) == 2):
            raise rec.error(f"expected a [query, response] pair, got {type_name(pair)}", field=field)
        query = _expect(rec, pair[0], f"{field}[0]", str, "string")
        response = _expect(rec, pair[1], f"{field}[1]", str, "string")
        turns += [Message("user", query), Message("assistant", response)]
    return tuple(turns)


def _parse_alpaca(rec: RawRecord) -> tuple[Conversation, str, str | None]:
    obj = _object(rec, rec.data)
    instruction = _string(rec, obj, "instruction", "alpaca")
    output = _string(rec, obj, "output", "alpaca")
    extra = _optional(rec, obj, "input", str, "string")
    system = _optional(rec, obj, "system", str, "string")
    head = (Message("system", system),) if system and not _blank(system) else ()
    user = Message("user", _user_text(instruction, extra))
    return head + _alpaca_history(rec, obj) + (user,), output, None


register(
    Format(
        "alpaca",
        "instruction, output [, input, system, history]",
        lambda r: _is_obj_with(r, "instruction", "output"),
        _prompt_response_converters(_parse_alpaca),
    )
)


# --- dolly ------------------------------------------------------------------------------------------


def _parse_dolly(rec: RawRecord) -> tuple[Conversation, str, str | None]:
    obj = _object(rec, rec.data)
    instruction = _string(rec, obj, "instruction", "dolly")
    response = _string(rec, obj, "response", "dolly")
    context = _optional(rec, obj, "context", str, "string")
    return (Message("user", _user_text(instruction, context)),), response, None


register(
    Format(
        "dolly",
        "instruction, response [, context, category]",
        lambda r: _is_obj_with(r, "instruction", "response"),
        _prompt_response_converters(_parse_dolly),
    )
)


# --- question_answer (GSM8K) ------------------------------------------------------------------------


def _parse_question_answer(rec: RawRecord) -> tuple[Conversation, str, str | None]:
    obj = _object(rec, rec.data)
    question = _string(rec, obj, "question", "question_answer")
    answer = _string(rec, obj, "answer", "question_answer")
    return (Message("user", question),), answer, answer  # the full answer string stays the reference


register(
    Format(
        "question_answer",
        "question, answer",
        lambda r: _is_obj_with(r, "question", "answer"),
        _prompt_response_converters(_parse_question_answer),
    )
)


# --- sharegpt (plain and LLaMA-Factory pairwise) -----------------------------------------------------


def _sharegpt_turn(rec: RawRecord, obj: dict, key: str) -> Conversation:
    """A pairwise ``chosen``/``rejected`` entry: one {from, value} assistant message."""
    message = _message(rec, _required(rec, obj, key, "sharegpt"), key, "sharegpt", "from", "value", SHAREGPT_ROLES)
    if message.role != "assistant":
        raise rec.error(f"expected an assistant message (from: gpt/assistant), got role {message.role!r}", field=key)
    return (message,)


def _parse_sharegpt(rec: RawRecord) -> tuple[dict, Conversation]:
    obj = _object(rec, rec.data)
    turns = _required(rec, obj, "conversations", "sharegpt")
    conv = _messages(rec, turns, "conversations", "sharegpt", "from", "value", SHAREGPT_ROLES)
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
    return [pair_item(conv, chosen, rejected, _margin(rec, obj))]


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
    obj = _object(rec, rec.data)
    turns = _required(rec, obj, "messages", "messages")
    conv = _messages(rec, turns, "messages", "messages", "role", "content", MESSAGE_ROLES)
    return obj, conv


def _labelled_false(rec: RawRecord, obj: dict) -> bool:
    # SFT learns to imitate, so rows labelled undesirable must not be trained on.
    return _optional(rec, obj, "label", bool, "bool (true/false)") is False


def _messages_sft(rec: RawRecord) -> list[Item]:
    obj, conv = _parse_messages(rec)
    return [Skip("label_false") if _labelled_false(rec, obj) else sft_item(conv)]


def _messages_prompt(rec: RawRecord) -> list[Item]:
    _, conv = _parse_messages(rec)
    return [prompt_item(prompt_of(conv))]


def _messages_kto(rec: RawRecord) -> list[Item]:
    obj, conv = _parse_messages(rec)
    label = _label(rec, obj, "messages")
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
    text = _string(rec, obj, key, "hh_rlhf")
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
    obj = _object(rec, rec.data)
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
        _is_obj_with(r, "chosen", "rejected")
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
    obj = _object(rec, rec.data)
    margin = _margin(rec, obj)
    if "prompt" in obj:
        prompt = _conversation(rec, obj, "prompt", "preference", "user")
        chosen = _conversation(rec, obj, "chosen", "preference", "assistant")
        rejected = _conversation(rec, obj, "rejected", "preference", "assistant")
        return prompt, chosen, rejected, margin
    # Implicit prompt (TRL): chosen/rejected are whole conversations sharing their beginning.
    for key in ("chosen", "rejected"):
        if not isinstance(_required(rec, obj, key, "preference"), list):
            raise rec.error(
                "expected a list of messages (without a 'prompt' field the prompt is the shared start of "
                f"chosen and rejected), got {type_name(obj[key])}",
                field=key,
            )
    full_chosen = _conversation(rec, obj, "chosen", "preference", "assistant")
    full_rejected = _conversation(rec, obj, "rejected", "preference", "assistant")
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
        lambda r: _is_obj_with(r, "chosen", "rejected") and ("prompt" in r or isinstance(r["chosen"], list)),
        {"preference": _preference_preference, "sft": _preference_sft, "prompt": _preference_prompt},
    )
)


# --- prompt_completion (TRL style; optional KTO label) ----------------------------------------------------


def _parse_prompt_completion(rec: RawRecord) -> tuple[dict, Conversation, Conversation]:
    obj = _object(rec, rec.data)
    prompt = _conversation(rec, obj, "prompt", "prompt_completion", "user")
    completion = _conversation(rec, obj, "completion", "prompt_completion", "assistant")
    return obj, prompt, completion


def _prompt_completion_sft(rec: RawRecord) -> list[Item]:
    obj, prompt, completion = _parse_prompt_completion(rec)
    return [Skip("label_false") if _labelled_false(rec, obj) else sft_item(prompt + completion)]


def _prompt_completion_prompt(rec: RawRecord) -> list[Item]:
    return [prompt_item(_parse_prompt_completion(rec)[1])]


def _prompt_completion_kto(rec: RawRecord) -> list[Item]:
    obj, prompt, completion = _parse_prompt_completion(rec)
    return [kto_item(prompt, completion, _label(rec, obj, "prompt_completion"))]


register(
    Format(
        "prompt_completion",
        "prompt, completion (strings or message lists) [, label]",
        lambda r: _is_obj_with(r, "prompt", "completion"),
        {"sft": _prompt_completion_sft, "prompt": _prompt_completion_prompt, "kto": _prompt_completion_kto},
    )
)


# --- oasst_tree (Open-Assistant export message trees) ------------------------------------------------------

_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
_OASST_NEXT_ROLE = {"prompter": "assistant", "assistant": "prompter"}


@dataclass(frozen=True)
class _Node:
    message: Message
    rank: int | None  # among siblings, 0 = best; None when unranked
    dropped: str | None  # "deleted" / "synthetic": this node and its subtree are not used
    replies: tuple[_Node, ...]


def _oasst_node(rec: RawRecord, value: Any, field: str, expected_role: str) -> _Node:
    """Validates the whole subtree, dropped parts included, so a broken export fails loudly."""
    obj = _object(rec, value, field)
    role = _string(rec, obj, "role", "oasst_tree", field)
    if role not in _OASST_ROLES:
        raise rec.error(f"unknown role {role!r}; allowed: prompter, assistant", field=f"{field}.role")
    if role != expected_role:
        raise rec.error(f"expected role {expected_role!r} (turns alternate), got {role!r}", field=f"{field}.role")
    text = _string(rec, obj, "text", "oasst_tree", field)
    rank = obj.get("rank")
    if rank is not None:
        _expect(rec, rank, f"{field}.rank", int, "int")
    flags = {k: _expect(rec, obj.get(k, False), f"{field}.{k}", bool, "bool") for k in ("deleted", "synthetic")}
    # Synthetic messages are model-written placeholders, not human demonstrations or prompts.
    dropped = next((k for k, on in flags.items() if on), None)
    replies = _expect(rec, obj.get("replies", []), f"{field}.replies", list, "list")
    children = tuple(
        _oasst_node(rec, r, f"{field}.replies[{i}]", _OASST_NEXT_ROLE[role]) for i, r in enumerate(replies)
    )
    return _Node(Message(_OASST_ROLES[role], text), rank, dropped, children)


def _oasst_root(rec: RawRecord, out: list[Item]) -> _Node | None:
    """The tree's root prompt, or None (with the reason in ``out``) when the tree is not usable."""
    obj = _object(rec, rec.data)
    state = _optional(rec, obj, "tree_state", str, "string")
    root = _oasst_node(rec, _required(rec, obj, "prompt", "oasst_tree"), "prompt", "prompter")
    if state is not None and state != "ready_for_export":  # still in review / aborted in the export
        out.append(Skip("tree_not_ready"))
        return None
    return root if _kept(root, out) else None


def _kept(node: _Node, out: list[Item]) -> bool:
    if node.dropped:
        out.append(Skip(node.dropped))
    return not node.dropped


def _top_ranked(replies: list[_Node], out: list[Item]) -> _Node | None:
    """The best of sibling replies: the lowest rank; a lone reply needs no rank."""
    if len(replies) == 1:
        return replies[0]
    ranked = [r for r in replies if r.rank is not None]
    if not ranked:
        out.extend(Skip("unranked_replies") for _ in replies)
        return None
    best = min(ranked, key=lambda r: r.rank)  # min keeps the first on ties
    out.extend(Skip("not_top_ranked") for r in replies if r is not best)
    return best


def _walk_top_path(node: _Node, history: Conversation, kind: str, out: list[Item]) -> None:
    """From a kept prompter node, follow only the top-ranked assistant reply, into every follow-up."""
    path = history + (node.message,)
    if kind == "prompt":
        out.append(prompt_item(path))
    best = _top_ranked([r for r in node.replies if _kept(r, out)], out)
    if best is None:
        return
    conversation = path + (best.message,)
    if kind == "sft":
        out.append(sft_item(conversation))
    for follow_up in best.replies:
        if _kept(follow_up, out):
            _walk_top_path(follow_up, conversation, kind, out)


def _oasst_sft(rec: RawRecord) -> list[Item]:
    """One SFT example per assistant reply on the top-ranked path: root -> ... -> that reply.

    At each prompter turn only the best-ranked reply (rank 0 among the kept siblings) is
    followed; every follow-up prompter turn under it is followed. Lower-ranked replies are
    counted as ``not_top_ranked``; deleted/synthetic messages (and their subtrees) as such.
    """
    out: list[Item] = []
    root = _oasst_root(rec, out)
    if root is not None:
        _walk_top_path(root, (), "sft", out)
    return out


def _oasst_prompt(rec: RawRecord) -> list[Item]:
    """One prompt per prompter turn on the top-ranked path (the same path as ``sft``)."""
    out: list[Item] = []
    root = _oasst_root(rec, out)
    if root is not None:
        _walk_top_path(root, (), "prompt", out)
    return out


def _ranked_pairs(prompt: Conversation, replies: list[_Node], out: list[Item]) -> None:
    """Every (better, worse) pair of ranked sibling replies; ties and unranked replies give none."""
    if len(replies) < 2:
        return
    out.extend(Skip("unranked_reply") for r in replies if r.rank is None)
    ranked = sorted((r for r in replies if r.rank is not None), key=lambda r: r.rank)
    for better, worse in combinations(ranked, 2):
        if better.rank == worse.rank:
            out.append(Skip("tied_rank"))
        else:
            out.append(pair_item(prompt, (better.message,), (worse.message,), None))


def _walk_pairs(node: _Node, history: Conversation, out: list[Item]) -> None:
    path = history + (node.message,)
    replies = [r for r in node.replies if _kept(r, out)]
    _ranked_pairs(path, replies, out)
    for reply in replies:
        for follow_up in reply.replies:
            if _kept(follow_up, out):
                _walk_pairs(follow_up, path + (reply.message,), out)


def _oasst_preference(rec: RawRecord) -> list[Item]:
    """Pairs from every group of kept sibling assistant replies anywhere in the tree.

    The prompt is the path from the root to their prompter turn; each pair of ranked siblings
    with different ranks gives one pair, the lower rank chosen (n ranked siblings -> n*(n-1)/2
    pairs). Unranked siblings are counted as ``unranked_reply``, equal ranks as ``tied_rank``.
    """
    out: list[Item] = []
    root = _oasst_root(rec, out)
    if root is not None:
        _walk_pairs(root, (), out)
    return out


register(
    Format(
        "oasst_tree",
        "message_tree_id, prompt: {text, role, replies: [...]}",
        lambda r: isinstance(r, dict)
        and isinstance(r.get("prompt"), dict)
        and ("replies" in r["prompt"] or "message_tree_id" in r),
        {"sft": _oasst_sft, "preference": _oasst_preference, "prompt": _oasst_prompt},
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
        turns = _expect(rec, obj[key], key, list, "non-empty list of strings")
        if not turns:
            raise rec.error("expected a non-empty list of strings, got an empty list", field=key)
        return (Message("user", _expect(rec, turns[0], "turns[0]", str, "string")),)
    return _conversation(rec, obj, key, "prompt", "user")


def _prompt_answer(rec: RawRecord, obj: dict) -> str | None:
    """A reference answer: ``answer``, or MT-Bench's ``reference`` for the first turn."""
    answer = _optional(rec, obj, "answer", str, "string")
    if answer is not None:
        return answer
    reference = _optional(rec, obj, "reference", list, "list of strings")
    return _expect(rec, reference[0], "reference[0]", str, "string") if reference else None


def _prompt_prompt(rec: RawRecord) -> list[Item]:
    if isinstance(rec.data, str):  # a JSON Lines file of bare strings
        return [prompt_item((Message("user", rec.data),))]
    obj = _object(rec, rec.data)
    system = _optional(rec, obj, "system", str, "string")
    head = (Message("system", system),) if system and not _blank(system) else ()
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
