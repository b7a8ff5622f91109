"""The pipeline spec: one YAML file, loaded into typed, validated models.

The pipeline-level sections (ray, kubernetes) live here; each stage kind's config class lives
with its stage and comes from ``stages.registry``, the sections stages share from ``stages.config``.
This module owns loading, ``--set`` overrides and the did-you-mean messages. A pipeline file looks like::

    name: tiny
    storage: runs
    base: {model: "builtin:tiny-llama"}
    stages:
      sft:
        data: builtin:addition
        train: {max_steps: 200, lr: 2.0e-3}
      dpo:
        from: sft
        data: builtin:addition

Load it with :func:`load_spec` (which also applies ``--set a.b=c`` overrides) and every
mistake comes back as a :class:`SpecError` naming the key path, with a suggestion for
misspelled keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from stages.config import BaseConfig, ConfigModel, StageConfig, TrackingConfig, suggest
from stages.registry import BASE_KIND, stage_configs
from stages.remote_storage import RemoteFolder, default_mirror, is_remote, register_mirror, storage_problem


class SpecError(ValueError):
    """A pipeline file that cannot be used; the message names the key path."""


# A stage name becomes a folder of the store (<storage>/<name>/<stage>/): no path separators, no dots.
STAGE_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
RESERVED_STAGE_NAMES = ("base", "report")
# A validator's message may start with the key it is about, relative to the model it checks
# ("peft.r: ..."); the error then names the full path (stages.grpo.peft.r).
_RELATIVE_KEY = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*")


# --------------------------------------------------------------------------- pipeline-level sections


class RayConfig(ConfigModel):
    address: str | None = Field(None, description="Ray cluster address to join; absent: RAY_ADDRESS when set, else "
                                "a new private local Ray instance (no dashboard).")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance (default: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray instance (default: all).")
    namespace: str = "rayalign"
    check_resources: bool = Field(
        True, description="Fail a stage at once when the cluster lacks what its resource plan needs "
        "(stages.resources); off for autoscaling clusters that grow on demand."
    )


class KubernetesConfig(ConfigModel):
    """How ``rayalign k8s`` renders a KubeRay ``RayJob`` for this pipeline (see k8s/README.md)."""

    image: str = Field("rayalign:0.1.0", description="Image with rayalign and its stack installed (k8s/Dockerfile).")
    namespace: str = "default"
    service_account: str | None = Field(None, description="serviceAccountName of the Ray pods.")
    storage_claim: str | None = Field(
        None, description="PVC (ReadWriteMany: NFS, CephFS, EFS, Filestore) mounted on every pod; holds `storage`."
    )
    storage_mount: str = Field("/mnt/rayalign", description="Where the claim is mounted; storage becomes <mount>/runs (with an object-store storage: "
                               "storage_cache becomes <mount>/cache).")
    ray_version: str = "2.60.0"
    ttl_seconds_after_finished: int = Field(
        3600, ge=0, description="Delete the job's Ray cluster this long after the job ends (the RayJob object stays)."
    )
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_memory: str = Field("8Gi", description="Memory of each worker pod (one Ray Train worker per pod).")
    hf_token_secret: str | None = Field(
        None, description="Secret (key HF_TOKEN) exposed as HF_TOKEN in the pods; the token never enters the manifest."
    )
    storage_secret: str | None = Field(
        None, description="Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) become environment "
        "variables of every Ray pod (envFrom), for an object-store `storage`; never literal in the manifest."
    )
    hub_offline: bool = Field(True, description="HF_HUB_OFFLINE in the pods; false lets them download hub models.")
    gpus_per_pod: int | None = Field(
        None, ge=1, description="GPUs per worker pod (e.g. 8: a node's NVLink for NCCL); default one Ray member's."
    )
    workers: int | None = Field(
        None, ge=1, description="Worker pods (replicas); default: as many as the largest stage needs, and no fewer."
    )
    cpu_headroom: int = Field(
        1, ge=0, description="CPUs per worker container beyond those Ray schedules (raylet, object store, loaders)."
    )
    submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode"] = Field(
        "K8sJobMode", description="How KubeRay submits the job: a submitter pod (K8sJobMode), the operator, a sidecar."
    )
    active_deadline_seconds: int | None = Field(
        86400, ge=1, description="The job fails when it has run this long (KubeRay activeDeadlineSeconds); null: none."
    )
    backoff_limit: int = Field(
        1, ge=0, description="Retries of a failed job, each on a new Ray cluster (finished stages stay cached)."
    )
    run_as_user: int = Field(1000, ge=1, description="Non-root uid of every container (the Ray image's `ray`).")
    run_as_group: int = Field(100, ge=0, description="gid and fsGroup of every pod (the Ray image's `users`).")
    cluster_selector: str | None = Field(
        None, description="Run on this existing RayCluster (clusterSelector ray.io/cluster) instead of a new one."
    )


class PipelineSpec(ConfigModel):
    # The run's folder under storage: never "." or "..".
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    storage: str = Field(
        "runs", description="The artifact store: a folder (relative to this file), or an object-store URI that "
        "pyarrow reads (s3://bucket/prefix, with options such as ?endpoint_override=host:port&scheme=http; "
        "credentials from the environment, never in the URI)."
    )
    storage_cache: str | None = Field(
        None, description="With an object-store `storage`: this host's working folder, a local mirror of the "
        "store that stages write into before upload; default ~/.cache/rayalign/storage/<scheme>/<bucket>/<prefix>."
    )
    max_concurrent_stages: int = Field(
        1, ge=1, description="How many stages whose upstream is ready run at once (such as the reward, DPO and "
        "PPO stages after SFT); each still waits for its Ray resources. 1: one at a time, in the file's order."
    )
    ray: RayConfig = RayConfig()
    base: BaseConfig = BaseConfig()
    tracking: TrackingConfig = TrackingConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    stages: dict[str, StageConfig] = Field(default_factory=dict)

    # Where the file was read from; relative paths resolve against its folder.
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _sweep_lives_in_its_stage(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "sweep" in raw:
            stage = (raw["sweep"] or {}).get("stage", "<stage>") if isinstance(raw["sweep"], dict) else "<stage>"
            raise ValueError(f"sweep: a sweep is a section of the stage it sweeps: move it to stages.{stage}.sweep "
                             f"(without stage:)")
        return raw

    @field_validator("storage")
    @classmethod
    def _usable_storage(cls, storage: str) -> str:
        if problem := storage_problem(storage):
            raise ValueError(problem.removeprefix("storage: "))  # the error names the key
        return storage

    @field_validator("stages")
    @classmethod
    def _safe_names(cls, stages: dict[str, StageConfig]) -> dict[str, StageConfig]:
        for name in stages:
            problem = stage_name_problem(name)
            if problem:
                raise ValueError(problem)
        return stages

    def storage_root(self) -> Path:
        """The local folder of the store: ``storage`` itself, or, for an object store, this host's mirror."""
        if is_remote(self.storage):
            local = os.path.expanduser(self.storage_cache) if self.storage_cache else default_mirror(self.storage)
        else:
            local = os.path.expanduser(urlsplit(self.storage).path if self.storage.startswith("file://")
                                       else self.storage)
        root = Path(local)
        if not root.is_absolute() and self.source is not None:
            root = self.source.parent / root
        return root.resolve()

    def storage_uri(self) -> str | None:
        """The run's folder on the object store (``<storage>/<name>``, options kept), or None for a local store."""
        if not is_remote(self.storage):
            return None
        return RemoteFolder(self.storage).child(self.name).uri

    def run_root(self) -> Path:
        """The run's local folder; with an object store, its mirror (registered, so that every
        ``ArtifactStore`` opened on it reads and writes the object store)."""
        root = self.storage_root() / self.name
        if (uri := self.storage_uri()) is not None:
            register_mirror(root, uri)
        return root

    def resolve_path(self, path: str) -> str:
        """A data or model path as written in the file, made absolute against the file's folder."""
        if path.startswith("builtin:") or os.path.isabs(path) or self.source is None:
            return path
        candidate = (self.source.parent / path).resolve()
        return str(candidate) if candidate.exists() else path


# --------------------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    """Read a pipeline YAML file, apply ``a.b.c=value`` overrides, and validate it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as err:  # one line: where, and what the parser expected
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{path}{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    for override in overrides or []:
        apply_override(raw, override)
    spec = parse_spec(raw, where=str(path))
    spec.source = path.resolve()
    return spec


def parse_spec(raw: dict, where: str = "<spec>") -> PipelineSpec:
    """Validate a raw spec dict; every problem is reported, each with its key path."""
    problems: list[str] = []
    stages: dict[str, StageConfig] = {}
    raw_stages = raw.get("stages") or {}
    if not isinstance(raw_stages, dict):
        raise SpecError(f"{where}: stages: expected a mapping of stage name -> stage config")
    for name, stage_raw in raw_stages.items():
        problem = stage_name_problem(name)
        if problem:
            problems.append(f"stages: {problem}")
            continue
        try:
            stages[name] = parse_stage(name, stage_raw)
        except ValidationError as err:
            problems += [_describe(e, raw, prefix=["stages", name]) for e in err.errors()]
        except SpecError as err:
            problems.append(str(err))
    try:
        spec = PipelineSpec.model_validate({**raw, "stages": {}})
    except ValidationError as err:
        problems += [_describe(e, raw) for e in err.errors()]
    if problems:
        raise SpecError(f"{where}: " + "\n  ".join(problems))
    try:
        spec.stages = stages
    except ValidationError as err:
        raise SpecError(f"{where}: " + "\n  ".join(_describe(e, raw) for e in err.errors())) from None
    return spec


def stage_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a stage name (it becomes a folder of the store), or None."""
    if name in RESERVED_STAGE_NAMES:
        return f"stage name {name!r} is reserved"
    if not isinstance(name, str) or not re.fullmatch(STAGE_NAME_PATTERN, name):
        return (f"{name!r} is not a valid stage name: it must match {STAGE_NAME_PATTERN} (a lower-case letter, "
                "then up to 63 lower-case letters, digits, _ or -), since it names a folder of the store")
    return None


def parse_stage(name: str, raw: Any) -> StageConfig:
    """Validate one stage's config with the model of its kind (the kind defaults to the name)."""
    if not isinstance(raw, dict):
        raise SpecError(f"stages.{name}: expected a mapping, got {type(raw).__name__}")
    kind = raw.get("kind", name)
    configs = stage_configs()
    config_cls = configs.get(kind)
    if config_cls is None:
        where = f"stages.{name}.kind" if "kind" in raw else f"stages.{name}"
        hint = ("; the base model is the top-level `base:` section" if kind == BASE_KIND
                else suggest(kind, configs))
        raise SpecError(
            f"{where}: unknown stage kind {kind!r}{hint} "
            f"(known kinds: {', '.join(sorted(configs))}; the kind defaults to the stage name)"
        )
    return config_cls.model_validate({**raw, "kind": kind})


def apply_override(raw: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a raw spec dict; the value is parsed as YAML (so 3 is an int)."""
    if "=" not in override:
        raise SpecError(f"--set {override!r}: expected KEY.PATH=VALUE")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    if len(parts) > 2 and parts[0] == "stages" and parts[1] not in stages:
        raise SpecError(f"--set {key}: there is no stage {parts[1]!r} in this pipeline{suggest(parts[1], stages)} "
                        f"(stages: {', '.join(stages) or 'none'})")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = yaml.safe_load(text)


def _describe(error: dict, raw: dict, prefix: list[str] | None = None) -> str:
    loc = (prefix or []) + [str(p) for p in error["loc"] if not str(p).startswith("function-")]
    # Pydantic puts the model class name into the path of a tagged field; drop those.
    loc = [p for p in loc if not p[:1].isupper()]
    path = ".".join(loc)
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1], raw)
        hint = suggest(loc[-1], parent.model_fields if parent else {}, aliases=True)
        return f"{path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    if error["type"] == "value_error":
        message = error["msg"].removeprefix("Value error, ")
        key, sep, rest = message.partition(": ")
        if sep and _RELATIVE_KEY.fullmatch(key):  # "peft.r: ..." from a validator of the stage
            return f"{path}.{key}: {rest}" if path else message
        return f"{path}: {message}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{path}: {error['msg']}{shown}"


def _model_at(loc: list[str], raw: dict) -> type[BaseModel] | None:
    """The config model class that sits at a key path (used to suggest a valid key)."""
    model: type[BaseModel] | None = PipelineSpec
    node: Any = raw
    i = 0
    while i < len(loc) and model is not None:
        key = loc[i]
        if model is PipelineSpec and key == "stages" and i + 1 < len(loc):
            stage_raw = (node.get("stages") or {}).get(loc[i + 1], {})
            kind = stage_raw.get("kind", loc[i + 1]) if isinstance(stage_raw, dict) else None
            model = stage_configs().get(kind)
            node = stage_raw
            i += 2
            continue
        field = _field(model, key)
        if field is None:
            return None
        model = _section_model(field.annotation)
        node = node.get(key, {}) if isinstance(node, dict) else {}
        i += 1
    return model


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds: its type, or the one model inside an optional or annotated type
    (``critic: CriticConfig | None``), so that a misspelt key in such a section gets a suggestion too."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = {m for arg in get_args(annotation) if (m := _section_model(arg)) is not None}
    return models.pop() if len(models) == 1 else None


def _field(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None
