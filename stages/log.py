"""rayalign's one log format: ``[rayalign] <stage> +<seconds>s: <message>`` on stderr.

Driver and Ray workers log through the ``rayalign`` logger; Ray forwards a worker's stderr to the
driver, so worker lines arrive in the same format.
"""

from __future__ import annotations

import logging
import sys
import time

LOGGER = logging.getLogger("rayalign")


def configure() -> None:
    """Send the ``rayalign`` logger to stderr with the one format (idempotent; once per process)."""
    if any(getattr(h, "rayalign", False) for h in LOGGER.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
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
