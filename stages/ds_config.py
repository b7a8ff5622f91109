"""DeepSpeed config generated from the stage's typed ``deepspeed`` section.

Batch sizes, clipping and precision are left as ``"auto"`` so that the HF Trainer fills them
from the training arguments: one source of truth for those numbers.
"""

from __future__ import annotations

from stages.config import DeepSpeedConfig


def deepspeed_config(cfg: DeepSpeedConfig, use_gpu: bool = False) -> dict | None:
    """The ZeRO config dict for ``TrainingArguments(deepspeed=...)``, or None when disabled.

    On GPUs, communication overlaps the backward pass and offloaded states sit in pinned host
    memory (faster host-device copies). On CPU (gloo) both stay off: overlap needs CUDA streams,
    and pinning needs a CUDA driver.
    """
    if cfg.zero_stage is None:
        return None
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if cfg.zero_stage == 3:
        # Save full 16-bit weights, so the saved folder is a plain HF checkpoint.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,  # the trainer's own logging is enough
        "wall_clock_breakdown": False,
    }
