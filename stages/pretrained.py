"""The ``base`` node: the pretrained checkpoint every chain starts from.

A hub id or a local folder is used as it is (never copied); ``builtin:tiny-llama`` is built
offline (tokenizer, Llama, brief pretraining) into the store and cached like any stage.
"""

from __future__ import annotations

from stages.config import BaseConfig
from stages.stage import StageContext, StageKind, StageResult

# Builtin base name -> version of its recipe (part of the cache key: bump when the model changes).
# Their build options: stages.tiny_base.VARIANTS (tiny-llama-bias: biases in every projection, for BitFit).
BUILTIN_BASES = {"tiny-llama": "2", "tiny-llama-bias": "1", "tiny-llama-4m": "1", "tiny-llama-4m-bias": "1"}

# The base node: configured by the pipeline's top-level `base:` section, never listed under `stages:`.
STAGE = StageKind("base", BaseConfig, run="stages.pretrained:run")


def run(ctx: StageContext) -> StageResult:
    from stages.tiny_base import VARIANTS, build_tiny_base

    base: BaseConfig = ctx.config
    name = base.model.removeprefix("builtin:")
    if name not in BUILTIN_BASES:
        raise ValueError(f"base.model: unknown builtin base {name!r}; builtin bases: {', '.join(BUILTIN_BASES)}")
    # One thread: two OpenMP threads spin against the Ray workers on small machines (measured 10x slower).
    info = build_tiny_base(ctx.model_dir, name=name, pretrain_steps=base.pretrain_steps, seed=base.seed,
                           torch_threads=1, **VARIANTS[name])
    curve = [{"step": p["step"], "value": p["loss"]} for p in info.get("pretrain_loss", [])]
    metrics = {k: info[k] for k in ("parameters", "vocab_size", "pretrain_steps", "final_loss", "build_seconds")}
    return StageResult(metrics=metrics, curves={"loss": curve} if curve else {}, manifest={"model_type": "full"})
