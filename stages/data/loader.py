"""``load_records``: a path (file, folder or saved dataset) -> canonical records.

Built-in tasks (``builtin:<task>``) are loaded by ``stages.sources``, which sits above this package.

Files are read completely and the format is applied record by record; every record read is
either returned, counted in ``LoadedData.skipped`` under a reason, or the cause of a
``DataError`` that says where it is.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from stages.data.errors import DataError
from stages.data.fields import Skip
from stages.data.formats import FORMATS, Format, detect_format
from stages.data.readers import RawRecord, iter_source_files, read_all
from stages.data.records import RECORD_TYPES, LoadedData

def load_records(path: str | Path, kind: str, format: str | None = None, limit: int | None = None) -> LoadedData:
    """Load ``kind`` records ("sft", "preference", "prompt", "kto") from ``path``.

    ``format=None`` detects the format from the first records. ``limit`` stops converting once
    that many records are produced (files are still read and parsed in full); ``validate`` should
    pass no limit so every record is checked.
    """
    check_kind(kind)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = Path(path).expanduser()
    if format is not None:
        _format(format, str(path)).converter(kind, str(path))  # fail before reading a large file
    files, raw = read_all(path)
    fmt = _format(format or detect_format(raw), str(path))
    return _convert(raw, fmt, kind, str(path), files, limit)


def check_kind(kind: str) -> None:
    if kind not in RECORD_TYPES:
        raise ValueError(f"unknown record kind {kind!r}; expected one of: {', '.join(RECORD_TYPES)}")


def _format(name: str, path: str) -> Format:
    if name not in FORMATS:
        raise DataError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}", path=path)
    return FORMATS[name]


def _convert(
    raw: list[RawRecord], fmt: Format, kind: str, path: str, files: list[str], limit: int | None
) -> LoadedData:
    convert = fmt.converter(kind, path)
    records: list = []
    skipped: Counter[str] = Counter()
    read = 0
    for rec in raw:
        if limit is not None and len(records) >= limit:
            break
        read += 1
        for item in convert(rec):
            if isinstance(item, Skip):
                skipped[item.reason] += 1
            elif limit is None or len(records) < limit:
                records.append(item)
    return LoadedData(records=records, format=fmt.name, files=files, read=read, skipped=dict(skipped))


# --- fingerprints for caching ---------------------------------------------------------------------------


def fingerprint_source(path: str) -> str:
    """sha256 over the bytes of every file ``path`` resolves to, in reading order.

    Only content counts (not names or times), so copying data elsewhere keeps cached results
    valid while any edit invalidates them.
    """
    digest = hashlib.sha256()
    for file in iter_source_files(Path(path).expanduser()):
        # Each file's own hash, so file boundaries count and "ab"+"c" differs from "a"+"bc".
        digest.update(_file_sha256(file).encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
