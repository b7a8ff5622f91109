"""Every stage kind, one entry each: ``STAGE = StageKind(kind, config class, run)`` in its module.

A new kind is one module that declares its ``STAGE`` (and its config class), listed here once.
"""

from __future__ import annotations

import importlib
from functools import cache

from stages.config import StageConfig, suggest
from stages.stage import StageKind

BASE_KIND = "base"
STAGE_MODULES = (
    "stages.pretrained",
    "stages.sft",
    "stages.reward",
    "stages.dpo",
    "stages.ppo.config",
    "stages.evaluate.config",
)


@cache
def stage_kinds() -> dict[str, StageKind]:
    """Kind -> its entry, for every kind (``base`` included)."""
    kinds = {}
    for module in STAGE_MODULES:
        entry: StageKind = importlib.import_module(module).STAGE
        if entry.kind in kinds:
            raise RuntimeError(f"stage kind {entry.kind!r} is declared twice ({module})")
        kinds[entry.kind] = entry
    return kinds


def stage_configs() -> dict[str, type[StageConfig]]:
    """Kind -> config class, for the kinds a pipeline lists under ``stages:`` (all but ``base``)."""
    return {kind: entry.config for kind, entry in stage_kinds().items() if kind != BASE_KIND}


def stage_kind(kind: str) -> StageKind:
    kinds = stage_kinds()
    if kind not in kinds:
        raise KeyError(f"unknown stage kind {kind!r}{suggest(kind, kinds)}; known: {', '.join(sorted(kinds))}")
    return kinds[kind]
