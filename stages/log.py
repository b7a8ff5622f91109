"""rayalign's one log format: ``[rayalign] <stage> +<seconds>s: <message>`` on stderr.

Driver and Ray workers log through the ``rayalign`` logger; Ray forwards a worker's stderr to the
driver, so worker lines arrive in the same format.
"""

from __future__ import annotations

import logging
import os
import sys
import time

LOGGER = logging.getLogger("rayalign")
VERBOSE_ENV = "RAYALIGN_VERBOSE"  # "1": show everything (``rayalign -v``); set before Ray starts, so workers inherit it
# Notices that say nothing a user can act on, kept out of quiet runs: bitsandbytes' missing optional
# CPU kernel package (warned on every import).
QUIET_LOGGERS = {"bitsandbytes": logging.ERROR}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the write (a test harness or a notebook may
    swap it after the handler was made; a handler bound to the old one would write to a closed file)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure() -> None:
    """Send the ``rayalign`` logger to stderr with the one format (idempotent; once per process).

    Unless verbose, also quiets :data:`QUIET_LOGGERS` (their levels stick even when set before the
    library is imported).
    """
    if any(getattr(h, "rayalign", False) for h in LOGGER.handlers):
        return
    if not is_verbose():
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[rayalign] %(message)s"))
    handler.rayalign = True
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def log(message: str) -> None:
    """A progress line that belongs to no stage (the runner's cache decisions, ...)."""
    configure()
    LOGGER.info(message)
    for handler in LOGGER.handlers:
        handler.flush()


def stage_log(stage: str, message: str, started: float | None = None) -> None:
    """A stage's progress line; with ``started`` (a ``time.monotonic()``), the seconds since then."""
    elapsed = f" +{time.monotonic() - started:.0f}s" if started is not None else ""
    log(f"{stage}{elapsed}: {message}")


def progress(done: int, total: int, width: int = 20) -> str:
    """``step 40/100 [########------------] 40%``: the bar a stage's progress lines carry (a log line, not
    a redrawn terminal bar: Ray forwards worker output line by line, and the run log keeps it)."""
    total = max(total, 1)
    filled = min(width, round(width * done / total))
    return f"{done}/{total} [{'#' * filled}{'-' * (width - filled)}] {100 * done / total:.0f}%"

