"""The ``ppo`` stage's config: rollout engines, the RL objective, the critic (``kind: ppo``).

Validators name their tables lazily (``stages.rl`` imports torch): loading a pipeline file stays cheap.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from stages.config import ConfigModel, DataConfig, DataSection, TrainingStageConfig, suggest
from stages.method_support import check_support
from stages.stage import StageKind
from stages.tasks import TASKS


# Buckets pay where tensors are small: each broadcast is a round trip, ~1 ms on CPU and several when the
# engine shares the trainer's cores (the colocated GRPO loop's sync: 20 broadcasts 22 ms, 3 21 ms, 1 12 ms).
# Copying a tensor into a bucket costs more than its own broadcast once buckets are large
# (benchmarks/weight_sync.py, 95M model: 128 MiB buckets made the sync 1.5x slower than one broadcast per
# tensor). 4 MiB: the tiny model goes in one broadcast; a 7B model's matrices go alone, its norms together.
SYNC_BUCKET_MB = 4.0


class RolloutConfig(ConfigModel):
    """Where and how a PPO stage samples: rollout-engine Ray actors (``stages.rollout``)."""

    engine: Literal["auto", "hf", "vllm", "trainer"] = Field(
        "auto", description="auto: vllm where it imports (see stages.rollout.resolve_engine_name), else hf. trainer: "
        "HF generate on each training worker's own policy, in its process (stages.rollout.trainer_engine).")
    num_engines: int = Field(1, ge=1)
    cpus_per_engine: float = Field(1, ge=0)
    gpus_per_engine: float = Field(0, ge=0)
    colocate: bool = Field(
        False, description="Share the training workers' devices (no bundle of their own): their GPUs (the engines "
        "sleep during training) or, on CPU, their cores (an engine runs scaling.cpus_per_worker threads)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one vLLM engine spans; one placement bundle per rank (stages.resources)."
    )
    prompts_per_step: int = Field(16, ge=1, description="Prompts per iteration over all workers.")
    n: int = Field(1, ge=1, description="Samples per prompt (grpo / rloo need >= 2).")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    sync: Literal["auto", "stream", "state_dict", "folder"] = Field(
        "auto", description="Full fine-tuning: auto = broadcast the weights to the engines' processes one tensor at a "
        "time (stages.rollout.weight_stream), a state_dict through the object store where that cannot run; stream = "
        "the broadcast or an error; state_dict; or a saved folder. LoRA always sends the adapter."
    )
    sync_bucket_mb: float = Field(
        SYNC_BUCKET_MB, ge=0, description="Streamed sync: consecutive tensors of one dtype share a broadcast of at "
        "most this size; a larger tensor goes alone, without a copy (0: one broadcast per tensor). Extra memory on "
        "each end: one bucket or the largest parameter."
    )
    verify_sync: Literal["error", "warn", "off"] = Field(
        "error", description="After every sync each engine proves it serves the new weights: the version it "
        "applied, its adapter, and its log-probs of a fixed probe against the trainer's (stages.ppo.verify)."
    )
    verify_tolerance: float | None = Field(
        None, gt=0.0, description="Largest |engine - trainer| log-prob on the probe; default by precision "
        "(stages.ppo.verify.default_tolerance)."
    )
    max_restarts: int = Field(
        1, ge=0, description="Ray restarts of a dead engine actor; the failed call is retried once after the "
        "current weights were sent to it."
    )
    off_policy_steps: int = Field(
        0, ge=0, le=1, description="1: the engines generate the next iteration's samples while the trainer trains "
        "on this one's, so each iteration trains on samples of the policy one update old (one-step off-policy, "
        "as verl and OpenRLHF's async modes); the iteration takes max(generate, train) instead of their sum. "
        "Needs engines of their own (not engine trainer, not colocate). See algorithm.tis_cap."
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the engine constructor.")

    @model_validator(mode="after")
    def _overlap_needs_engines_of_their_own(self) -> RolloutConfig:
        if self.off_policy_steps and self.engine == "trainer":
            raise ValueError("off_policy_steps: 1 generates while the trainer trains, which engine trainer "
                             "(HF generate in the training process) cannot: use engine hf or vllm")
        if self.off_policy_steps and self.colocate:
            raise ValueError("off_policy_steps: 1 generates while the trainer trains, and colocated engines "
                             "sleep during training: set colocate: false (engines on devices of their own)")
        return self

    @model_validator(mode="after")
    def _placeable_tensor_parallelism(self) -> RolloutConfig:
        given = self.engine_kwargs.get("tensor_parallel_size")
        if given is not None and given != self.tensor_parallel_size:
            raise ValueError(f"engine_kwargs.tensor_parallel_size ({given}) differs from tensor_parallel_size "
                             f"({self.tensor_parallel_size}); set only tensor_parallel_size (it sizes the placement)")
        if self.tensor_parallel_size > 1 and self.engine in ("hf", "trainer"):
            raise ValueError(f"tensor_parallel_size > 1 needs engine vllm (the {self.engine} engine runs on one device)")
        if self.tensor_parallel_size > 1 and self.colocate:
            raise ValueError("tensor_parallel_size > 1 needs bundles of its own: it does not combine with colocate")
        return self


class AlgorithmConfig(ConfigModel):
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
    tis_cap: float | None = Field(
        None, gt=0.0, description="Truncated importance sampling: weight each token's advantage by "
        "min(pi_old / pi_engine, tis_cap), for samples drawn by another policy than the trainer's (one update "
        "old: rollout.off_policy_steps; or engine numerics). Needs rollout.temperature 1 (engines report raw "
        "log-probs). 2 is the usual cap."
    )

    @field_validator("advantage")
    @classmethod
    def _known_advantage(cls, value: str) -> str:
        from stages.rl import ADVANTAGE_ESTIMATORS

        if value not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"unknown advantage estimator {value!r}{suggest(value, ADVANTAGE_ESTIMATORS)} "
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


class CriticConfig(ConfigModel):
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
    data_inputs: ClassVar[dict[str, str]] = {"prompts": "prompt"}
    # Held-out task accuracy before and after, and first/last/late values of the curves (stages.ppo.stage).
    gate_metrics: ClassVar[tuple[str, ...]] = (*TrainingStageConfig.gate_metrics, "heldout_accuracy",
                                               "initial_heldout_accuracy", "late_reward_mean", "last_reward_mean",
                                               "late_kl", "heldout_*", "initial_heldout_*", "first_*", "last_*",
                                               "late_*")
    # What every iteration logs (stages.ppo.records) that a sweep's ASHA can follow: final_X, last_X and late_X
    # follow X (a sweep trial reports it to Tune every iteration). value_loss and explained_variance need a critic.
    iteration_metrics: ClassVar[tuple[str, ...]] = ("reward_mean", "reward_std", "score_mean", "kl", "entropy",
                                                    "response_length", "finished_fraction", "loss", "policy_loss",
                                                    "clip_fraction", "approx_kl", "value_loss", "explained_variance")
    data: DataConfig | None = Field(None, description="Not used by ppo: the prompts are read from `prompts`.")
    prompts: DataSection = Field(description="Prompt-only data (any format the loader reads as prompts).")
    reward: str | None = Field(None, description="Upstream reward stage whose model scores responses.")
    reward_fn: str | None = Field(None, description="A verifier task name (addition, gsm8k) or module:function.")
    reward_placement: Literal["actor", "worker"] = Field(
        "actor", description="Reward model in a Ray actor scoring batches, or loaded in every training worker."
    )
    reference_placement: Literal["worker", "engine"] = Field(
        "worker", description="Where the KL reference scores the samples: in every training worker (a frozen copy "
        "for full fine-tuning, the adapter-disabled policy for LoRA), or in each rollout engine's actor (a frozen "
        "hf copy of the starting model on the engine's device, scoring each batch as it is generated: the trainer "
        "skips that forward and, for full fine-tuning, holds no copy)."
    )
    rollout: RolloutConfig = RolloutConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    critic: CriticConfig | None = Field(None, description="gae only; critic-free estimators reject it.")
    eval_limit: int | None = Field(
        200, ge=1, description="Held-out prompts scored greedily at the end (verifier tasks); None: all."
    )

    upstream_fields: ClassVar[tuple[str, ...]] = ("from_", "reward")


    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        if self.data is not None:
            raise ValueError("ppo reads its prompts from `prompts:`, not `data:`")
        if self.peft.init != "default":
            raise ValueError(f"peft.init: {self.peft.init} moves the base weights into the adapter, so the policy "
                             f"with the adapter off (the KL reference) is not the starting model; use init: default")
        if self.reward is None and self.reward_fn is None:
            raise ValueError("ppo needs a reward: `reward: <reward stage>` and/or `reward_fn: <task or module:function>`")
        if self.reward_fn is not None and ":" not in self.reward_fn:
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
        if self.rollout.engine == "trainer" and self.deepspeed.zero_stage == 3:
            raise ValueError("rollout.engine trainer generates with each worker's own replica of the policy, which "
                             "ZeRO-3 shards over the workers: use deepspeed.zero_stage 2 (or none), or engine hf/vllm")
        if self.reference_placement == "engine" and self.rollout.engine == "trainer":
            raise ValueError("reference_placement: engine puts the reference in the rollout engines' actors, and "
                             "engine trainer has none: use reference_placement: worker or engine hf/vllm")
        if algo.tis_cap is not None and self.rollout.temperature != 1.0:
            raise ValueError(f"algorithm.tis_cap compares the trainer's log-probs with the engine's, which engines "
                             f"report at temperature 1; rollout.temperature is {self.rollout.temperature}: set it to "
                             f"1.0 or remove tis_cap")
        check_support(self)  # the peft method against PPO, its ZeRO stage and rollout engine: one table for all kinds
        return self

    @model_validator(mode="after")
    def _asha_follows_an_iteration_metric(self) -> PPOConfig:
        """A PPO sweep stopped by ASHA follows a value every iteration logs (the metric itself is checked
        against ``gate_metrics`` like every stage's): e.g. ``metric: final_reward_mean, mode: max``."""
        sweep = self.sweep
        if sweep is None or sweep.scheduler.name != "asha":
            return self
        followed = sweep.step_metric()
        logged = [m for m in self.iteration_metrics
                  if self.critic_config is not None or m not in ("value_loss", "explained_variance")]
        if followed not in logged:
            raise ValueError(f"sweep.metric: asha follows {followed!r} at every iteration, and this ppo stage logs "
                             f"no such value{suggest(followed or '', logged)}; sweep final_, last_ or late_ of one "
                             f"of: {', '.join(logged)} (e.g. metric: final_reward_mean, mode: max)")
        return self

    @model_validator(mode="after")
    def _tensor_parallel_needs_gpus(self) -> PPOConfig:
        rollout = self.rollout
        if rollout.tensor_parallel_size > 1 and not (self.scaling.use_gpu or rollout.gpus_per_engine):
            raise ValueError("rollout.tensor_parallel_size > 1 splits an engine over GPUs: set scaling.use_gpu "
                             "(one GPU per rank) or rollout.gpus_per_engine")
        return self

    @model_validator(mode="after")
    def _vllm_serves_the_adapter(self) -> PPOConfig:
        """With ``rollout.engine: vllm`` and an adapter, the LoRA rank must be one vLLM serves (``max_lora_rank``
        takes the values of ``stages.rollout.base.VLLM_LORA_RANKS_FALLBACK``; ``auto`` is checked when the stage
        starts, where the engine is resolved)."""
        if self.rollout.engine != "vllm" or self.peft.method == "full":
            return self
        from stages.rollout.base import VLLM_LORA_RANKS_FALLBACK as ALLOWED
        from stages.rollout.base import choose_max_lora_rank

        rank, max_rank = self.peft.r, self.rollout.engine_kwargs.get("max_lora_rank")
        if max_rank is not None and max_rank not in ALLOWED:
            raise ValueError(f"rollout.engine_kwargs.max_lora_rank: {max_rank!r} is not a rank vLLM accepts; use one "
                             f"of {list(ALLOWED)}")
        if rank > max(ALLOWED):
            raise ValueError(f"peft.r: LoRA rank {rank} is larger than any rank vLLM serves (max_lora_rank is one of "
                             f"{list(ALLOWED)}); with rollout.engine vllm use r <= {max(ALLOWED)}")
        if max_rank is not None and rank > max_rank:
            raise ValueError(f"peft.r: LoRA rank {rank} is over rollout.engine_kwargs.max_lora_rank ({max_rank}); "
                             f"set max_lora_rank to {choose_max_lora_rank(rank, ALLOWED)} or lower peft.r")
        return self

    @property
    def critic_lr(self) -> float | None:
        """The separate critic's learning rate: ``critic.lr``, else ``train.lr``."""
        critic = self.critic_config
        return None if critic is None else critic.lr or self.train.lr

    @property
    def critic_config(self) -> CriticConfig | None:
        """The critic in use: the configured one, the default (shared) for gae, None for critic-free."""
        if not self.algorithm.needs_critic:
            return None
        return self.critic or CriticConfig()


STAGE = StageKind("ppo", PPOConfig, run="stages.ppo.stage:run")
