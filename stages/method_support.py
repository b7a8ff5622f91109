"""Where each adaptation method runs: one table of method x stage kind x DeepSpeed ZeRO stage x rollout
engine, each refused combination with its reason.

The stage configs consult it when a pipeline file loads (``SFTConfig``, ``RewardConfig``, ``DPOConfig``
validators: ``rayalign validate`` and ``run`` fail before anything trains), ``pipeline.validate``
consults it for every training stage (PPO and GRPO included) and for what a stage takes from its
upstream (:func:`consumer_problem`)::

    problem = support_problem("reward", PeftConfig(method="prompt_tuning"), zero_stage=None)
    # "peft.method: prompt_tuning does not work in reward stages: ..."

A combination that no row refuses is allowed. Rows are checked in order; the first match gives the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from stages.config import PeftConfig

ANY = None  # a column that matches every value

# peft methods whose trained virtual tokens no merge can fold into weights: the output is an adapter only.
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning")
# Outputs a later stage cannot start from: upstream adapters are merged into full weights (stages.models.
# full_model_dir), and these cannot be merged (a bottleneck adapter is nonlinear).
UNMERGEABLE_METHODS = (*VIRTUAL_TOKEN_METHODS, "adapter")


@dataclass(frozen=True)
class Refusal:
    """One refused combination. ``None`` in a column matches anything; ``applies`` narrows a row to an option
    of the method (e.g. a non-default ``peft.init``)."""

    methods: tuple[str, ...]
    kinds: tuple[str, ...] | None
    zero_stages: tuple[int, ...] | None
    engines: tuple[str, ...] | None
    reason: str
    applies: Callable[[PeftConfig], bool] | None = None
    option: str = "method"  # the peft field the message names (method, init, quant_bits)

    def matches(self, kind: str, peft: PeftConfig, zero_stage: int | None, engine: str | None) -> bool:
        return (peft.method in self.methods
                and (self.kinds is ANY or kind in self.kinds)
                and (self.zero_stages is ANY or zero_stage in self.zero_stages)
                and (self.engines is ANY or engine in self.engines)
                and (self.applies is None or self.applies(peft)))


def _converted_init(peft: PeftConfig) -> bool:
    return peft.init != "default"


REFUSALS: tuple[Refusal, ...] = (
    Refusal(VIRTUAL_TOKEN_METHODS, ("reward",), ANY, ANY,
            "the reward stage's output is its adapter merged into a plain classifier (PPO, GRPO and eval score "
            "with that), and virtual tokens cannot be merged into weights; use lora, ia3, bitfit or full"),
    Refusal(VIRTUAL_TOKEN_METHODS, ANY, (3,), ANY,
            "a prompt-tuning SFT on 2 workers under ZeRO-3 trained and saved its adapter, then hung before writing "
            "its training log (the probe forward runs there; seen 2026-12-03); prefix tuning shares peft's "
            "prompt-learning path and has not run under ZeRO-3; use zero_stage 2 or none"),
    Refusal(("adapter",), ("reward",), ANY, ANY,
            "the reward stage's output is a plain classifier (PPO, GRPO and eval score with that), and a "
            "bottleneck adapter is nonlinear, so it cannot be merged into the weights; use lora, ia3, bitfit or full"),
    Refusal(("adapter",), ("dpo",), ANY, ANY,
            "DPO's reference is the adapter-off policy (peft methods) or a frozen full copy, and bottleneck "
            "adapters (stages.bottleneck_adapter) have neither; use lora, ia3, prompt_tuning, bitfit or full"),
    Refusal(("dora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit", "adapter"), ("ppo",), ANY, ("vllm",),
            "rollout.engine vllm serves full weights or a LoRA adapter (LoRARequest), not this method (and the "
            "PPO/GRPO policy trains only those with any engine); use lora, qlora or full"),
    Refusal(("dora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit", "adapter"), ("ppo",), ANY, ANY,
            "the PPO/GRPO policy updates full weights or a LoRA adapter (stages.ppo.policy), and its rollout "
            "engines sync those; use lora, qlora or full"),
    Refusal(("qlora",), ("ppo",), (3,), ANY,
            "PPO's own loop (stages.ppo) does not support a quantized base under ZeRO-3; use deepspeed.zero_stage "
            "2 or none"),
    Refusal(("qlora",), ("ppo",), ANY, ("vllm",),
            "vLLM quantizes a base in flight to 4 bits only (quantization=bitsandbytes), so its engines cannot serve "
            "the policy's 8-bit base; use peft.quant_bits 4 or rollout.engine hf",
            applies=lambda peft: peft.quant_bits == 8, option="quant_bits"),
    Refusal(("lora", "qlora"), ANY, (3,), ANY,
            "pissa/olora save the untrained adapter before training to convert the trained one for the original "
            "base, and under ZeRO-3 it is partitioned then; use zero_stage 2 (or none), or init default",
            applies=_converted_init, option="init"),
)


def support_problem(kind: str, peft: PeftConfig, zero_stage: int | None, engine: str | None = None) -> str | None:
    """Why ``peft`` cannot train in a ``kind`` stage under ``zero_stage`` with rollout ``engine`` (None: it can)."""
    for row in REFUSALS:
        if row.matches(kind, peft, zero_stage, engine):
            value = getattr(peft, row.option)
            where = [f"{kind} stages"]
            if row.zero_stages is not ANY:
                where.append(f"deepspeed.zero_stage {zero_stage}")
            if row.engines is not ANY:
                where.append(f"rollout.engine {engine}")
            return f"peft.{row.option}: {value} does not work in {' with '.join(where)}: {row.reason}"
    return None


def check_support(config) -> None:
    """Raise ``ValueError`` (a pydantic validator's error) when a training stage config is a refused combination."""
    rollout = getattr(config, "rollout", None)
    problem = support_problem(config.kind, config.peft, config.deepspeed.zero_stage,
                              getattr(rollout, "engine", None))
    if problem:
        raise ValueError(problem)
    if config.merge and config.peft.method in UNMERGEABLE_METHODS:
        why = ("a bottleneck adapter is nonlinear" if config.peft.method == "adapter"
               else "virtual tokens are not weights")
        raise ValueError(f"merge: peft.method {config.peft.method} cannot be merged into the weights ({why}); its "
                         "output is the adapter alone: set merge: false")


def consumer_problem(upstream_name: str, upstream_method: str) -> str | None:
    """Why a stage cannot take ``upstream_name``'s model as its input (None: it can)."""
    if upstream_method in UNMERGEABLE_METHODS:
        why = ("a bottleneck adapter is nonlinear" if upstream_method == "adapter"
               else "virtual tokens are not weights")
        return (f"{upstream_name} trains peft.method {upstream_method}, whose output is an adapter that loads "
                f"only on its base and cannot be merged into it ({why}), and a stage takes its upstream "
                "as full weights; train it with lora, ia3, bitfit or full, or use it as the last stage")
    return None

