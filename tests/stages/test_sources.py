"""``stages.sources``: files through the generic loader, ``builtin:<task>`` through the task's generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.data import DataError
from stages.data import fingerprint_source as file_fingerprint
from stages.sources import fingerprint_source, load_records, parse_builtin
from stages.tasks import get_task


def test_builtin_task_loads_with_default_parameters():
    data = load_records("builtin:addition/test", "prompt", limit=3)
    assert len(data.records) == 3 and data.format == "builtin:addition"
    assert data.records == get_task("addition").load("prompt", "test", 3).records
    assert parse_builtin("builtin:addition") == ("addition", "train")


def test_unknown_or_verifier_only_builtin_is_an_error():
    with pytest.raises(DataError, match="unknown built-in source 'nope'; known: addition"):
        load_records("builtin:nope", "prompt")
    # gsm8k has a verifier but no generator: its data are real files, never a builtin source.
    with pytest.raises(DataError, match="unknown built-in source 'gsm8k'"):
        load_records("builtin:gsm8k", "prompt")
    with pytest.raises(ValueError, match="unknown record kind 'rl'"):
        load_records("builtin:addition", "rl")


def test_files_go_through_the_generic_loader(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    assert load_records(path, "prompt").records[0].prompt[0].content == "2+2?"
    assert fingerprint_source(str(path)) == file_fingerprint(str(path))


def test_builtin_fingerprint_follows_split_and_task_version():
    train, test = fingerprint_source("builtin:addition"), fingerprint_source("builtin:addition/test")
    assert train == fingerprint_source("builtin:addition/train") and train != test
    assert len(train) == 64
