"""Turn a stage's ``data`` section into the JSONL files its training workers read.

The driver loads and validates every record once (errors surface before any worker starts),
splits off held-out data, and writes TRL-style rows to the stage's folder.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.spec import DataConfig
from stages.stage import StageContext


@dataclass
class PreparedData:
    train_file: Path
    eval_file: Path | None
    summary: dict  # loader account (read/used/skipped) plus split sizes


def load(ctx: StageContext, data: DataConfig, kind: str):
    from stages.data import load_records

    return load_records(ctx.resolve(data.path), kind, format=data.format, limit=data.limit)


def prepare(ctx: StageContext, data: DataConfig, kind: str, seed: int = 0) -> PreparedData:
    """Load, split and write ``data`` as ``<work_dir>/data/{train,eval}.jsonl``."""
    loaded = load(ctx, data, kind)
    records = list(loaded.records)
    summary = loaded.summary()
    eval_records: list = []
    if data.eval_path:
        from stages.data import load_records

        held_out = load_records(ctx.resolve(data.eval_path), kind, format=data.format)
        eval_records = list(held_out.records)
        summary["eval"] = held_out.summary()
    elif data.eval_fraction > 0:
        random.Random(seed).shuffle(records)
        n_eval = max(1, int(len(records) * data.eval_fraction))
        eval_records, records = records[:n_eval], records[n_eval:]
    if not records:
        raise ValueError(f"{data.path}: no usable {kind} records (skipped: {loaded.skipped})")
    folder = ctx.work_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(folder / "train.jsonl", records)
    eval_file = write_jsonl(folder / "eval.jsonl", eval_records) if eval_records else None
    summary.update(train_records=len(records), eval_records=len(eval_records))
    ctx.log(f"data {data.path}: {summary['read']} read, {len(records)} train, {len(eval_records)} held out, "
            f"skipped {summary['skipped'] or 'none'}")
    return PreparedData(train_file=train_file, eval_file=eval_file, summary=summary)


def write_jsonl(path: Path, records) -> Path:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record.to_trl()) + "\n")
    tmp.replace(path)
    return path


def read_dataset(path: str | None):
    """A ``datasets.Dataset`` from a JSONL file written by :func:`prepare` (inside a worker)."""
    if path is None:
        return None
    from datasets import Dataset

    with open(path) as handle:
        return Dataset.from_list([json.loads(line) for line in handle])
