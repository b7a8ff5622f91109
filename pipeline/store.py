"""The artifact store: one folder per stage run, keyed by a content fingerprint.

Layout under ``<storage>/<pipeline name>/``::

    <stage>/<fingerprint>/manifest.json     status "complete" only once everything is written;
                                            lists every file it owns with its size and sha256
    <stage>/<fingerprint>/model/            a standard Hugging Face folder (weights or adapter, tokenizer)
    <stage>/.partial-<fingerprint>.<attempt>/   one attempt at the stage (kept after a crash so the
                                            next attempt adopts it and resumes from its checkpoints)
    <stage>/.lock-<fingerprint>             held by the run writing the stage (``pipeline.locks``)

A stage writes into its attempt's folder and the folder is renamed into place when the manifest
says ``complete``; a rename is atomic on one filesystem, so an interrupted stage never leaves
anything that looks finished. Only the lock's holder creates, adopts or commits attempt folders.
A cache hit checks every recorded file's size; ``rayalign verify`` checks their hashes. A damaged
artifact is never used: it is reported and rerun.

With an object-store ``storage`` (``stages.remote_storage``) the same layout lives under the URI and
is the source of truth; ``root`` is then this host's mirror of it, where attempts run and locks live.
``find``/``complete``/``latest`` read the remote manifests; an artifact used as an input is fetched
into the mirror (each file checked against the manifest's size and sha256); ``commit`` uploads every
file and then the manifest, LAST: there is no atomic rename on an object store, so a manifest that
says ``complete`` is the commit point, and a reader never sees one before all its files.
What holds across hosts: a committed artifact is all there or not there, and any host finds and
uses it. What does not: the stage lock is a file lock on this host's mirror, so two hosts may run
the same stage at once (both write whole, equivalent artifacts; the last manifest wins). Run one
pipeline driver per store, as a KubeRay job does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.content_hash import file_records, folder_digest, sha256_file
from pipeline.locks import StageLock, lock_path
from stages.files import write_json
from stages.log import log
from stages.models import MODEL_FILES, model_type_of
from stages.remote_storage import RemoteFolder, mirrored_uri

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
    remote: str | None = None  # its folder on an object store (a URI, no credentials); path is then the mirror

    @property
    def model_dir(self) -> Path:
        return Path(self.manifest.get("model_dir") or self.path / MODEL_DIR)

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @classmethod
    def external(cls, stage: str, location: str, revision: str | None = None) -> Artifact:
        """An HF folder or hub id used as a stage's output without running the stage."""
        fingerprint = fingerprint_model_location(location, revision)
        manifest = {"stage": stage, "kind": "external", "fingerprint": fingerprint, "status": "complete",
                    "model_dir": location, "model_type": model_type_of(location)}
        return cls(stage=stage, fingerprint=fingerprint, path=Path(location), manifest=manifest)


class StoreError(RuntimeError):
    """A commit that would record something false (its folder gone, no loadable weights)."""


class ArtifactStore:
    def __init__(self, root: Path, remote: str | None = None):
        """``root``: the store's folder. ``remote``: an object-store URI whose mirror ``root`` is (default:
        the one ``PipelineSpec.run_root`` registered for ``root``); it is checked to be reachable here."""
        self.root = Path(root)
        uri = remote or mirrored_uri(self.root)
        self.remote = RemoteFolder(uri) if uri else None
        if self.remote is not None:
            self.remote.check_reachable()

    @property
    def location(self) -> str:
        """Where the store's truth is, for messages: the object-store URI or the folder."""
        return str(self.remote) if self.remote is not None else str(self.root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def find(self, stage: str, fingerprint: str) -> Artifact | None:
        """The complete, undamaged artifact of this stage and fingerprint, if there is one. A damaged one
        (a recorded file missing or of another size) is reported and treated as absent, so it is rerun."""
        artifact = (self._read_remote(stage, fingerprint) if self.remote is not None
                    else _read_artifact(stage, self.stage_dir(stage) / fingerprint))
        if artifact is not None and (problems := size_problems(artifact)):
            log(f"{stage}: the stored artifact {fingerprint} is damaged ({'; '.join(problems[:3])}); "
                f"it is not used and will be rerun")
            return None
        return artifact

    def complete(self, stage: str) -> list[Artifact]:
        """Every complete artifact of a stage, newest first."""
        folder = self.stage_dir(stage)
        if self.remote is not None:
            found = [a for name in self.remote.child(stage).subfolders()
                     if not name.startswith(".") and (a := self._read_remote(stage, name))]
        elif not folder.is_dir():
            return []
        else:
            found = [a for d in folder.iterdir() if not d.name.startswith(".") and (a := _read_artifact(stage, d))]
        return sorted(found, key=lambda a: a.manifest.get("finished", ""), reverse=True)

    def latest(self, stage: str) -> Artifact | None:
        """The most recently finished complete artifact of a stage, whatever its fingerprint."""
        return next(iter(self.complete(stage)), None)

    def lock(self, stage: str, fingerprint: str, *, wait: bool = True) -> StageLock:
        """The lock that makes one run at a time write this stage and fingerprint. It is a file lock in
        ``root``: on an object store it serialises the runs of this host only (see the module's docstring)."""
        return StageLock(lock_path(self.stage_dir(stage), fingerprint), wait=wait, on_wait=log)

    def attempts(self, stage: str, fingerprint: str) -> list[Path]:
        """This fingerprint's attempt folders, newest first (an unsuffixed one is from an older rayalign)."""
        name = f"{PARTIAL_PREFIX}{fingerprint}"
        folder = self.stage_dir(stage)
        found = [p for p in folder.glob(f"{name}*") if p.is_dir() and (p.name == name or p.name.startswith(f"{name}."))]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def start_attempt(self, stage: str, fingerprint: str) -> Path:
        """A fresh folder for this attempt, holding the newest earlier attempt's work (its checkpoints) if
        one crashed. Call it holding the stage's lock: no other run is then writing any attempt."""
        attempt = self.stage_dir(stage) / f"{PARTIAL_PREFIX}{fingerprint}.{_attempt_id()}"
        earlier = self.attempts(stage, fingerprint)
        if earlier:
            os.rename(earlier[0], attempt)
            # Ray Train's own run state names the old folder; resume goes through the checkpoints instead.
            shutil.rmtree(attempt / "ray", ignore_errors=True)
            for stale in earlier[1:]:
                shutil.rmtree(stale, ignore_errors=True)
            log(f"{stage}: adopting the work of an earlier attempt ({earlier[0].name})")
        else:
            attempt.mkdir(parents=True)
        return attempt

    def commit(self, stage: str, fingerprint: str, manifest: dict, partial: Path) -> Artifact:
        """Mark an attempt's folder complete, record its files' sizes and hashes, and move it into place
        atomically. Refuses when the folder is gone or holds no loadable weights where the stage made a model."""
        partial = Path(partial)
        if not partial.is_dir():
            raise StoreError(f"{stage}: the attempt folder {partial} is gone (removed by another process?); "
                             f"nothing was committed")
        if problems := model_problems(partial / MODEL_DIR, manifest.get("model_type")):
            raise StoreError(f"{stage}: refusing to mark {partial} complete: {'; '.join(problems)}")
        manifest = {**manifest, "status": "complete", "finished": now(),
                    "files": file_records(partial, skip={MANIFEST})}
        write_json(partial / MANIFEST, manifest)
        final = self.stage_dir(stage) / fingerprint
        if final.exists():  # --force, or a damaged artifact: keep the old one until the new one is in place
            retired = final.with_name(f".retired-{fingerprint}-{int(time.time())}")
            os.rename(final, retired)
            os.rename(partial, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(partial, final)
        # A killed driver's Ray workers outlive it by a few seconds and may recreate the attempt folder
        # that was adopted (renamed) meanwhile; with the artifact in place every attempt left is stale.
        for stale in self.attempts(stage, fingerprint):
            shutil.rmtree(stale, ignore_errors=True)
        artifact = Artifact(stage=stage, fingerprint=fingerprint, path=final, manifest=manifest)
        return self._publish(artifact) if self.remote is not None else artifact

    def record_gate(self, artifact: Artifact, gate: dict) -> None:
        """Write a gate's outcome into a complete artifact's manifest (atomically; the files stay as they are)."""
        artifact.manifest["gate"] = gate  # the run's copy too: the report and the CLI read it
        self._write_manifest(artifact, artifact.manifest)

    def mark_damaged(self, artifact: Artifact, problems: list[str]) -> None:
        """Take a damaged artifact out of use (the next run reruns it), keeping its files for inspection."""
        self._write_manifest(artifact, {**artifact.manifest, "status": "damaged", "damage": problems})

    # ------------------------------------------------------------------ object-store storage
    def fetch(self, artifact: Artifact) -> Artifact:
        """Make an object-store artifact's files present in the local mirror, each checked against the
        manifest's size and sha256; a file that does not match marks the artifact damaged (rerun next
        time). A no-op for a local store and an external folder."""
        if artifact.remote is None:
            return artifact
        folder = RemoteFolder(artifact.remote)
        have = folder_digest(artifact.path) if artifact.path.is_dir() else {}  # hashes cached per file version
        fetched = 0
        for rel, record in artifact.manifest.get("files", {}).items():
            if have.get(rel) == record["sha256"]:
                continue
            target = artifact.path / rel
            try:
                folder.download(rel, target)
            except FileNotFoundError:
                problem = f"{rel} is missing"
            else:
                problem = None if sha256_file(target) == record["sha256"] else f"{rel} does not match its sha256"
            if problem:
                self.mark_damaged(artifact, [problem])
                raise StoreError(f"{artifact.stage}: the stored artifact {folder} is damaged ({problem}); it is "
                                 f"marked damaged and the next run reruns it")
            fetched += 1
        write_json(artifact.path / MANIFEST, artifact.manifest)
        if fetched:
            log(f"{artifact.stage}: fetched {fetched} file(s) of {artifact.fingerprint} from {folder}")
        return artifact

    def _read_remote(self, stage: str, fingerprint: str) -> Artifact | None:
        folder = self.remote.child(stage, fingerprint)
        try:
            manifest = json.loads(folder.read_bytes(MANIFEST) or b"null")
        except json.JSONDecodeError:
            return None
        if not isinstance(manifest, dict) or manifest.get("status") != "complete":
            return None
        return Artifact(stage=stage, fingerprint=fingerprint, path=self.stage_dir(stage) / fingerprint,
                        manifest=manifest, remote=folder.uri)

    def _publish(self, artifact: Artifact) -> Artifact:
        """Upload a committed artifact. A manifest already there (``--force``, a damaged artifact) is deleted
        first, then its files; then every new file; the complete manifest goes LAST: it is the commit point."""
        folder = self.remote.child(artifact.stage, artifact.fingerprint)
        try:
            folder.delete(MANIFEST)
            folder.delete()
            for rel in artifact.manifest["files"]:
                folder.upload(artifact.path / rel, rel)
            folder.write_bytes(MANIFEST, _manifest_bytes(artifact.manifest))
        except OSError as err:
            raise StoreError(f"{artifact.stage}: uploading to {folder} failed ({err}); nothing was committed there "
                             f"(the files stay in {artifact.path})") from err
        return replace(artifact, remote=folder.uri)

    def _write_manifest(self, artifact: Artifact, manifest: dict) -> None:
        if artifact.path.is_dir() or artifact.remote is None:
            write_json(artifact.path / MANIFEST, manifest)
        if artifact.remote is not None:
            RemoteFolder(artifact.remote).write_bytes(MANIFEST, _manifest_bytes(manifest))


def _manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=2, default=str).encode()


def size_problems(artifact: Artifact) -> list[str]:
    """Recorded files that are missing or changed size (cheap: a stat per file, or one object-store listing)."""
    problems = []
    if artifact.remote is not None:
        sizes = RemoteFolder(artifact.remote).file_sizes()
        for rel, record in artifact.manifest.get("files", {}).items():
            if rel not in sizes:
                problems.append(f"{rel} is missing")
            elif sizes[rel] != record["size"]:
                problems.append(f"{rel} has {sizes[rel]} bytes, {record['size']} recorded")
        return problems
    for rel, record in artifact.manifest.get("files", {}).items():
        path = artifact.path / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != record["size"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, {record['size']} recorded")
    return problems


def hash_problems(artifact: Artifact) -> list[str]:
    """Recorded files that are missing, resized or altered (reads every byte; on an object store, the
    stored objects themselves)."""
    problems = size_problems(artifact)
    damaged = {p.split(" ", 1)[0] for p in problems}
    remote = RemoteFolder(artifact.remote) if artifact.remote is not None else None
    for rel, record in artifact.manifest.get("files", {}).items():
        digest = remote.sha256(rel) if remote is not None and rel not in damaged else None
        if rel not in damaged and (digest or sha256_file(artifact.path / rel)) != record["sha256"]:
            problems.append(f"{rel} does not match its recorded sha256")
    return problems


def model_problems(model_dir: Path, model_type: str | None) -> list[str]:
    """Why a stage's model folder would not load: no config, no safetensors, or an unreadable header."""
    if model_type not in MODEL_FILES:
        return []  # the stage makes no model (an eval stage)
    if not model_dir.is_dir():
        return [f"it has no {MODEL_DIR}/ folder"]
    config, weights = MODEL_FILES[model_type]
    weights = weights or sorted(p.name for p in model_dir.glob("*.safetensors"))
    problems = [] if (model_dir / config).is_file() else [f"{MODEL_DIR}/{config} is missing"]
    if not weights or not all((model_dir / w).is_file() for w in weights):
        return [*problems, f"{MODEL_DIR}/ has no {' / '.join(weights) if weights else '*.safetensors'} weights"]
    from safetensors import safe_open

    for name in weights:
        try:
            with safe_open(str(model_dir / name), framework="pt") as handle:
                if not list(handle.keys()):
                    problems.append(f"{MODEL_DIR}/{name} holds no tensors")
        except Exception as err:  # noqa: BLE001 - any unreadable header
            problems.append(f"{MODEL_DIR}/{name} is not a readable safetensors file ({err})")
    return problems


def _attempt_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{socket.gethostname()}-{os.getpid()}"


def _read_artifact(stage: str, folder: Path) -> Artifact | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if manifest.get("status") != "complete":
        return None
    return Artifact(stage=stage, fingerprint=folder.name, path=folder, manifest=manifest)


# --------------------------------------------------------------------------- fingerprints


def fingerprint(payload: Any) -> str:
    """A short stable hash of JSON-able content."""
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_model_location(location: str, revision: str | None = None) -> str:
    """A model folder is hashed by the content of every file (``content_hash.folder_digest``: paid once
    per file version); a hub id by its name and ``base.revision``."""
    path = Path(location)
    if not path.is_dir():
        return fingerprint({"hub": location, "revision": revision})
    return fingerprint(folder_digest(path))


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
