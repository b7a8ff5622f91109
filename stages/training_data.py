"""Turn a stage's ``data`` section into the JSONL files its training workers read.

The driver loads and validates every record once (errors surface before any worker starts),
splits off held-out data, and writes TRL-style rows to the stage's folder. A training stage's ``data``
may be a weighted mixture (a list of datasets): each is loaded and split on its own, the training
records are drawn from them by ``stages.data.mixture`` and the held-out records of all of them are kept,
each source's also in its own file; the summary (the manifest's ``data``) counts every source.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from stages.config import DataConfig, DataSource, mixture_option
from stages.data.mixture import mixture_probabilities, sample_mixture
from stages.files import write_jsonl
from stages.sources import is_builtin, load_records, parse_builtin
from stages.stage import StageContext


@dataclass
class PreparedData:
    train_file: Path
    eval_file: Path | None
    summary: dict  # loader account (read/used/skipped) plus split sizes; of a mixture, per source too
    eval_files: dict[str, Path] = field(default_factory=dict)  # a mixture's held-out records per source label


def load(ctx: StageContext, data: DataConfig, kind: str):
    return load_records(ctx.resolve(data.path), kind, format=data.format, limit=data.limit)


def prepare(ctx: StageContext, data: DataConfig | list[DataSource], kind: str, seed: int = 0,
            folder_name: str = "data") -> PreparedData:
    """Load, split and write ``data`` as ``<work_dir>/<folder_name>/{train,eval}.jsonl``."""
    if isinstance(data, list):
        return prepare_mixture(ctx, data, kind, seed, folder_name)
    records, eval_records, summary = _load_and_split(ctx, data, kind, seed)
    folder = ctx.work_dir / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(folder / "train.jsonl", (r.to_trl() for r in records))
    eval_file = write_jsonl(folder / "eval.jsonl", (r.to_trl() for r in eval_records)) if eval_records else None
    summary.update(train_records=len(records), eval_records=len(eval_records))
    ctx.log(f"data {data.path}: {summary['read']} read, {len(records)} train, {len(eval_records)} held out, "
            f"skipped {summary['skipped'] or 'none'}")
    return PreparedData(train_file=train_file, eval_file=eval_file, summary=summary)


def _load_and_split(ctx: StageContext, data: DataConfig, kind: str, seed: int) -> tuple[list, list, dict]:
    """One dataset's (training records, held-out records, loader summary)."""
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
    return records, eval_records, summary


def prepare_mixture(ctx: StageContext, sources: list[DataSource], kind: str, seed: int = 0,
                    folder_name: str = "data") -> PreparedData:
    """A weighted mixture: training records drawn from every source (seeded), held-out records of all of them."""
    labels = source_labels(sources)
    parts = [_load_and_split(ctx, source, kind, seed) for source in sources]
    temperature = mixture_option(sources, "sampling_temperature")
    strategy = mixture_option(sources, "stopping_strategy")
    probabilities = mixture_probabilities([s.weight for s in sources], temperature)
    order = sample_mixture([len(train) for train, _, _ in parts], probabilities, seed, strategy)
    records = [parts[s][0][i] for s, i in order]
    drawn = Counter(s for s, _ in order)
    folder = ctx.work_dir / folder_name
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(folder / "train.jsonl", (r.to_trl() for r in records))
    eval_records = [r for _, held_out, _ in parts for r in held_out]
    eval_file = write_jsonl(folder / "eval.jsonl", (r.to_trl() for r in eval_records)) if eval_records else None
    eval_files, per_source, skipped = {}, {}, Counter()
    for i, (label, source, (train, held_out, summary)) in enumerate(zip(labels, sources, parts)):
        if held_out:
            eval_files[label] = write_jsonl(folder / "eval" / f"{label}.jsonl", (r.to_trl() for r in held_out))
        skipped.update(summary["skipped"])
        per_source[label] = {
            **summary, "path": source.path, "weight": source.weight, "probability": round(probabilities[i], 6),
            "available_train_records": len(train), "train_records": drawn[i],
            "unused_train_records": max(0, len(train) - drawn[i]), "eval_records": len(held_out)}
    summary = {
        "format": "mixture", "files": [f for _, _, part in parts for f in part["files"]],
        "read": sum(part["read"] for _, _, part in parts), "used": sum(part["used"] for _, _, part in parts),
        "skipped": dict(skipped), "train_records": len(records), "eval_records": len(eval_records),
        "mixture": {"sampling_temperature": temperature, "stopping_strategy": strategy, "seed": seed},
        "sources": per_source,
    }
    ctx.log("data mixture: " + ", ".join(
        f"{label} {s['train_records']} train (p={s['probability']:.3f}), {s['eval_records']} held out"
        for label, s in per_source.items()) + f"; {len(records)} train records in all ({strategy})")
    return PreparedData(train_file=train_file, eval_file=eval_file, summary=summary, eval_files=eval_files)


def source_labels(sources: list[DataConfig]) -> list[str]:
    """A short name per source of a mixture, for its summary entry and held-out file: the built-in task's
    name (``addition``), else the file or folder name; a repeated name gets its position (``addition_1``)."""
    names = [parse_builtin(s.path)[0] if is_builtin(s.path) else Path(s.path).name.split(".")[0] or "data"
             for s in sources]
    counts = Counter(names)
    return [name if counts[name] == 1 else f"{name}_{i}" for i, name in enumerate(names)]


def read_dataset(path: str | None):
    """A ``datasets.Dataset`` from a JSONL file written by :func:`prepare` (inside a worker)."""
    if path is None:
        return None
    from datasets import Dataset

    with open(path) as handle:
        return Dataset.from_list([json.loads(line) for line in handle])


def with_default_eval(data: DataConfig | list[DataSource]) -> DataConfig | list[DataSource]:
    """A builtin task source with no held-out data configured is evaluated on the task's test split (of a
    mixture: each such source)."""
    if isinstance(data, list):
        return [with_default_eval(source) for source in data]
    if data.eval_path or data.eval_fraction > 0 or not data.path.startswith("builtin:"):
        return data
    name, split = parse_builtin(data.path)
    return data if split == "test" else data.model_copy(update={"eval_path": f"builtin:{name}/test"})


def held_out_task(data: DataConfig | list[DataSource]) -> str | None:
    """The built-in task the held-out pairs come from (their categories go into the metrics), if any; of a
    mixture, the task when all its held-out data come from that one task."""
    if isinstance(data, list):
        tasks = {held_out_task(source) for source in data if source.eval_path or source.eval_fraction > 0}
        return tasks.pop() if len(tasks) == 1 else None
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
