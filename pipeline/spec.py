"""The pipeline spec: one YAML file, loaded into typed, validated models.

Every default of rayalign lives in this module. A pipeline file looks like::

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

import difflib
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """A pipeline file that cannot be used; the message names the key path."""


class _Model(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


# --------------------------------------------------------------------------- shared sections


class RayConfig(_Model):
    address: str | None = Field(None, description="Ray cluster address; absent starts a local Ray instance.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance (default: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray instance (default: all).")
    namespace: str = "rayalign"


class BaseConfig(_Model):
    model: str = Field("builtin:tiny-llama", description="HF model id, local HF folder, or builtin:<name>.")
    revision: str | None = None
    trust_remote_code: bool = False
    # Options of the builtin tiny base (ignored for real models).
    pretrain_steps: int = Field(300, ge=0)
    seed: int = 0


class DataConfig(_Model):
    path: str = Field(description="A file, a folder, or builtin:<task>[/<split>].")
    format: str | None = Field(None, description="Data format; detected when absent.")
    limit: int | None = Field(None, ge=1, description="Use at most this many records.")
    eval_path: str | None = Field(None, description="Held-out data for eval loss (same format).")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Hold out this fraction when eval_path is absent.")


class PeftConfig(_Model):
    method: Literal["full", "lora", "qlora", "dora", "ia3", "prompt_tuning"] = "lora"
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    num_virtual_tokens: int = Field(16, ge=1, description="prompt_tuning only.")


class TrainConfig(_Model):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(2e-4, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1, description="Per-worker micro-batch size.")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=8)
    seed: int = 0
    logging_steps: int = Field(10, ge=1)
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps (resume point).")
    eval_steps: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 where the hardware has it, else fp32."
    )
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evals without improvement.")

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class ScalingConfig(_Model):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1: forever).")


class DeepSpeedConfig(_Model):
    zero_stage: Literal[0, 1, 2, 3] | None = Field(None, description="None disables DeepSpeed.")
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and (self.zero_stage or 0) < 1:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class TrackingConfig(_Model):
    backend: Literal["tensorboard", "mlflow", "wandb", "none"] = "tensorboard"
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default a file store in the run folder.")
    project: str | None = Field(None, description="wandb project (default: the pipeline name).")


# --------------------------------------------------------------------------- stages


class StageConfig(_Model):
    """Fields every stage kind has."""

    kind: str
    from_: str | None = Field(None, alias="from", description="Upstream stage whose model this stage starts from.")

    # Names of fields that reference other stages (the DAG is derived from these).
    upstream_fields: ClassVar[tuple[str, ...]] = ("from_",)

    def upstream(self) -> dict[str, str]:
        """Role -> upstream stage name, for every reference this stage makes."""
        refs = {}
        for field_name in self.upstream_fields:
            value = getattr(self, field_name)
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if v is not None:
                    role = field_name.rstrip("_")
                    refs[role if len(values) == 1 else f"{role}[{i}]"] = v
        return refs


class TrainingStageConfig(StageConfig):
    """Fields of every stage that runs a Ray Train job."""

    from_: str | None = Field("base", alias="from")
    data: DataConfig
    peft: PeftConfig = PeftConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    chat_template: str | None = Field(None, description="None: the model's own; or chatml, alpaca, vicuna.")
    merge: bool = Field(False, description="Also write the adapter merged into the base as a full model.")

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class SFTConfig(TrainingStageConfig):
    kind: Literal["sft"] = "sft"
    assistant_only_loss: bool = True
    packing: bool = False


class RewardConfig(TrainingStageConfig):
    """A Bradley-Terry reward model (TRL ``RewardTrainer``) on preference pairs; see ``stages.reward``."""

    kind: Literal["reward"] = "reward"
    use_margin: bool = Field(True, description="Subtract the pairs' margin column (when present) inside the loss.")
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Weight of the centering term mean((r_chosen + r_rejected)^2); None disables it."
    )


class DPOConfig(TrainingStageConfig):
    """Preference optimisation of a policy (TRL DPO/CPO/ORPO/KTO trainers by ``loss``); see ``stages.dpo``."""

    kind: Literal["dpo"] = "dpo"
    loss: str = Field("sigmoid", description="Objective by name (stages.preference_losses.LOSSES).")
    beta: float = Field(0.1, gt=0.0, description="Strength of the implicit KL penalty (IPO: tau; ORPO: lambda).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="robust / simpo: probability a label is flipped.")
    rpo_alpha: float | None = Field(
        None, ge=0.0, description="Weight of an NLL term on the chosen answer (RPO); dpo-family and simpo losses."
    )
    simpo_gamma: float = Field(0.5, ge=0.0, description="simpo: target reward margin gamma.")
    precompute_ref_log_probs: bool = Field(False, description="Compute reference log-probs once before training.")
    desirable_weight: float = Field(1.0, gt=0.0, description="kto: weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="kto: weight of undesirable examples.")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        from stages.preference_losses import get_loss

        get_loss(value)  # ValueError listing the valid names
        return value

    @model_validator(mode="after")
    def _fields_fit_loss(self) -> DPOConfig:
        from stages.preference_losses import check_fields

        check_fields(self.loss, set(self.model_fields_set))
        return self

    def record_kind(self, field_name: str, default: str) -> str:
        """The record kind of a data field: ``kto`` losses read unpaired examples."""
        from stages.preference_losses import family

        return family(self.loss).data_kind if field_name == "data" else default


# Stage kind -> its config model. Later stage kinds register here.
STAGE_CONFIGS: dict[str, type[StageConfig]] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig}


class PipelineSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str = "runs"
    ray: RayConfig = RayConfig()
    base: BaseConfig = BaseConfig()
    tracking: TrackingConfig = TrackingConfig()
    stages: dict[str, StageConfig] = Field(default_factory=dict)

    # Where the file was read from; relative paths resolve against its folder.
    source: Path | None = Field(None, exclude=True)

    @field_validator("stages")
    @classmethod
    def _reserved_names(cls, stages: dict[str, StageConfig]) -> dict[str, StageConfig]:
        for reserved in ("base", "report"):
            if reserved in stages:
                raise ValueError(f"stage name {reserved!r} is reserved")
        return stages

    def storage_root(self) -> Path:
        root = Path(os.path.expanduser(self.storage))
        if not root.is_absolute() and self.source is not None:
            root = self.source.parent / root
        return root.resolve()

    def run_root(self) -> Path:
        return self.storage_root() / self.name

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
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
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


def parse_stage(name: str, raw: Any) -> StageConfig:
    """Validate one stage's config with the model of its kind (the kind defaults to the name)."""
    if not isinstance(raw, dict):
        raise SpecError(f"stages.{name}: expected a mapping, got {type(raw).__name__}")
    kind = raw.get("kind", name)
    config_cls = STAGE_CONFIGS.get(kind)
    if config_cls is None:
        where = f"stages.{name}.kind" if "kind" in raw else f"stages.{name}"
        raise SpecError(
            f"{where}: unknown stage kind {kind!r}{_suggest(kind, STAGE_CONFIGS)} "
            f"(known kinds: {', '.join(sorted(STAGE_CONFIGS))}; the kind defaults to the stage name)"
        )
    return config_cls.model_validate({**raw, "kind": kind})


def apply_override(raw: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a raw spec dict; the value is parsed as YAML (so 3 is an int)."""
    if "=" not in override:
        raise SpecError(f"--set {override!r}: expected KEY.PATH=VALUE")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
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
        hint = _suggest(loc[-1], parent.model_fields if parent else {}, aliases=True)
        return f"{path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    if error["type"] == "value_error":
        return f"{path}: {error['msg'].removeprefix('Value error, ')}"
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
            model = STAGE_CONFIGS.get(kind)
            node = stage_raw
            i += 2
            continue
        field = _field(model, key)
        if field is None:
            return None
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        node = node.get(key, {}) if isinstance(node, dict) else {}
        i += 1
    return model


def _field(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _suggest(word: str, candidates, aliases: bool = False) -> str:
    names = []
    for name in candidates:
        field = candidates[name] if aliases else None
        names.append(field.alias if field is not None and field.alias else name)
    names = [n for n in names if n not in ("source",)]
    # Synonyms from other tools first (HF/TRL names), since difflib cannot see lerning_rate -> lr.
    guess = _SYNONYMS.get(word) or next(
        (v for k, v in _SYNONYMS.items() if difflib.SequenceMatcher(None, word, k).ratio() > 0.8), None
    )
    match = [guess] if guess in names else difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


_SYNONYMS = {
    "learning_rate": "lr",
    "steps": "max_steps",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "lr_schedule",
    "stage": "zero_stage",
    "max_seq_length": "max_length",
    "workers": "num_workers",
}
