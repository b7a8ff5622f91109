"""No pickle in a training worker: every ``torch.load`` there runs with ``weights_only=True``.

Our own checkpoints (PPO states, RNG) already load that way, and HF Trainer's do too. DeepSpeed's
resume (``TorchCheckpointEngine.load``) passes ``weights_only=False``; ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
overrides that, and the few plain DeepSpeed classes its checkpoints hold are allowed by name. A
checkpoint holding anything else (someone else's pickle in a store they can write) fails to load,
naming the class, instead of running its code.
"""

from __future__ import annotations

import importlib
import os

# Found by loading ZeRO-2 and ZeRO-3 checkpoints of DeepSpeed 0.19 with weights_only=True
# (tests/stages/test_safe_loading.py); the fp16 loss scaler is the dynamic one on GPUs.
DEEPSPEED_CHECKPOINT_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def forbid_pickle_loads() -> None:
    """Make ``torch.load`` weights-only in this process, whatever its caller asks."""
    import torch.serialization

    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    allowed = []
    for name in DEEPSPEED_CHECKPOINT_CLASSES:
        module, _, attribute = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):  # no DeepSpeed here, or another version's layout
            continue
    torch.serialization.add_safe_globals(allowed)
