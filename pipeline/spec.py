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


class KubernetesConfig(_Model):
    """How ``rayalign k8s`` renders a KubeRay ``RayJob`` for this pipeline (see k8s/README.md)."""

    image: str = Field("rayalign:0.1.0", description="Image with rayalign and its stack installed (k8s/Dockerfile).")
    namespace: str = "default"
    service_account: str | None = Field(None, description="serviceAccountName of the Ray pods.")
    storage_claim: str | None = Field(
        None, description="PVC (ReadWriteMany: NFS, CephFS, EFS, Filestore) mounted on every pod; holds `storage`."
    )
    storage_mount: str = Field("/mnt/rayalign", description="Where the claim is mounted; storage becomes <mount>/runs.")
    ray_version: str = "2.60.0"
    ttl_seconds_after_finished: int = Field(3600, ge=0, description="Delete the RayJob this long after it ends.")
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    worker_memory: str = Field("8Gi", description="Memory of each worker pod (one Ray Train worker per pod).")
    hf_token_secret: str | None = Field(
        None, description="Secret (key HF_TOKEN) exposed as HF_TOKEN in the pods; the token never enters the manifest."
    )
    hub_offline: bool = Field(True, description="HF_HUB_OFFLINE in the pods; false lets them download hub models.")


class SearchDimension(_Model):
    """One swept value: exactly one of grid (every value), choice, uniform, loguniform, randint (sampled)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="[low, high): high is excluded.")

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDimension:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]}: needs at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{given[0]}: expected [low, high] with low < high")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform: low must be > 0")
        return self


class SweepConfig(_Model):
    """A Ray Tune sweep over one stage's settings (``rayalign sweep``; see pipeline/sweep.py)."""

    stage: str | None = Field(None, description="The stage to sweep (or --stage).")
    search_space: dict[str, SearchDimension] = Field(
        default_factory=dict,
        description="Stage key path (peft.r, train.lr, ...) -> values; a plain list is a grid. "
                    "Empty: a grid of the stage's lr x 1/3, 1, 3.",
    )
    metric: str = Field("final_loss", description="A stage metric from its manifest: final_loss, best_eval_loss, ...")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(1, ge=1, description="Samples per grid point (Tune's num_samples).")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials in flight; each needs its stage's full scaling.")
    trial_cpus: float = Field(
        0.0, ge=0.0, description="CPUs held by each trial's driver; 0: it holds only memory, leaving CPUs to workers."
    )

    @field_validator("search_space", mode="before")
    @classmethod
    def _grid_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"grid": v} if isinstance(v, list) else v for k, v in value.items()}
        return value


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


class RolloutConfig(_Model):
    """Where and how a PPO stage samples: rollout-engine Ray actors (``stages.rollout``)."""

    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vllm where it imports, else hf.")
    num_engines: int = Field(1, ge=1)
    cpus_per_engine: float = Field(1, ge=0)
    gpus_per_engine: float = Field(0, ge=0)
    colocate: bool = Field(
        False, description="Share the training workers' resources (no bundle of their own; sleep during training)."
    )
    prompts_per_step: int = Field(16, ge=1, description="Prompts per iteration over all workers.")
    n: int = Field(1, ge=1, description="Samples per prompt (grpo / rloo need >= 2).")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    sync: Literal["auto", "state_dict", "folder"] = Field(
        "auto", description="Full fine-tuning: send a state_dict or a saved folder (LoRA always sends the adapter)."
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine constructor.")


class AlgorithmConfig(_Model):
    """The RL objective (``stages.rl``): advantage estimator, KL, PPO clipping and loss weights."""

    advantage: str = Field("gae", description="gae (critic), grpo, rloo, reinforce_pp (critic-free).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each iteration's samples.")
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    clip_eps: float = Field(0.2, gt=0.0)
    clip_eps_high: float | None = Field(None, gt=0.0, description="DAPO clip-higher; defaults to clip_eps.")
    value_clip_eps: float = Field(0.2, gt=0.0)
    vf_coef: float = Field(0.5, ge=0.0)
    entropy_coef: float = Field(0.0, ge=0.0)
    kl_coef: float = Field(0.05, ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in: Literal["auto", "reward", "loss"] = Field(
        "auto", description="auto: in the reward for gae / reinforce_pp, in the loss (k3) for grpo / rloo."
    )
    kl_target: float | None = Field(None, gt=0.0, description="Set for the adaptive KL controller (Ziegler et al.).")
    kl_horizon: float = Field(10000, gt=0.0)
    whiten_advantages: bool = Field(True, description="gae: whiten advantages over the batch.")
    normalize_std: bool = Field(True, description="grpo: divide by the group std (False: Dr. GRPO).")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    unfinished_penalty: float | None = Field(None, description="Subtract from the score of responses cut off.")
    reward_clip: float | None = Field(None, gt=0.0, description="Clip sequence scores to [-c, c].")

    @field_validator("advantage")
    @classmethod
    def _known_advantage(cls, value: str) -> str:
        from stages.rl import ADVANTAGE_ESTIMATORS

        if value not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"unknown advantage estimator {value!r}{_suggest(value, ADVANTAGE_ESTIMATORS)} "
                f"(valid: {', '.join(sorted(ADVANTAGE_ESTIMATORS))})"
            )
        return value

    @property
    def needs_critic(self) -> bool:
        from stages.rl import NEEDS_CRITIC

        return self.advantage in NEEDS_CRITIC

    @property
    def kl_placement(self) -> str:
        if self.kl_in != "auto":
            return self.kl_in
        return "loss" if self.advantage in ("grpo", "rloo") else "reward"


class CriticConfig(_Model):
    """The value model of critic-based estimators (gae)."""

    mode: Literal["shared", "separate"] = Field(
        "shared", description="shared: a value head on the policy backbone; separate: its own model "
        "(initialised from the reward model when there is one, else the policy)."
    )
    lr: float | None = Field(None, gt=0.0, description="separate critic: its learning rate (default: train.lr).")


class PPOConfig(TrainingStageConfig):
    """Online RL of a policy from rollouts: PPO with a critic, or GRPO / RLOO / REINFORCE++ without; see
    ``stages.ppo``. ``train.max_steps`` counts iterations (rollout + update), ``train.batch_size`` is the
    per-worker mini-batch of samples."""

    kind: Literal["ppo"] = "ppo"
    data: DataConfig | None = Field(None, description="Not used by ppo: the prompts are read from `prompts`.")
    prompts: DataConfig = Field(description="Prompt-only data (any format the loader reads as prompts).")
    reward: str | None = Field(None, description="Upstream reward stage whose model scores responses.")
    reward_fn: str | None = Field(None, description="A verifier task name (addition, gsm8k) or module:function.")
    reward_placement: Literal["actor", "worker"] = Field(
        "actor", description="Reward model in a Ray actor scoring batches, or loaded in every training worker."
    )
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    critic: CriticConfig | None = Field(None, description="gae only; critic-free estimators reject it.")
    eval_limit: int | None = Field(
        200, ge=1, description="Held-out prompts scored greedily at the end (verifier tasks); None: all."
    )

    upstream_fields: ClassVar[tuple[str, ...]] = ("from_", "reward")

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        if self.data is not None:
            raise ValueError("ppo reads its prompts from `prompts:`, not `data:`")
        if self.reward is None and self.reward_fn is None:
            raise ValueError("ppo needs a reward: `reward: <reward stage>` and/or `reward_fn: <task or module:function>`")
        if self.reward_fn is not None and ":" not in self.reward_fn:
            from stages.tasks import TASKS

            if self.reward_fn not in TASKS:
                raise ValueError(
                    f"reward_fn {self.reward_fn!r} is neither a verifier task ({', '.join(sorted(TASKS))}) "
                    "nor module:function"
                )
        algo = self.algorithm
        if not algo.needs_critic and self.critic is not None:
            from stages.rl import NEEDS_CRITIC

            raise ValueError(
                f"algorithm.advantage {algo.advantage!r} is critic-free: remove the `critic` section "
                f"(a critic is used by: {', '.join(sorted(NEEDS_CRITIC))})"
            )
        if algo.advantage in ("grpo", "rloo") and self.rollout.n < 2:
            raise ValueError(f"algorithm.advantage {algo.advantage!r} compares samples of a prompt: set rollout.n >= 2")
        if self.deepspeed.zero_stage == 3 and self.peft.method == "qlora":
            raise ValueError("qlora does not combine with ZeRO-3 here; use zero_stage 2 or none")
        if self.peft.method not in ("full", "lora", "qlora"):
            raise ValueError(f"ppo supports peft methods full, lora and qlora (got {self.peft.method!r})")
        return self

    @property
    def critic_config(self) -> CriticConfig | None:
        """The critic in use: the configured one, the default (shared) for gae, None for critic-free."""
        if not self.algorithm.needs_critic:
            return None
        return self.critic or CriticConfig()


class EvalGenerationConfig(_Model):
    """How the eval stage samples: the rollout engines of ``stages.rollout`` in a Ray Data actor pool."""

    engine: Literal["auto", "hf", "vllm"] = Field("auto", description="auto: vllm where it imports, else hf.")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0: greedy (the default).")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    num_samples: int = Field(
        4, ge=0, description="Samples per prompt (temperature 1) for the KL estimate; 0 skips KL."
    )
    kl_prompts: int = Field(32, ge=1, description="Prompts (the first ones) sampled for the KL estimate.")
    batch_size: int = Field(32, ge=1, description="Rows per Ray Data batch.")
    concurrency: int = Field(1, ge=1, description="Engine actors in the Ray Data actor pool.")
    cpus_per_actor: float = Field(1, gt=0)
    gpus_per_actor: float = Field(0, ge=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine constructor.")


class EvalTaskConfig(_Model):
    """A verifier task; ``data`` absent: ``builtin:<name>/test`` for generator tasks, else the
    ``prompts:`` records that carry an answer (GSM8K files)."""

    name: str
    data: DataConfig | None = None

    @field_validator("name")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from stages.tasks import TASKS

        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}{_suggest(value, TASKS)} (valid: {', '.join(sorted(TASKS))})")
        return value

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class EvalConfig(StageConfig):
    """Compare models on held-out prompts (verifier accuracy, reward-model score, win rate and KL
    against a reference, perplexity, implicit-reward ranking); see ``stages.evaluate``."""

    kind: Literal["eval"] = "eval"
    models: list[str] = Field(min_length=1, description="Stages (and base) to evaluate.")
    reward: str | None = Field(None, description="Reward stage that scores responses (and judges win rates).")
    reference: str | None = Field(
        None, description="Model compared against (win rate, KL); default: the first sft stage in models, else the first."
    )
    prompts: list[DataConfig] = Field(default_factory=list, description="Held-out prompt sets (any prompt format).")
    tasks: list[EvalTaskConfig] = Field(default_factory=list, description="Verifier tasks: addition, gsm8k, ...")
    sft_data: DataConfig | None = Field(None, description="Held-out SFT data for perplexity.")
    preference_data: DataConfig | None = Field(None, description="Held-out pairs for implicit-reward ranking.")
    generation: EvalGenerationConfig = EvalGenerationConfig()
    max_prompts: int | None = Field(200, ge=1, description="At most this many prompts (and examples) per set.")
    num_examples: int = Field(5, ge=0, description="Sample responses per model kept for the report.")
    chat_template: str | None = Field(None, description="None: each model's own; or chatml, alpaca, vicuna.")

    upstream_fields: ClassVar[tuple[str, ...]] = ("models", "reward", "reference")

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_shorthand(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        return [{"path": v} if isinstance(v, str) else v for v in values if v is not None]

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_shorthand(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        return [{"name": v} if isinstance(v, str) else v for v in values if v is not None]

    @field_validator("sft_data", "preference_data", mode="before")
    @classmethod
    def _data_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> EvalConfig:
        if self.from_ is not None:
            raise ValueError("eval compares the stages listed in `models:`; it has no `from:`")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: listed twice: {sorted({m for m in self.models if self.models.count(m) > 1})}")
        if not (self.prompts or self.tasks or self.sft_data or self.preference_data):
            raise ValueError("eval needs something to evaluate on: prompts, tasks, sft_data or preference_data")
        return self

    @property
    def task_data(self) -> list[DataConfig]:
        """The prompt files of the tasks (``builtin:<task>/test`` for generator tasks); fingerprinted as data."""
        from stages.tasks import TASKS

        out = []
        for task in self.tasks:
            if task.data is not None:
                out.append(task.data)
            elif TASKS[task.name].has_generator:
                out.append(DataConfig(path=f"builtin:{task.name}/test"))
        return out


# Stage kind -> its config model. Later stage kinds register here.
STAGE_CONFIGS: dict[str, type[StageConfig]] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig,
                                               "ppo": PPOConfig, "eval": EvalConfig}


class PipelineSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    storage: str = "runs"
    ray: RayConfig = RayConfig()
    base: BaseConfig = BaseConfig()
    tracking: TrackingConfig = TrackingConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    sweep: SweepConfig = SweepConfig()
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
