"""What a stage is: a function ``run(ctx) -> StageResult`` registered under its kind.

The runner builds a :class:`StageContext` (the typed config, the upstream artifacts, the folder
to write into) and calls the stage's ``run``; the stage writes a Hugging Face folder to
``ctx.model_dir`` and returns its metrics. The runner owns fingerprints, caching and the manifest.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.spec import DataConfig, PipelineSpec, StageConfig
from pipeline.store import Artifact

# Stage kind -> "module:function". Imported lazily: a stage's heavy imports load only when it runs.
STAGE_RUNNERS: dict[str, str] = {
    "base": "stages.pretrained:run",
    "sft": "stages.sft:run",
    "reward": "stages.reward:run",
    "dpo": "stages.dpo:run",
    "ppo": "stages.ppo.stage:run",
    "eval": "stages.evaluate.stage:run",
}

# Stage kind -> {config field holding a DataConfig: the record kind the loader must produce}.
DATA_KINDS: dict[str, dict[str, str]] = {
    "sft": {"data": "sft"},
    "reward": {"data": "preference"},
    "dpo": {"data": "preference"},  # DPOConfig.record_kind: "kto" for the kto loss
    "ppo": {"prompts": "prompt"},
    # task_data: EvalConfig property, the tasks' prompt files (builtin:<task>/test by default)
    "eval": {"prompts": "prompt", "task_data": "prompt", "sft_data": "sft", "preference_data": "preference"},
}


@dataclass
class StageContext:
    name: str
    config: StageConfig | None  # None for the base node
    spec: PipelineSpec
    inputs: dict[str, Artifact]  # role ("from", "reward", ...) -> upstream artifact
    work_dir: Path  # the partial artifact folder; survives a crash so the stage can resume
    fingerprint: str
    started: float = field(default_factory=time.monotonic)

    @property
    def model_dir(self) -> Path:
        return self.work_dir / "model"

    def resolve(self, path: str) -> str:
        return self.spec.resolve_path(path)

    def log(self, message: str) -> None:
        """One progress line, with the seconds since the stage started (where its time goes)."""
        print(f"[rayalign] {self.name} +{time.monotonic() - self.started:.0f}s: {message}", file=sys.stderr,
              flush=True)


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # final numbers
    curves: dict[str, list] = field(default_factory=dict)  # name -> [{"step":..., "value":...}]
    data: dict[str, Any] = field(default_factory=dict)  # loader summaries: read/used/skipped
    manifest: dict[str, Any] = field(default_factory=dict)  # extra manifest keys (model_type, ...)


def stage_runner(kind: str) -> Callable[[StageContext], StageResult]:
    target = STAGE_RUNNERS.get(kind)
    if target is None:
        raise KeyError(f"no runner for stage kind {kind!r}; known: {', '.join(sorted(STAGE_RUNNERS))}")
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def data_sources(config: StageConfig) -> dict[str, tuple[DataConfig, str]]:
    """Config field -> (its DataConfig, the record kind the stage needs), for every data input."""
    sources = {}
    for field_name, record_kind in DATA_KINDS.get(config.kind, {}).items():
        if hasattr(config, "record_kind"):  # a config whose settings choose the record kind (dpo loss: kto)
            record_kind = config.record_kind(field_name, record_kind)
        value = getattr(config, field_name, None)
        for i, data in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(data, DataConfig):
                sources[field_name if not isinstance(value, list) else f"{field_name}[{i}]"] = (data, record_kind)
    return sources


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def seconds(self) -> float:
        return round(time.monotonic() - self.start, 2)
