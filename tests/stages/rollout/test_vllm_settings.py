"""vLLM engine settings for GPUs (pure functions; no vLLM, no GPU): memory share, max_model_len, sleep
mode, tensor parallelism; nothing on CPU; the user's engine_kwargs always win."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from stages.rollout.vllm_settings import (
    COLOCATED_GPU_MEMORY_UTILIZATION,
    DEDICATED_GPU_MEMORY_UTILIZATION,
    engine_bundles,
    gpu_memory_share,
    longest_prompt_in_files,
    vllm_engine_kwargs,
    vllm_max_model_len,
    vllm_tp_env,
)


def test_max_model_len_is_prompt_plus_response_rounded_up():
    assert vllm_max_model_len(100, 28) == 128
    assert vllm_max_model_len(100, 29) == 144
    assert vllm_max_model_len(0, 1) == 16


def test_dedicated_gpu():
    kwargs = vllm_engine_kwargs(on_gpu=True, max_new_tokens=256, longest_prompt_tokens=1000)
    assert kwargs == {"gpu_memory_utilization": DEDICATED_GPU_MEMORY_UTILIZATION, "max_model_len": 1264}
    assert DEDICATED_GPU_MEMORY_UTILIZATION == 0.9


def test_colocated_with_trainers():
    kwargs = vllm_engine_kwargs(on_gpu=True, max_new_tokens=32, longest_prompt_tokens=10, colocate=True)
    assert kwargs == {"gpu_memory_utilization": COLOCATED_GPU_MEMORY_UTILIZATION, "max_model_len": 48,
                      "enable_sleep_mode": True}
    assert COLOCATED_GPU_MEMORY_UTILIZATION < DEDICATED_GPU_MEMORY_UTILIZATION


def test_tensor_parallel_uses_the_ray_executor():
    kwargs = vllm_engine_kwargs(on_gpu=True, tensor_parallel_size=4)
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["distributed_executor_backend"] == "ray"
    assert "max_model_len" not in kwargs  # unknown prompt lengths: vLLM's own default
    assert vllm_engine_kwargs(on_gpu=True, tensor_parallel_size=2, executor="mp")["distributed_executor_backend"] == "mp"
    assert "tensor_parallel_size" not in vllm_engine_kwargs(on_gpu=True)
    assert vllm_tp_env(engine_bundles(1, 2)) == {"VLLM_RAY_BUNDLE_INDICES": "2,3", "VLLM_RAY_PER_WORKER_GPUS": "1.0"}
    assert vllm_tp_env([0, 1], 0.5)["VLLM_RAY_PER_WORKER_GPUS"] == "0.5"
    with pytest.raises(ValueError, match="duplicate"):
        vllm_tp_env([0, 0])


def test_cpu_adds_nothing():
    assert vllm_engine_kwargs(on_gpu=False, max_new_tokens=32, longest_prompt_tokens=10, colocate=True,
                              tensor_parallel_size=2) == {}
    assert vllm_engine_kwargs(on_gpu=False, user_kwargs={"max_model_len": 64}) == {"max_model_len": 64}


def test_user_kwargs_win():
    user = {"gpu_memory_utilization": 0.7, "max_model_len": 4096, "enable_sleep_mode": False,
            "distributed_executor_backend": "mp"}
    kwargs = vllm_engine_kwargs(on_gpu=True, max_new_tokens=32, longest_prompt_tokens=10, colocate=True,
                                tensor_parallel_size=2, user_kwargs=user)
    assert {k: kwargs[k] for k in user} == user and kwargs["tensor_parallel_size"] == 2


def test_engines_sharing_a_gpu_split_the_budget():
    assert gpu_memory_share(engines_per_gpu=2) == 0.45  # the eval actor's policy + reference
    assert gpu_memory_share(gpu_fraction=0.5) == 0.45  # two actors on one GPU
    assert gpu_memory_share(engines_per_gpu=2, reserved_fraction=0.2) == 0.35  # and a reward model
    assert gpu_memory_share(reserved_fraction=5.0) == 0.05  # never zero or negative


def test_eval_actor_splits_the_gpu_between_policy_and_reference():
    from stages.evaluate.generation import vllm_gpu_kwargs

    settings = {"longest_tokens": 40, "max_new_tokens": 64, "gpu_fraction": 1.0}
    both = vllm_gpu_kwargs({}, settings, None, separate_reference=True)
    assert both == {"gpu_memory_utilization": 0.45, "max_model_len": 112}
    assert vllm_gpu_kwargs({}, settings, None, separate_reference=False)["gpu_memory_utilization"] == 0.9
    assert vllm_gpu_kwargs({"gpu_memory_utilization": 0.3}, settings, None,
                           separate_reference=True)["gpu_memory_utilization"] == 0.3


def test_longest_prompt_from_prepared_files(tiny_base, tmp_path):
    from stages.chat_templates import conversation_ids
    from stages.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_base)
    short, long = [{"role": "user", "content": "1+1="}], [{"role": "user", "content": "12+34+56+78="}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in (short, long)) + "\n")
    expected = len(conversation_ids(tokenizer, long, add_generation_prompt=True))
    assert longest_prompt_in_files([tmp_path / "train.jsonl", tmp_path / "missing.jsonl"], tokenizer) == expected


def _ppo_engines(tmp_path, **sections):
    from stages.ppo.config import PPOConfig
    from stages.ppo.stage import RolloutEngines

    raw = {"prompts": "builtin:addition", "reward_fn": "addition", "peft": {"method": "lora", "r": 8},
           "train": {"precision": "fp32"}, **sections}
    ctx = SimpleNamespace(name="ppo", work_dir=tmp_path, run=SimpleNamespace(trust_remote_code=False))
    return RolloutEngines(ctx, PPOConfig.model_validate(raw), tmp_path / "policy")


def test_ppo_engine_kwargs_on_cpu_are_unchanged(tmp_path):
    kwargs = _ppo_engines(tmp_path, rollout={"engine": "vllm", "engine_kwargs": {"max_lora_rank": 16}}).engine_kwargs()
    assert kwargs == {"dtype": "float32", "enable_lora": True, "max_lora_rank": 16}


def test_ppo_engine_kwargs_on_gpus(tmp_path, tiny_base):
    (tmp_path / "data").mkdir()
    prompt = [{"role": "user", "content": "12+34="}]
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    engines = _ppo_engines(tmp_path, scaling={"use_gpu": True},
                           rollout={"engine": "vllm", "colocate": True, "max_new_tokens": 8,
                                    "engine_kwargs": {"gpu_memory_utilization": 0.3}})
    engines.model_source = str(tiny_base)
    kwargs = engines.engine_kwargs()
    assert kwargs["gpu_memory_utilization"] == 0.3 and kwargs["enable_sleep_mode"] is True
    assert kwargs["max_model_len"] % 16 == 0 and kwargs["max_model_len"] >= 8
    dedicated = _ppo_engines(tmp_path, scaling={"use_gpu": True},
                             rollout={"engine": "vllm", "gpus_per_engine": 1, "tensor_parallel_size": 2})
    dedicated.model_source = str(tiny_base)
    kwargs = dedicated.engine_kwargs()
    assert kwargs["gpu_memory_utilization"] == 0.9 and "enable_sleep_mode" not in kwargs
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["distributed_executor_backend"] == "ray"


def test_ppo_engine_dtype_auto_is_left_to_the_engine(tmp_path):
    """``precision: auto`` is not resolved on the driver (maybe a CPU-only head): the engine decides in its actor."""
    from stages.devices import inference_dtype

    kwargs = _ppo_engines(tmp_path, train={"precision": "auto"}).engine_kwargs()
    assert kwargs["dtype"] == "auto"
    assert _ppo_engines(tmp_path, train={"precision": "bf16"}).engine_kwargs()["dtype"] == "bfloat16"
    import torch

    assert inference_dtype("auto", torch.device("cpu")) == torch.float32


def test_a_qlora_policy_is_served_quantized_in_flight_at_4_bits_only():
    from stages.rollout.vllm_settings import quantize_in_flight

    kwargs: dict = {}
    quantize_in_flight(kwargs, 4)
    assert kwargs == {"quantization": "bitsandbytes"}
    quantize_in_flight(kwargs := {}, None)
    assert kwargs == {}
    with pytest.raises(ValueError, match="4 bits only"):
        quantize_in_flight({}, 8)
