"""Where records come from: files and folders (``stages.data``) or a built-in task's generator
(``builtin:<task>[/<split>]``, ``stages.tasks``). Every stage and the validator load data here.

It sits above both packages so that neither imports the other: the loader stays generic and the
tasks build their records from ``stages.data.records``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stages.data import loader
from stages.data.errors import DataError
from stages.data.records import LoadedData
from stages.tasks import TASKS, get_task

BUILTIN_PREFIX = "builtin:"
DEFAULT_SPLIT = "train"


def is_builtin(path: str | Path) -> bool:
    return str(path).startswith(BUILTIN_PREFIX)


def parse_builtin(path: str) -> tuple[str, str]:
    """``builtin:gsm8k/test`` -> ("gsm8k", "test"); the split defaults to "train"."""
    name, _, split = path[len(BUILTIN_PREFIX):].partition("/")
    return name, split or DEFAULT_SPLIT


def load_records(path: str | Path, kind: str, format: str | None = None, limit: int | None = None) -> LoadedData:
    """``kind`` records ("sft", "preference", "prompt", "kto") from a file, folder, saved dataset or
    built-in task (see ``stages.data.loader.load_records`` for files)."""
    if not is_builtin(path):
        return loader.load_records(path, kind, format=format, limit=limit)
    loader.check_kind(kind)
    name, split = parse_builtin(str(path))
    generators = sorted(n for n, task in TASKS.items() if task.has_generator)
    if name not in generators:
        raise DataError(f"unknown built-in source {name!r}; known: {', '.join(generators)}", path=str(path))
    return get_task(name).load(kind, split, limit)


def fingerprint_source(path: str) -> str:
    """A content hash of a data source: every file's bytes (``stages.data.loader``), or for a built-in
    task its name, split and the task's version and parameters."""
    if not is_builtin(path):
        return loader.fingerprint_source(path)
    name, split = parse_builtin(path)
    version = get_task(name).fingerprint() if name in TASKS else None
    blob = json.dumps({"builtin": name, "split": split, "version": version}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
