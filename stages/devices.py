"""Where an engine or actor runs a model, and in which dtype, decided in the process that runs it.

Ray gives an actor that asked for a GPU that GPU (``CUDA_VISIBLE_DEVICES``), so "auto" here means
the GPU when this process sees one, and the driver (maybe a CPU-only head) never decides for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HALF = ("bfloat16", "float16")


def local_device(requested: str = "auto") -> torch.device:
    """``auto``: this process's current GPU when it sees one, else the CPU."""
    import torch

    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def checkpoint_dtype(model_dir: str | Path | None) -> str | None:
    """The dtype a HF folder's ``config.json`` declares, as a torch name (``stages.models.base_precision``
    reads it); None without a config."""
    if model_dir is None or not (Path(model_dir) / "config.json").exists():
        return None
    from stages.models import base_precision

    precision = base_precision(json.loads((Path(model_dir) / "config.json").read_text()))
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


def inference_dtype(requested: str, device: torch.device, model_dir: str | Path | None = None) -> torch.dtype:
    """``auto``: on a GPU the checkpoint's 16-bit dtype, else bf16 (fp16 without bf16 support); on the
    CPU fp32 (CPUs without AMX emulate bf16 slowly). Anything else is a torch dtype name."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.type != "cuda":
        return torch.float32
    declared = checkpoint_dtype(model_dir)
    if declared in HALF:
        return getattr(torch, declared)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
