"""Object-store storage: one small layer over pyarrow's filesystems for a ``storage:`` that is a URI.

``storage: s3://bucket/prefix`` (or ``gs://``, ``abfs://``, ``hdfs://``: any URI that
``pyarrow.fs.FileSystem.from_uri`` reads, with its query options, e.g.
``?endpoint_override=127.0.0.1:9000&scheme=http`` for an S3-compatible server) holds the artifact
store (``pipeline.store``), Ray Train's run state and checkpoints (``stages.launcher``) and the
report. pyarrow is what Ray Train itself uses for ``storage_path``, so one client, one set of options
and one credential chain serve all three (own code only for the few calls the store needs).

Credentials never go in the URI (it is written to manifests, logs and reports): a URI with
``user:secret@`` or a secret-looking query key is refused; pyarrow reads them from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, instance roles, ...).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

# The schemes pyarrow.fs.FileSystem.from_uri maps to a remote filesystem ("file://" is a local path).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SECRET_QUERY_KEYS = ("key", "secret", "token", "password", "credential", "sas")


class StorageError(ValueError):
    """``storage`` cannot be used: a bad URI, credentials in it, an unreachable bucket. Names ``storage``."""


def uri_scheme(storage: str) -> str | None:
    """The scheme of a URI-shaped ``storage`` ("s3"), else None (a local path)."""
    match = _URI.match(storage)
    return match.group(1).lower() if match else None


def is_remote(storage: str) -> bool:
    scheme = uri_scheme(storage)
    return scheme is not None and scheme != "file"


def storage_problem(storage: str) -> str | None:
    """Why ``storage`` cannot be used, without contacting anything (checked when the file is loaded).
    The message never repeats the URI: it may hold the secret it complains about."""
    scheme = uri_scheme(storage)
    if scheme is None or scheme == "file":
        return None
    if scheme not in REMOTE_SCHEMES:
        return (f"storage: unknown scheme {scheme!r}; expected a local path or a URI pyarrow reads "
                f"({', '.join(s + '://' for s in REMOTE_SCHEMES)})")
    parts = urlsplit(storage)
    if "@" in parts.netloc:
        return ("storage: the URI carries credentials (user:secret@); remove them and set them in the environment "
                "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for s3://), where pyarrow reads them: the URI is "
                "written to manifests, logs and reports")
    secret_keys = [k for k, _ in parse_qsl(parts.query) if any(word in k.lower() for word in _SECRET_QUERY_KEYS)]
    if secret_keys:
        return (f"storage: the URI carries credentials ({', '.join(sorted(set(secret_keys)))}=...); set them in the "
                f"environment instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN for s3://)")
    if not parts.netloc:
        return f"storage: {scheme}:// needs a bucket (or host): {scheme}://<bucket>/<prefix>"
    return None


def default_mirror(storage: str) -> Path:
    """Where a run on this host keeps its local working copy of a remote ``storage`` (``storage_cache``
    overrides it): ~/.cache/rayalign/storage/<scheme>/<bucket>/<prefix>."""
    parts = urlsplit(storage)
    return Path("~/.cache/rayalign/storage").expanduser() / parts.scheme / parts.netloc / parts.path.strip("/")


# --------------------------------------------------------------------------- which local root mirrors what
# A spec registers its run's local mirror when asked for it (PipelineSpec.run_root), so that every
# ArtifactStore opened on that folder, by whichever module, reads and writes the remote store.
_MIRRORS: dict[Path, str] = {}


def register_mirror(local_root: Path, uri: str) -> None:
    _MIRRORS[Path(local_root).resolve()] = uri


def mirrored_uri(local_root: Path) -> str | None:
    return _MIRRORS.get(Path(local_root).resolve())


# --------------------------------------------------------------------------- a folder on a remote filesystem


@cache
def _filesystem(uri: str):
    """pyarrow's filesystem for a URI (one client per URI, reused: an S3 client is costly to build)."""
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - ArrowInvalid (bad URI/option), OSError (no such client)
        raise StorageError(f"storage: pyarrow cannot open {uri}: {err}") from None


@dataclass(frozen=True)
class RemoteFolder:
    """A folder on a pyarrow filesystem: ``uri`` (options kept, never credentials) for messages and for
    reopening elsewhere; ``fs`` and ``path`` for pyarrow (and Ray Train's ``storage_filesystem``)."""

    uri: str

    @property
    def fs(self):
        return _filesystem(self._root_uri())[0]

    @property
    def path(self) -> str:
        root_path = _filesystem(self._root_uri())[1].rstrip("/")
        rel = self._rel()
        return f"{root_path}/{rel}" if rel else root_path

    def _root_uri(self) -> str:  # the bucket (or host) level: one filesystem object per store
        parts = urlsplit(self.uri)
        return urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))

    def _rel(self) -> str:
        return urlsplit(self.uri).path.strip("/")

    def child(self, *names: str) -> RemoteFolder:
        parts = urlsplit(self.uri)
        path = "/".join([parts.path.rstrip("/"), *[n.strip("/") for n in names]])
        return RemoteFolder(urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")))

    def __str__(self) -> str:
        parts = urlsplit(self.uri)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))

    # ------------------------------------------------------------------ reading
    def check_reachable(self) -> None:
        """Fail with a message naming ``storage`` unless the bucket (or the path's top) can be read."""
        from pyarrow import fs as pafs

        top = self.path.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(top)
        except Exception as err:  # noqa: BLE001 - connection refused, access denied, DNS
            raise StorageError(f"storage: cannot reach {self}: {type(err).__name__}: {err}") from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"storage: {self}: the bucket {top!r} does not exist (create it first)")

    def file_sizes(self) -> dict[str, int]:
        """Relative path -> size of every file under this folder (one listing)."""
        from pyarrow import fs as pafs

        base = self.path
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def subfolders(self) -> list[str]:
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def read_bytes(self, rel: str) -> bytes | None:
        """A file's content, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{rel}") as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open_input_stream(f"{self.path}/{rel}") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def download(self, rel: str, local: Path) -> None:
        """Copy a file down, written aside and renamed: a local file at its name is always whole."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.download")
        with self.fs.open_input_stream(f"{self.path}/{rel}") as source, open(tmp, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        os.replace(tmp, local)

    # ------------------------------------------------------------------ writing
    def write_bytes(self, rel: str, data: bytes) -> None:
        """One object, visible whole or not at all (an object store has no half-written objects)."""
        self._make_parent(rel)
        with self.fs.open_output_stream(f"{self.path}/{rel}") as stream:
            stream.write(data)

    def upload(self, local: Path, rel: str) -> None:
        self._make_parent(rel)
        with open(local, "rb") as source, self.fs.open_output_stream(f"{self.path}/{rel}") as target:
            shutil.copyfileobj(source, target, 1 << 20)

    def upload_tree(self, local_dir: Path) -> None:
        for file in sorted(Path(local_dir).rglob("*")):
            if file.is_file():
                self.upload(file, file.relative_to(local_dir).as_posix())

    def delete(self, rel: str | None = None) -> None:
        """Remove a file (``rel``) or this whole folder; absent is fine."""
        target = f"{self.path}/{rel}" if rel else self.path
        try:
            if rel:
                self.fs.delete_file(target)
            else:
                self.fs.delete_dir(target)
        except FileNotFoundError:
            pass

    def _make_parent(self, rel: str) -> None:
        if self.fs.type_name != "s3":  # S3 has no folders; other filesystems need them
            self.fs.create_dir(f"{self.path}/{rel}".rsplit("/", 1)[0], recursive=True)


def ray_storage(uri: str, *names: str) -> tuple[str, object]:
    """Ray Train's ``storage_path`` and ``storage_filesystem`` for a folder under a remote store."""
    folder = RemoteFolder(uri).child(*names)
    return folder.path, folder.fs
