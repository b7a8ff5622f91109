"""Turn a stage's ``data`` section into the JSONL files its training workers read.

The driver loads and validates every record once (errors surface before any worker starts),
splits off held-out data, and writes TRL-style rows to the stage's folder.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from stages.config import DataConfig
from stages.files import write_jsonl
from stages.sources import load_records, parse_builtin
from stages.stage import StageContext


@dataclass
class PreparedData:
    train_file: Path
    eval_file: Path | None
    summary: dict  # loader account (read/used/skipped) plus split sizes


def load(ctx: StageContext, data: DataConfig, kind: str):
    return load_records(ctx.resolve(data.path), kind, format=data.format, limit=data.limit)


def prepare(ctx: StageContext, data: DataConfig, kind: str, seed: int = 0) -> PreparedData:
    """Load, split and write ``data`` as ``<work_dir>/data/{train,eval}.jsonl``."""
    loaded = load(ctx, data, kind)
    records = list(loaded.records)
    summary = loaded.summary()
    eval_records: list = []
    if data.eval_path:
        held_out = load_records(ctx.resolve(data.eval_path), kind, format=data.format, limit=data.eval_limit)
        eval_records = list(held_out.records)
        summary["eval"] = held_out.summary()
    elif data.eval_fraction > 0:
        random.Random(seed).shuffle(records)
        n_eval = max(1, int(len(records) * data.eval_fraction))
        n_eval = min(n_eval, data.eval_limit or n_eval)
        eval_records, records = records[:n_eval], records[n_eval:]
    if not records:
        raise ValueError(f"{data.path}: no usable {kind} records (skipped: {loaded.skipped})")
    folder = ctx.work_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(folder / "train.jsonl", (r.to_trl() for r in records))
    eval_file = write_jsonl(folder / "eval.jsonl", (r.to_trl() for r in eval_records)) if eval_records else None
    summary.update(train_records=len(records), eval_records=len(eval_records))
    ctx.log(f"data {data.path}: {summary['read']} read, {len(records)} train, {len(eval_records)} held out, "
            f"skipped {summary['skipped'] or 'none'}")
    return PreparedData(train_file=train_file, eval_file=eval_file, summary=summary)


def read_dataset(path: str | None):
    """A ``datasets.Dataset`` from a JSONL file written by :func:`prepare` (inside a worker)."""
    if path is None:
        return None
    from datasets import Dataset

    with open(path) as handle:
        return Dataset.from_list([json.loads(line) for line in handle])


def with_default_eval(data: DataConfig) -> DataConfig:
    """A builtin task source with no held-out data configured is evaluated on the task's test split."""
    if data.eval_path or data.eval_fraction > 0 or not data.path.startswith("builtin:"):
        return data
    name, split = parse_builtin(data.path)
    return data if split == "test" else data.model_copy(update={"eval_path": f"builtin:{name}/test"})


def held_out_task(data: DataConfig) -> str | None:
    """The built-in task the held-out pairs come from (their categories go into the metrics), if any."""
    source = data.eval_path or (data.path if data.eval_fraction > 0 else None)
    return parse_builtin(source)[0] if source and source.startswith("builtin:") else None


def periodic_eval(config, data) -> bool:
    """Evaluate during training only when asked (eval_steps or early stopping); the final held-out pass always runs."""
    return data.eval_file is not None and bool(config.train.eval_steps or config.train.early_stopping_patience)


# --------------------------------------------------------------------------- TRL's length rules


@dataclass(frozen=True)
class LengthRule:
    """Which records a stage's TRL trainer drops for ``train.max_length``: it measures ``measure`` in tokens
    (``"prompt"``: up to the first assistant turn, with the generation prompt; ``"longest"``: the longer of
    prompt + chosen and prompt + rejected) and keeps a record when ``length < max_length`` (``strict``) or
    ``length <= max_length``."""

    measure: str
    strict: bool
    what: str  # for messages

    def keeps(self, length: int, max_length: int) -> bool:
        return length < max_length if self.strict else length <= max_length


def length_rule(kind: str, assistant_only_loss: bool = True, packing: bool = False,
                record_kind: str | None = None) -> LengthRule | None:
    """The rule of a stage kind, or None when its trainer drops nothing for length (it truncates).

    * sft (``SFTTrainer``): with ``assistant_only_loss`` and no packing, truncation to ``max_length`` that
      leaves no assistant token drops the record: the prompt before it must be shorter than ``max_length``;
    * dpo (``DPOTrainer``, paired losses): a prompt of ``max_length`` tokens or more is dropped;
    * reward (``RewardTrainer``): a pair with a side longer than ``max_length`` is dropped.
    """
    if kind == "sft" and assistant_only_loss and not packing:
        return LengthRule("prompt", True, "the prompt before the first assistant token")
    if kind == "dpo" and record_kind == "preference":
        return LengthRule("prompt", True, "the prompt")
    if kind == "reward":
        return LengthRule("longest", False, "the longer side of the pair (prompt + chosen or rejected)")
    return None


def token_lengths(records: list, measure: str, tokenizer, template: str) -> list[int]:
    """Token count of each record's prompt or longest side, rendered with ``template`` (no weights needed)."""
    if measure == "prompt":
        conversations = [_prompt_messages(r) for r in records]
        return _rendered_lengths(tokenizer, template, conversations, add_generation_prompt=True)
    sides = [[*r.prompt, *side] for r in records for side in (r.chosen, r.rejected)]
    lengths = _rendered_lengths(tokenizer, template, [[m.to_dict() for m in s] for s in sides], False)
    return [max(lengths[i], lengths[i + 1]) for i in range(0, len(lengths), 2)]


def _prompt_messages(record) -> list[dict]:
    """A record's prompt: of an SFT conversation the messages before the first assistant turn (the first
    token trained on), of every other kind its ``prompt``."""
    if hasattr(record, "prompt"):
        return [m.to_dict() for m in record.prompt]
    messages = record.messages
    first = next((i for i, m in enumerate(messages) if m.role == "assistant"), len(messages))
    return [m.to_dict() for m in messages[:first]]


def _rendered_lengths(tokenizer, template: str, conversations: list[list[dict]], add_generation_prompt: bool):
    texts = tokenizer.apply_chat_template(conversations, chat_template=template, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: its Rust core, without padding
    if backend is not None:
        return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
