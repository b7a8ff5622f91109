"""Reading data files into raw records that remember where they came from.

Every file is read completely before anything is converted, so a syntax error anywhere in it
surfaces at load time (``rayalign validate``), not halfway through training.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.data.errors import DataError

# Files a folder written by ``datasets.Dataset.save_to_disk`` always holds.
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json")
# A ``DatasetDict.save_to_disk`` folder: one saved dataset per split below it.
SAVED_DATASET_DICT_MARKER = "dataset_dict.json"


@dataclass(frozen=True)
class RawRecord:
    """One record as read from a file, before any format is applied."""

    data: Any
    source: str  # the file (or saved-dataset folder) it came from
    index: int  # 1-based line number (JSON Lines) or record number (everything else)
    unit: str = "line"  # "line" or "record": what ``index`` counts

    def error(self, message: str, field: str | None = None) -> DataError:
        """A DataError located at this record (the caller raises it)."""
        return DataError(message, path=self.source, line=self.index, field=field, unit=self.unit)


# --- single files ---------------------------------------------------------------------------------


def _open_text(path: Path) -> str:
    """The whole file as text; gzip is decided by the name, as users expect from ``.gz``."""
    try:
        raw = gzip.open(path, "rb").read() if path.name.endswith(".gz") else path.read_bytes()
    except (gzip.BadGzipFile, EOFError, OSError) as exc:
        raise DataError(f"cannot read file ({exc})", path=str(path)) from exc
    try:
        # utf-8-sig: files saved by some Windows editors start with a byte-order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 text ({exc})", path=str(path)) from exc


def _read_jsonl(path: Path) -> list[RawRecord]:
    records = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which splitlines
    # would treat as line ends and so cut a record in two.
    for number, line in enumerate(_open_text(path).split("\n"), start=1):
        if not line.strip():  # blank lines (often a trailing one) are not records
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc})", path=str(path), line=number) from exc
        records.append(RawRecord(value, str(path), number, "line"))
    return records


def _json_records(path: Path, value: Any) -> list:
    """The record list of a ``.json`` file: a top-level list, or an object whose only value is one."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        return next(iter(value.values()))
    shape = f"an object with keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
    raise DataError(f"expected a JSON list of records (or an object holding one list), got {shape}", path=str(path))


def _read_json(path: Path) -> list[RawRecord]:
    text = _open_text(path)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc})", path=str(path), line=exc.lineno) from exc
    return [RawRecord(item, str(path), i, "record") for i, item in enumerate(_json_records(path, value), start=1)]


def _read_parquet(path: Path) -> list[RawRecord]:
    import pyarrow.parquet as pq  # heavy import, only when a Parquet file is read

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"cannot read Parquet file ({exc})", path=str(path)) from exc
    return [RawRecord(row, str(path), i, "record") for i, row in enumerate(rows, start=1)]


def _read_saved_dataset(path: Path) -> list[RawRecord]:
    """A ``datasets.Dataset.save_to_disk`` folder (Arrow files), via ``datasets.load_from_disk``."""
    import datasets  # heavy import, only when a saved dataset is read

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load saved dataset ({exc})", path=str(path)) from exc
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(f"{path}/{name}" for name in dataset)
        raise DataError(f"is a DatasetDict; point the path at one split folder: {splits}", path=str(path))
    rows = dataset.with_format(None).to_list()
    return [RawRecord(row, str(path), i, "record") for i, row in enumerate(rows, start=1)]


# Suffix -> reader. Longest suffixes first so ".jsonl.gz" is not mistaken for something shorter.
FILE_READERS: dict[str, Callable[[Path], list[RawRecord]]] = {
    ".jsonl.gz": _read_jsonl,
    ".json.gz": _read_json,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


def _reader_for(path: Path) -> Callable[[Path], list[RawRecord]] | None:
    name = path.name.lower()
    return next((reader for suffix, reader in FILE_READERS.items() if name.endswith(suffix)), None)


# --- paths: a file, a saved dataset, or a folder of files ------------------------------------------


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        all((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)
        or (path / SAVED_DATASET_DICT_MARKER).is_file()
    )


def _supported_names() -> str:
    return ", ".join(FILE_READERS) + ", or a datasets.save_to_disk folder"


def resolve_sources(path: Path) -> list[Path]:
    """The files (or saved-dataset folders) a path stands for, in reading order.

    A plain folder means every supported file directly inside it, sorted by name; sub-folders
    and hidden files are ignored so a stray cache or ``.ipynb_checkpoints`` is never read.
    """
    if not path.exists():
        raise DataError("no such file or folder", path=str(path))
    if is_saved_dataset(path):
        return [path]
    if path.is_file():
        if _reader_for(path) is None:
            raise DataError(f"unsupported file type; expected {_supported_names()}", path=str(path))
        return [path]
    files = sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _reader_for(p) is not None
    )
    if not files:
        raise DataError(f"folder holds no data files ({_supported_names()})", path=str(path))
    return files


def read_source(path: Path) -> list[RawRecord]:
    """All records of one file or saved dataset; an empty one is an error, never zero records."""
    records = _read_saved_dataset(path) if path.is_dir() else _reader_for(path)(path)  # type: ignore[misc]
    if not records:
        raise DataError("file is empty", path=str(path))
    return records


def read_all(path: Path) -> tuple[list[str], list[RawRecord]]:
    """Every record behind ``path`` (files concatenated in order), and the files read."""
    sources = resolve_sources(path)
    records: list[RawRecord] = []
    for source in sources:
        records.extend(read_source(source))
    return [str(s) for s in sources], records


def iter_source_files(path: Path) -> Iterator[Path]:
    """Every file whose bytes make up the data behind ``path`` (for fingerprints), sorted."""
    for source in resolve_sources(path):
        if source.is_dir():
            yield from sorted(p for p in source.rglob("*") if p.is_file())
        else:
            yield source
