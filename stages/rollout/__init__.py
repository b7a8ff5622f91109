"""Rollout engines behind one small interface (``hf``, ``vllm``), optionally inside Ray actors.

    from stages.rollout import SamplingParams, create_engine
    engine = create_engine("auto", "models/tiny-llama")       # vllm if it imports, else hf
    rollouts = engine.generate(["hello"], SamplingParams(max_new_tokens=16, n=4, seed=0))
    info = engine.update_weights("runs/step-10/adapter")       # folder, adapter folder or state_dict

``import stages.rollout`` imports neither torch nor vllm; an engine's module is imported when that
engine is created. Ray helpers live in ``stages.rollout.actors`` (imports ray).
"""

from stages.rollout.base import (
    ENGINES,
    Rollout,
    RolloutEngine,
    SamplingParams,
    SyncInfo,
    classify_weight_source,
    create_engine,
    engine_class,
    register_engine,
    resolve_engine_name,
    validate_lora_for_vllm,
    vllm_lora_ranks,
    vllm_status,
)

__all__ = [
    "ENGINES",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "SyncInfo",
    "classify_weight_source",
    "create_engine",
    "engine_class",
    "register_engine",
    "resolve_engine_name",
    "validate_lora_for_vllm",
    "vllm_lora_ranks",
    "vllm_status",
]
