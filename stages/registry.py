"""Every stage kind, one entry each: ``STAGE = StageKind(kind, config class, run)`` in its module.

A new kind is one module that declares its ``STAGE`` at module level; it is found by reading the
``stages`` package's sources (``ast``, nothing imported but the modules that declare one). Kinds
from other packages register under the ``rayalign.stages`` entry-point group (the value: a module
that declares ``STAGE``).
"""

from __future__ import annotations

import ast
import importlib
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

from stages.config import StageConfig, suggest
from stages.stage import StageKind

BASE_KIND = "base"
PACKAGE_ROOT = Path(__file__).resolve().parent
ENTRY_POINT_GROUP = "rayalign.stages"


def declares_stage(source: str) -> bool:
    """Whether a module's source assigns ``STAGE = StageKind(...)`` at its top level."""
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "STAGE" for t in node.targets)
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "StageKind"):
            return True
    return False


@cache
def stage_modules() -> tuple[str, ...]:
    """The modules that declare a stage kind: this package's (by reading them), then entry points'."""
    found = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "STAGE" in source and declares_stage(source):
            relative = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
            found.append(".".join(relative.parts))
    found += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    return tuple(found)


@cache
def stage_kinds() -> dict[str, StageKind]:
    """Kind -> its entry, for every kind (``base`` included)."""
    kinds = {}
    for module in stage_modules():
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
