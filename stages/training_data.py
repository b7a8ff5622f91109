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
