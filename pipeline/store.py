"""The artifact store: one folder per stage run, keyed by a content fingerprint.

Layout under ``<storage>/<pipeline name>/``::

    <stage>/<fingerprint>/manifest.json     status "complete" only once everything is written
    <stage>/<fingerprint>/model/            a standard Hugging Face folder (weights or adapter, tokenizer)
    <stage>/.partial-<fingerprint>/         a stage being written (kept after a crash so it can resume)

A stage writes into its ``.partial-`` folder and the folder is renamed into place when the
manifest says ``complete``; a rename is atomic on one filesystem, so an interrupted stage never
leaves anything that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from stages.files import write_json

MANIFEST = "manifest.json"
MODEL_DIR = "model"
PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class Artifact:
    """A finished stage output (or an external HF folder passed with ``--input``)."""

    stage: str
    fingerprint: str
    path: Path  # the artifact folder; for external inputs, the HF folder itself
    manifest: dict

    @property
    def model_dir(self) -> Path:
        return Path(self.manifest.get("model_dir") or self.path / MODEL_DIR)

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @classmethod
    def external(cls, stage: str, location: str) -> Artifact:
        """An HF folder or hub id used as a stage's output without running the stage."""
        fingerprint = fingerprint_model_location(location)
        manifest = {"stage": stage, "kind": "external", "fingerprint": fingerprint, "status": "complete",
                    "model_dir": location, "model_type": _model_type(Path(location))}
        return cls(stage=stage, fingerprint=fingerprint, path=Path(location), manifest=manifest)


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def find(self, stage: str, fingerprint: str) -> Artifact | None:
        """The complete artifact of this stage and fingerprint, if there is one."""
        return _read_artifact(stage, self.stage_dir(stage) / fingerprint)

    def latest(self, stage: str) -> Artifact | None:
        """The most recently finished complete artifact of a stage, whatever its fingerprint."""
        folder = self.stage_dir(stage)
        if not folder.is_dir():
            return None
        found = [a for d in folder.iterdir() if not d.name.startswith(".") and (a := _read_artifact(stage, d))]
        return max(found, key=lambda a: a.manifest.get("finished", ""), default=None)

    def partial_dir(self, stage: str, fingerprint: str) -> Path:
        """Where a stage run is written; left in place after a crash so the next run resumes from it."""
        path = self.stage_dir(stage) / f"{PARTIAL_PREFIX}{fingerprint}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, stage: str, fingerprint: str, manifest: dict) -> Artifact:
        """Mark a partial folder complete and move it into place atomically."""
        partial = self.partial_dir(stage, fingerprint)
        manifest = {**manifest, "status": "complete", "finished": now()}
        write_json(partial / MANIFEST, manifest)
        final = self.stage_dir(stage) / fingerprint
        if final.exists():  # --force: keep the old one until the new one is in place
            retired = final.with_name(f".retired-{fingerprint}-{int(time.time())}")
            os.rename(final, retired)
            os.rename(partial, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(partial, final)
        return Artifact(stage=stage, fingerprint=fingerprint, path=final, manifest=manifest)


def _read_artifact(stage: str, folder: Path) -> Artifact | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if manifest.get("status") != "complete":
        return None
    return Artifact(stage=stage, fingerprint=folder.name, path=folder, manifest=manifest)


def _model_type(path: Path) -> str:
    if (path / "adapter_config.json").exists():
        return "adapter"
    return "full"


# --------------------------------------------------------------------------- fingerprints


def fingerprint(payload: Any) -> str:
    """A short stable hash of JSON-able content."""
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_model_location(location: str) -> str:
    """A model folder is hashed by its config and weight files' names, sizes and config content;
    a hub id by its name (hub revisions are pinned with ``base.revision``)."""
    path = Path(location)
    if not path.is_dir():
        return fingerprint({"hub": location})
    summary = {}
    for file in sorted(path.rglob("*")):
        if file.is_file():
            rel = str(file.relative_to(path))
            small = file.suffix == ".json" and file.stat().st_size < 1 << 20
            summary[rel] = file.read_text(errors="replace") if small else file.stat().st_size
    return fingerprint(summary)


# --------------------------------------------------------------------------- manifest helpers


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str | None]:
    versions = {}
    for dist in ("rayalign", "torch", "transformers", "trl", "peft", "ray", "deepspeed", "datasets", "vllm"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def rayalign_version() -> str:
    try:
        return metadata.version("rayalign")
    except metadata.PackageNotFoundError:
        return "0+unknown"
