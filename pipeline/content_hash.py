"""Content hashes: files (streamed sha256, remembered by path, size and mtime), model folders, and
the code that computes a stage's output."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import cache
from pathlib import Path

CACHE_ENV = "RAYALIGN_HASH_CACHE"  # a JSON file; default ~/.cache/rayalign/sha256.json


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under a folder (hidden files included). Each file is hashed
    once per (absolute path, size, mtime): an 8B model's 16 GB are read on its first use only, and a
    rewritten file (new mtime) is hashed again."""
    folder = Path(folder)
    files = [f for f in sorted(folder.rglob("*")) if f.is_file()]
    return {str(f.relative_to(folder)): digest for f, digest in zip(files, _cached_digests(files))}


def _cached_digests(files: list[Path]) -> list[str]:
    cache_file = hash_cache_file()
    known = _read_cache(cache_file)
    keys, digests, added = [], [], False
    for path in files:
        path = path.resolve()
        stat = path.stat()
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in known:
            known[key], added = sha256_file(path), True
        keys.append(key)
        digests.append(known[key])
    if added:
        _write_cache(cache_file, known)
    return digests


def file_records(folder: Path, skip: set[str]) -> dict[str, dict]:
    """What a manifest records of the files it owns: relative path -> {size, sha256}."""
    folder = Path(folder)
    records = {}
    for file in sorted(folder.rglob("*")):
        rel = str(file.relative_to(folder))
        if file.is_file() and not file.is_symlink() and rel not in skip:
            records[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    return records


@cache
def code_fingerprint() -> str:
    """A hash of the sources of the ``stages`` package: the code that computes every stage's output.
    The orchestration in ``pipeline`` (CLI, runner, report) does not change what a stage computes, so
    editing it keeps the store's artifacts valid."""
    import stages

    root = Path(stages.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def hash_cache_file() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rayalign" / "sha256.json"


def _read_cache(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_cache(path: Path, known: dict[str, str]) -> None:
    """Atomic replace: a concurrent writer may lose an entry (it is recomputed), never corrupt the file.
    Entries of files that no longer exist are dropped, so the cache follows the models that are kept."""
    known = {key: digest for key, digest in known.items() if os.path.exists(key.rsplit("|", 2)[0])}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(known, tmp)
        os.replace(tmp.name, path)
    except OSError:
        pass  # a read-only home only costs rehashing next time
