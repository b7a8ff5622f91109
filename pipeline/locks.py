"""One writer per (stage, fingerprint): an advisory lock file in the store, naming its holder.

The lock is ``fcntl.flock`` on ``<stage>/.lock-<fingerprint>``: the kernel drops it when its holder
dies, however it dies, so a dead holder never blocks a run. The file also holds who took it (host,
pid, start time), so a waiting run can say whom it waits for, and a run that finds the previous
holder's record still there (it never released: it crashed) says that it takes over.

On a shared filesystem this relies on the filesystem's flock (NFSv4 and Lustre map it onto their
byte-range locks; some FUSE mounts do not lock at all).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path


LOCK_PREFIX = ".lock-"


class StageLocked(RuntimeError):
    """Another run holds the stage (raised with ``wait=False``); the message names the holder."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str

    @classmethod
    def me(cls) -> Holder:
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(host=socket.gethostname(), pid=os.getpid(), started=started)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"


class StageLock:
    """``with StageLock(path, ...):`` holds the lock; ``took_over`` names a crashed previous holder."""

    def __init__(self, path: Path, *, wait: bool = True, poll_seconds: float = 2.0,
                 on_wait: Callable[[str], None] = print):
        self.path, self.wait, self.poll_seconds, self.on_wait = Path(path), wait, poll_seconds, on_wait
        self.took_over: Holder | None = None
        self._fd: int | None = None

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        announced = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(fd)
                os.close(fd)
                if not self.wait:
                    raise StageLocked(f"{self.path.parent.name}: another run is writing this stage "
                                      f"({holder or 'holder unknown'}; lock {self.path})") from None
                if not announced:
                    self.on_wait(f"{self.path.parent.name}: waiting for the run that holds it: "
                                 f"{holder or 'holder unknown'} (lock {self.path})")
                    announced = True
                time.sleep(self.poll_seconds)
                continue
            # The releasing run unlinks the file; a lock taken on the unlinked inode would lock nothing.
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            break
        self._fd = fd
        self.took_over = read_holder(fd)  # a record left behind: its holder died holding the lock
        _write_holder(fd, Holder.me())

    def release(self) -> None:
        if self._fd is None:
            return
        # Unlink before unlocking: whoever opened the old file retries on the new one (``_same_file``).
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def lock_path(stage_dir: Path, fingerprint: str) -> Path:
    return Path(stage_dir) / f"{LOCK_PREFIX}{fingerprint}"


def read_holder(fd: int) -> Holder | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return Holder(**json.loads(raw)) if raw.strip() else None
    except (OSError, ValueError, TypeError):
        return None


def _write_holder(fd: int, holder: Holder) -> None:
    blob = json.dumps(asdict(holder)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, blob, 0)
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
