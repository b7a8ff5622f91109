"""``rollout.engine: trainer``: HF ``generate`` on the training worker's own policy, in its process.

The layout of TRL's trainers and of verl's hybrid engine on one device: no second copy of the
weights, no actor to call, nothing to send after an update (the engine *is* the trained module), so
nothing to verify either. What it costs: HF ``generate`` instead of vLLM, and rollout and training
take turns on the worker's cores or GPU. ``benchmarks/ppo_throughput.py`` compares it with engines
in actors. Each worker samples its own prompts with its own replica, so ZeRO-3 (parameters sharded
over the workers) is refused by the config.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.rollout.base import SyncInfo
from stages.rollout.hf_engine import HFEngine

TRAINER_ENGINE = "trainer"
SHARED_MODULE = "shared_module"  # the sync_method of a trainer engine: nothing is copied


class TrainerEngine(HFEngine):
    """An :class:`HFEngine` around a live causal LM (LoRA layers injected or not) instead of a folder."""

    name = TRAINER_ENGINE

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_size: int = 64,
                 add_special_tokens: bool = True) -> None:
        # Not HFEngine.__init__: nothing is loaded, the device and dtype are the model's.
        parameter = next(model.parameters())
        self.model, self.tokenizer = model, tokenizer
        self.model_path = getattr(model, "name_or_path", "")
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_batch_size, self.add_special_tokens = max_batch_size, add_special_tokens
        self.adapter_name, self._adapter_counter = None, 0

    def generate(self, prompts, params):
        was_training = self.model.training
        self.model.eval()  # the KV cache (gradient checkpointing turns it off in train mode)
        try:
            return super().generate(prompts, params)
        finally:
            self.model.train(was_training)

    def update_weights(self, source: Any) -> SyncInfo:
        """Nothing to copy: the trainer updated these very parameters."""
        return SyncInfo(method=SHARED_MODULE, seconds=0.0, details={})

    def close(self) -> None:
        self.model = None  # the trainer's module: only this reference goes
