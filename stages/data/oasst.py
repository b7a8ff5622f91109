"""The ``oasst_tree`` format: Open-Assistant export message trees.

``sft``/``prompt`` follow the top-ranked path; ``preference`` uses every ranked sibling group.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

from stages.data.fields import (
    Item,
    Skip,
    as_object,
    expect,
    optional_field,
    pair_item,
    prompt_item,
    required,
    sft_item,
    string_field,
)
from stages.data.readers import RawRecord
from stages.data.records import Conversation, Message


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
    obj = as_object(rec, value, field)
    role = string_field(rec, obj, "role", "oasst_tree", field)
    if role not in _OASST_ROLES:
        raise rec.error(f"unknown role {role!r}; allowed: prompter, assistant", field=f"{field}.role")
    if role != expected_role:
        raise rec.error(f"expected role {expected_role!r} (turns alternate), got {role!r}", field=f"{field}.role")
    text = string_field(rec, obj, "text", "oasst_tree", field)
    rank = obj.get("rank")
    if rank is not None:
        expect(rec, rank, f"{field}.rank", int, "int")
    flags = {k: expect(rec, obj.get(k, False), f"{field}.{k}", bool, "bool") for k in ("deleted", "synthetic")}
    # Synthetic messages are model-written placeholders, not human demonstrations or prompts.
    dropped = next((k for k, on in flags.items() if on), None)
    replies = expect(rec, obj.get("replies", []), f"{field}.replies", list, "list")
    children = tuple(
        _oasst_node(rec, r, f"{field}.replies[{i}]", _OASST_NEXT_ROLE[role]) for i, r in enumerate(replies)
    )
    return _Node(Message(_OASST_ROLES[role], text), rank, dropped, children)


def _oasst_root(rec: RawRecord, out: list[Item]) -> _Node | None:
    """The tree's root prompt, or None (with the reason in ``out``) when the tree is not usable."""
    obj = as_object(rec, rec.data)
    state = optional_field(rec, obj, "tree_state", str, "string")
    root = _oasst_node(rec, required(rec, obj, "prompt", "oasst_tree"), "prompt", "prompter")
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


def oasst_sft(rec: RawRecord) -> list[Item]:
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


def oasst_prompt(rec: RawRecord) -> list[Item]:
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


def oasst_preference(rec: RawRecord) -> list[Item]:
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
