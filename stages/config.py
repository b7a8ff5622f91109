"""The config sections every stage kind shares, and the base every stage config builds on.

The bottom of ``stages``: of rayalign it imports only leaves (``config_base``, ``gates``, ``sweep_config``). A stage kind's own
config class lives with the stage (``stages.sft.SFTConfig``, ``stages.ppo.config.PPOConfig``, ...);
``pipeline.spec`` assembles the pipeline file from them through ``stages.registry``. Every default of a stage's
settings is a field default here or in the stage's config class.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator

from stages.config_base import ConfigModel
from stages.gates import GateError, parse_condition
from stages.sweep_config import SweepConfig


def path_shorthand(value: Any) -> Any:
    """``data: some/file.jsonl`` is short for ``data: {path: some/file.jsonl}``."""
    return {"path": value} if isinstance(value, str) else value


# --------------------------------------------------------------------------- shared sections


class BaseConfig(ConfigModel):
    model: str = Field("builtin:tiny-llama", description="HF model id, local HF folder, or builtin:<name>.")
    revision: str | None = None
    trust_remote_code: bool = False
    # Options of the builtin tiny base (ignored for real models).
    pretrain_steps: int = Field(300, ge=0)
    seed: int = 0


class DataConfig(ConfigModel):
    path: str = Field(description="A file, a folder, or builtin:<task>[/<split>].")
    format: str | None = Field(None, description="Data format; detected when absent.")
    limit: int | None = Field(None, ge=1, description="Use at most this many records.")
    eval_path: str | None = Field(None, description="Held-out data for eval loss (same format).")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Hold out this fraction when eval_path is absent.")
    eval_limit: int | None = Field(
        None, ge=1, description="Use at most this many held-out records (eval during training runs over all of them)."
    )

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value: Any) -> Any:
        """An unknown key with a suggestion (pipeline.spec cannot find this class inside a training stage's
        dataset-or-mixture union to suggest one), and a mixture's keys on a single dataset said where they belong."""
        if not isinstance(value, dict):
            return value
        for key in value:
            if key in cls.model_fields:
                continue
            if key in ("weight", "sampling_temperature", "stopping_strategy"):
                raise ValueError(f"{key}: applies to the datasets of a mixture; give a training stage's data as "
                                 f"a list, e.g. data: [{{path: a.jsonl, weight: 3}}, {{path: b.jsonl, weight: 1}}]")
            raise ValueError(f"{key}: unknown key{suggest(str(key), cls.model_fields)}")
        return value


# A data field: a DataConfig, or just its path as a string.
DataSection = Annotated[DataConfig, BeforeValidator(path_shorthand)]


class DataSource(DataConfig):
    """One dataset of a mixture (a training stage's ``data:`` given as a list); sampled by ``stages.data.mixture``."""

    weight: float = Field(1.0, gt=0, allow_inf_nan=False, description="Relative sampling weight in the mixture.")
    sampling_temperature: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="The mixture's: sample source i with probability proportional to weight_i ** (1 / T); "
                    "1 (the default) follows the weights, larger T flattens toward uniform. Set on one item or "
                    "the same on all.")
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] | None = Field(
        None, description="The mixture's (datasets.interleave_datasets): first_exhausted (the default) ends when a "
                          "source runs out, no record repeats; all_exhausted repeats the smaller sources until every "
                          "record was used. Set on one item or the same on all.")


MIXTURE_OPTIONS = {"sampling_temperature": 1.0, "stopping_strategy": "first_exhausted"}


def mixture_option(sources: list[DataSource], name: str):
    """A mixture-wide option (``MIXTURE_OPTIONS``): the value its items set, else the default."""
    return next((getattr(s, name) for s in sources if getattr(s, name) is not None), MIXTURE_OPTIONS[name])


def _one_value_per_mixture(sources: list[DataSource]) -> list[DataSource]:
    for name in MIXTURE_OPTIONS:
        given = {i: getattr(s, name) for i, s in enumerate(sources) if getattr(s, name) is not None}
        if len(set(given.values())) > 1:
            listed = ", ".join(f"data[{i}] {v!r}" for i, v in given.items())
            raise ValueError(f"{name} is the whole mixture's, and its items disagree ({listed}); "
                             "set it on one item, or the same on all")
    return sources


def _data_shape(value: Any) -> str:
    return "Mixture" if isinstance(value, list) else "Dataset"


# A training stage's data: one dataset (as DataSection: unchanged config, fingerprint and manifest), or a
# weighted mixture of datasets given as a list. The tags are capitalised so that error paths read
# ``stages.sft.data.1.weight`` (pipeline.spec drops capitalised class names from a path).
Mixture = Annotated[list[Annotated[DataSource, BeforeValidator(path_shorthand)]], Field(min_length=1),
                    AfterValidator(_one_value_per_mixture)]
TrainingDataSection = Annotated[
    Annotated[DataSection, Tag("Dataset")] | Annotated[Mixture, Tag("Mixture")], Discriminator(_data_shape)]


def data_list(data: DataConfig | list[DataSource]) -> list[DataConfig]:
    """A training stage's datasets: the one, or the mixture's."""
    return list(data) if isinstance(data, list) else [data]


def has_held_out(data: DataConfig | list[DataSource]) -> bool:
    """Whether held-out data is configured (eval_path or eval_fraction; of a mixture, on any of its datasets)."""
    return any(d.eval_path is not None or d.eval_fraction > 0 for d in data_list(data))


def known_chat_template(value: str | None) -> str | None:
    """A ``chat_template`` choice: None or ``model`` (the model's own), or a name from ``stages.chat_templates``."""
    from stages.chat_templates import valid_choices  # a leaf module: no import cycle

    if value is not None and value not in valid_choices():
        raise ValueError(f"unknown chat template {value!r}{suggest(value, valid_choices())} "
                         f"(valid: {', '.join(valid_choices())}; absent: the model's own)")
    return value


# A stage's chat template: absent (the model's own), ``model``, or one of stages.chat_templates.TEMPLATES.
ChatTemplateChoice = Annotated[str | None, AfterValidator(known_chat_template)]


class PeftConfig(ConfigModel):
    method: Literal["full", "lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit",
                    "adapter"] = Field(
        "lora", description="bitfit: only the model's biases train (stages.adaptation; peft has no BitFit). adapter: "
                            "bottleneck adapters (stages.bottleneck_adapter). Where each method runs (stage kind, "
                            "ZeRO stage, rollout engine): stages.method_support.")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    num_virtual_tokens: int = Field(16, ge=1, description="prompt_tuning and prefix_tuning: virtual tokens learned.")
    prompt_init_text: str | None = Field(
        None, min_length=1, description="prompt_tuning: start the virtual tokens at this text's token embeddings "
                                        "(peft prompt_tuning_init TEXT, tokenized by the stage's starting model; "
                                        "repeated or cut to num_virtual_tokens). None: random.")
    prefix_projection: bool = Field(
        True, description="prefix_tuning: learn the prefix through peft's reparameterisation MLP (embedding -> "
                          "Linear -> tanh -> Linear to every layer's keys and values) instead of directly.")
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="prefix_tuning with prefix_projection: the MLP's hidden width (None: the model's "
                                "key/value width, peft's default).")
    adapter_size: int = Field(64, ge=1, description="adapter: the bottleneck width (hidden -> size -> hidden).")
    adapter_activation: Literal["gelu", "relu", "silu", "tanh"] = Field(
        "gelu", description="adapter: the nonlinearity between the down and up projections.")
    use_rslora: bool = Field(False, description="lora/qlora/dora: rank-stabilised scaling alpha/sqrt(r) "
                                                "instead of alpha/r.")
    init: Literal["default", "pissa", "olora"] = Field(
        "default", description="lora/qlora: the adapter's initialisation (peft init_lora_weights); pissa and olora "
                               "move the principal part of each weight into the adapter (qlora: olora only).")
    quant_bits: Literal[4, 8] = Field(4, description="qlora only: the frozen base in 4-bit NF4 or 8-bit (LLM.int8).")

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> PeftConfig:
        """The LoRA options only where peft takes them, with the field named."""
        lora_family = ("lora", "qlora", "dora")
        if self.use_rslora and self.method not in lora_family:
            raise ValueError(f"peft.use_rslora applies to lora, qlora and dora, not {self.method!r}")
        if self.init != "default":
            if self.method not in ("lora", "qlora"):
                raise ValueError(f"peft.init {self.init!r} applies to lora and qlora, not {self.method!r}"
                                 + (" (DoRA's magnitude is not linear in the adapter, so the adapter cannot be "
                                    "converted back onto the original base)" if self.method == "dora" else ""))
            if self.method == "qlora" and self.init == "pissa":
                raise ValueError("peft.init 'pissa' needs unquantized weights (peft refuses a 4/8-bit base): "
                                 "use method lora, or init olora with qlora")
        if self.quant_bits != 4 and self.method != "qlora":
            raise ValueError(f"peft.quant_bits applies to qlora only, not {self.method!r}")
        return self

    @model_validator(mode="after")
    def _prompt_options_fit_the_method(self) -> PeftConfig:
        """The virtual-token and bottleneck options only with the methods that have them."""
        virtual = ("prompt_tuning", "prefix_tuning")

        def given(field: str) -> bool:
            # A value other than the default, not "was written": a dumped config (a sweep trial's, the one a
            # Ray worker validates back) carries every default and must validate again.
            return getattr(self, field) != type(self).model_fields[field].default

        if given("num_virtual_tokens") and self.method not in virtual:
            raise ValueError(f"peft.num_virtual_tokens applies to prompt_tuning and prefix_tuning, not {self.method!r}")
        if self.prompt_init_text is not None and self.method != "prompt_tuning":
            raise ValueError(f"peft.prompt_init_text applies to prompt_tuning, not {self.method!r}"
                             + (" (a prefix is keys and values in every layer, not input embeddings a text could "
                                "start)" if self.method == "prefix_tuning" else ""))
        if given("prefix_projection") and self.method != "prefix_tuning":
            raise ValueError(f"peft.prefix_projection applies to prefix_tuning, not {self.method!r}")
        for field in ("adapter_size", "adapter_activation"):
            if given(field) and self.method != "adapter":
                raise ValueError(f"peft.{field} applies to adapter, not {self.method!r}")
        if self.encoder_hidden_size is not None and not (self.method == "prefix_tuning" and self.prefix_projection):
            raise ValueError("peft.encoder_hidden_size is the width of prefix_tuning's reparameterisation MLP: it "
                             "needs method prefix_tuning with prefix_projection true"
                             + ("" if self.method == "prefix_tuning" else f" (method is {self.method!r})"))
        return self

    @field_validator("target_modules")
    @classmethod
    def _compiles(cls, value: list[str] | str) -> list[str] | str:
        """A string other than all-linear is a regex over the model's module names (as peft reads it)."""
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{value!r} is not a regular expression ({err}); give a list of module names, "
                                 "a regex, or all-linear") from None
        return value


class TrainConfig(ConfigModel):
    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(2e-4, gt=0)
    lr_schedule: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr",
                         "cosine_with_restarts"] = "cosine"
    num_cycles: int = Field(1, ge=1, description="cosine_with_restarts only: cosine cycles, each restarting at lr.")
    layer_lr_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="Layer i of L trains at lr * decay**(L - i), the embedding at "
                                          "decay**(L + 1), head and final norm at lr (stages.optim).")
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

    @model_validator(mode="after")
    def _cycles_need_restarts(self) -> TrainConfig:
        if self.num_cycles != 1 and self.lr_schedule != "cosine_with_restarts":
            raise ValueError(f"train.num_cycles applies to lr_schedule cosine_with_restarts, not {self.lr_schedule!r}")
        return self


class ScalingConfig(ConfigModel):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1: forever).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers: PACK fills a node first (NCCL within a node); "
                            "STRICT_SPREAD puts each worker on its own node.")


class DeepSpeedConfig(ConfigModel):
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


class EWCConfig(ConfigModel):
    """Elastic weight consolidation (Kirkpatrick et al., 2017): while training on new data, the penalty
    ``lambda / 2 * sum_i F_i (theta_i - theta*_i)^2`` holds each trainable weight near its upstream value
    ``theta*`` in proportion to ``F_i``, the diagonal empirical Fisher on the old task's data."""

    lambda_: float = Field(alias="lambda", ge=0, description="Penalty strength; 0 trains as plain fine-tuning "
                           "and still reports the old task's held-out loss (heldout_loss/previous_task).")
    fisher_samples: int = Field(64, ge=1, description="Old-task training examples the Fisher is averaged over.")
    data: DataSection | None = Field(None, description="The old task's data; default the upstream stage's data "
                                     "(read from its manifest).")


class ContinualConfig(ConfigModel):
    ewc: EWCConfig | None = None


class TrackingConfig(ConfigModel):
    backend: Literal["tensorboard", "mlflow", "wandb", "none"] = "tensorboard"
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; default a file store in the run folder.")
    project: str | None = Field(None, description="wandb project (default: the pipeline name).")


# --------------------------------------------------------------------------- stage configs


class StageConfig(ConfigModel):
    """Fields every stage kind has."""

    kind: str
    from_: str | None = Field(None, alias="from", description="Upstream stage whose model this stage starts from.")
    gate: list[str] = Field(
        default_factory=list,
        description="Conditions on this stage's metrics, checked when it completes, e.g. 'heldout_accuracy >= 0.65' "
                    "(stages.gates); a failed one stops the downstream stages. Not part of the fingerprint.",
    )

    # Names of fields that reference other stages (the DAG is derived from these).
    upstream_fields: ClassVar[tuple[str, ...]] = ("from_",)
    # Metric names (fnmatch patterns) this kind puts in its manifest: what a gate may name.
    gate_metrics: ClassVar[tuple[str, ...]] = ()
    # Fields (or properties) holding DataConfigs -> the record kind the loader must produce for each.
    data_inputs: ClassVar[dict[str, str]] = {}

    def record_kind(self, field_name: str, default: str) -> str:
        """The record kind of a data input; a kind whose settings choose it (dpo's kto loss) overrides this."""
        return default

    @field_validator("gate", mode="before")
    @classmethod
    def _gate_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _gate_names_reported_metrics(self) -> StageConfig:
        for text in self.gate:
            try:
                for metric in parse_condition(text).metrics():
                    problem = self.gate_metric_problem(metric.name, metric.model)
                    if problem:
                        raise GateError(f"{text!r}: {problem}")
            except GateError as err:
                raise ValueError(f"gate: {err}") from None
        return self

    def gate_metric_problem(self, name: str, model: str | None) -> str | None:
        """Why a gate cannot name this metric of this stage (None: it can)."""
        if model is not None:
            return f"{name}[{model}]: only an eval stage's metrics name a model; write {name}"
        names = [p for p in self.gate_metrics if "*" not in p]
        # A near miss of a known name is a typo even where a pattern (final_*) would take it.
        near_miss = name not in names and difflib.get_close_matches(name, names, n=1, cutoff=0.85)
        if not near_miss and any(fnmatch.fnmatchcase(name, pattern) for pattern in self.gate_metrics):
            return None
        return (f"{self.kind} stages do not report {name!r}{suggest(name, names)} "
                f"(they report: {', '.join(self.gate_metrics) or 'no metrics'})")

    def gate_value(self, metrics: dict, name: str, model: str | None) -> Any:
        """A metric's value in this stage's manifest metrics (None when absent)."""
        return metrics.get(name)

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
    data: TrainingDataSection
    peft: PeftConfig = PeftConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    chat_template: ChatTemplateChoice = Field(None, description="None: the model's own; or chatml, alpaca, vicuna.")
    merge: bool = Field(False, description="Also write the adapter merged into the base as a full model.")
    sweep: SweepConfig | None = Field(
        None, description="A Ray Tune search over this stage's settings; the best trial's model is its output."
    )

    # What training.summarize_training records: the trainer's numbers and each logged curve's last value.
    gate_metrics: ClassVar[tuple[str, ...]] = ("final_loss", "first_loss", "best_eval_loss", "global_step",
                                               "train_loss", "train_runtime", "final_*", "train_*")

    @model_validator(mode="after")
    def _sweep_is_runnable(self) -> TrainingStageConfig:
        """Every key, value and the metric of a sweep are checked here, before any trial starts."""
        if self.sweep is None:
            return self
        from stages.sweep_config import checked_space

        checked_space(self)
        if problem := self.gate_metric_problem(self.sweep.metric, None):
            raise ValueError(f"sweep.metric: {problem}")
        if self.sweep.scheduler.name == "asha" and self.sweep.step_metric() is None:
            raise ValueError(f"sweep.scheduler: asha stops trials on a metric logged during training, and "
                             f"{self.sweep.metric!r} is known only at the end; sweep final_loss (or another "
                             f"final_<logged value>, or best_eval_loss), or set scheduler: {{name: none}}")
        if "eval" in self.sweep.metric and not has_held_out(self.data):
            raise ValueError(f"sweep.metric: {self.sweep.metric!r} needs held-out data, and data has neither "
                             f"eval_path nor eval_fraction")
        return self



# --------------------------------------------------------------------------- did-you-mean


def suggest(word: str, candidates, aliases: bool = False) -> str:
    """``"; did you mean X?"`` for a misspelled key or name (empty when nothing is close)."""
    names = []
    for name in candidates:
        field = candidates[name] if aliases else None
        names.append(field.alias if field is not None and field.alias else name)
    names = [n for n in names if n not in ("source",)]
    # Synonyms from other tools first (HF/TRL names), since difflib cannot see lerning_rate -> lr.
    guess = SYNONYMS.get(word) or next(
        (v for k, v in SYNONYMS.items() if difflib.SequenceMatcher(None, word, k).ratio() > 0.8), None
    )
    match = [guess] if guess in names else difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


SYNONYMS = {
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
