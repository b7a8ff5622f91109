"""What a stage is: a kind with its config class and a ``run(ctx) -> StageResult``.

Each stage module declares ``STAGE = StageKind(...)`` next to its config class; ``stages.registry``
collects them. The runner (``pipeline.runner``) builds a :class:`StageContext` -- the typed config,
the upstream artifacts, the folder to write into and the run's services -- and calls the stage's
``run``; the stage writes a Hugging Face folder to ``ctx.model_dir`` and returns its metrics. The
runner owns fingerprints, caching and the manifest; a stage never imports ``pipeline``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stages.config import BaseConfig, ConfigModel, DataConfig, StageConfig, TrackingConfig
from stages.log import stage_log


class UpstreamArtifact(Protocol):
    """An upstream stage's output as the runner hands it over (``pipeline.store.Artifact``)."""

    stage: str
    fingerprint: str
    path: Path
    manifest: dict

    @property
    def model_dir(self) -> Path: ...

    @property
    def metrics(self) -> dict: ...


@dataclass(frozen=True)
class RunServices:
    """What a stage may know of the run around it, and the run's services, lent by the runner."""

    pipeline: str  # the pipeline's name
    run_root: Path  # <storage>/<name>: adapters merged for reuse go to <run_root>/.merged
    base: BaseConfig
    tracking: TrackingConfig
    stage_kinds: Mapping[str, str]  # every stage of the pipeline -> its kind
    resolve_path: Callable[[str], str]  # a path as written in the file -> absolute
    connect_ray: Callable[[], None]  # start or join Ray (a no-op once connected)
    fingerprint: Callable[[Any], str]  # the store's content hash
    data_fingerprint: Callable[[str], str]  # content hash of a data source
    earlier_outputs: Callable[[str], list[Path]]  # a stage's complete artifact folders, newest first
    # The run's folder on an object store (<storage>/<name>, a URI without credentials) when `storage` is
    # one; run_root is then this host's mirror of it. Ray Train keeps its run state and checkpoints there.
    storage_uri: str | None = None

    @property
    def trust_remote_code(self) -> bool:
        return self.base.trust_remote_code


@dataclass
class StageContext:
    name: str
    config: ConfigModel  # the stage's config (BaseConfig for the base node)
    inputs: dict[str, UpstreamArtifact]  # role ("from", "reward", ...) -> upstream artifact
    work_dir: Path  # the partial artifact folder; survives a crash so the stage can resume
    fingerprint: str
    run: RunServices
    started: float = field(default_factory=time.monotonic)

    @property
    def model_dir(self) -> Path:
        return self.work_dir / "model"

    def resolve(self, path: str) -> str:
        return self.run.resolve_path(path)

    def log(self, message: str) -> None:
        """One progress line, with the seconds since the stage started (where its time goes)."""
        stage_log(self.name, message, self.started)


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # final numbers
    curves: dict[str, list] = field(default_factory=dict)  # name -> [{"step":..., "value":...}]
    data: dict[str, Any] = field(default_factory=dict)  # loader summaries: read/used/skipped
    manifest: dict[str, Any] = field(default_factory=dict)  # extra manifest keys (model_type, ...)


@dataclass(frozen=True)
class StageKind:
    """One registry entry: a stage kind, its config class and its ``run``.

    ``run`` is ``"module:function"``, imported when the stage runs, so that loading a pipeline file
    does not import torch. The data inputs are the config class's ``data_inputs``.
    """

    kind: str
    config: type[ConfigModel]
    run: str

    def runner(self) -> Callable[[StageContext], StageResult]:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)

    @property
    def data_inputs(self) -> Mapping[str, str]:
        return getattr(self.config, "data_inputs", {})


def data_sources(config: StageConfig) -> dict[str, tuple[DataConfig, str]]:
    """Config field -> (its DataConfig, the record kind the stage needs), for every data input."""
    sources = {}
    for field_name, default_kind in config.data_inputs.items():
        record_kind = config.record_kind(field_name, default_kind)
        value = config
        for part in field_name.split("."):  # a nested section's data: "continual.ewc.data"
            value = getattr(value, part, None)
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
