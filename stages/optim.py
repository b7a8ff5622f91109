"""Learning-rate schedules and optimizer parameter groups, one implementation for every stage.

The TRL stages (sft, reward, dpo) and PPO's own optimizer take their schedule and their per-layer
learning rates from here::

    scheduler = make_scheduler(optimizer, config.train, total_steps)       # PPO's loop
    args = TrainingArguments(**schedule_arguments(config.train), ...)      # the HF/TRL trainers
    groups = layer_lr_groups(model, lr=1e-3, decay=0.8)                    # per-layer rates

Schedules are transformers' ``get_scheduler`` by name (``train.lr_schedule``) with the keyword
arguments of :func:`schedule_kwargs`; warmup is :func:`warmup_steps`, the HF Trainer's own rule.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING

from stages.config import TrainConfig

if TYPE_CHECKING:  # torch is imported where it is used: loading a config must not pull it in
    import torch

# ``min_lr_rate`` of the cosine_with_min_lr schedule: the rate ends at 10% of the peak.
MIN_LR_RATE = 0.1


# --------------------------------------------------------------------------- schedules


def schedule_kwargs(train: TrainConfig) -> dict | None:
    """``scheduler_specific_kwargs`` of ``get_scheduler`` (``lr_scheduler_kwargs`` of the HF Trainer)."""
    if train.lr_schedule == "cosine_with_min_lr":
        return {"min_lr_rate": MIN_LR_RATE}
    if train.lr_schedule == "cosine_with_restarts":
        return {"num_cycles": train.num_cycles}
    return None


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """Warmup steps for ``total_steps`` optimizer steps: the HF Trainer's rule for a ratio (rounded up)."""
    return math.ceil(train.warmup_ratio * total_steps)


def schedule_arguments(train: TrainConfig) -> dict:
    """The schedule fields of ``TrainingArguments``: the Trainer then calls ``get_scheduler`` with the same
    name, kwargs and warmup as :func:`make_scheduler` (a float ``warmup_steps`` < 1 is a ratio there)."""
    return {"learning_rate": train.lr, "lr_scheduler_type": train.lr_schedule,
            "lr_scheduler_kwargs": schedule_kwargs(train), "warmup_steps": train.warmup_ratio}


def make_scheduler(optimizer, train: TrainConfig, total_steps: int):
    """The stage's LR schedule over ``total_steps`` optimizer steps, for a loop that builds its own optimizer."""
    from transformers import get_scheduler

    total = max(1, total_steps)
    return get_scheduler(train.lr_schedule, optimizer, num_warmup_steps=warmup_steps(train, total),
                         num_training_steps=total, scheduler_specific_kwargs=schedule_kwargs(train))


# --------------------------------------------------------------------------- layer-wise LR decay


def decoder_layers(model: torch.nn.Module) -> tuple[str, int]:
    """The name and length of the model's list of decoder layers: its ``ModuleList`` with the most parameters
    (``model.layers`` of a Llama, wrapped by peft or a value head or not)."""
    import torch

    lists = [(sum(p.numel() for p in m.parameters()), name, len(m)) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"train.layer_lr_decay: {type(model).__name__} has no list of decoder layers")
    _, name, length = max(lists)
    return name, length


def layer_scales(model: torch.nn.Module, decay: float) -> dict[str, float]:
    """Parameter name -> LR multiplier: decoder layer i (from 0) of L gets ``decay**(L - i)``, the input
    embedding (every ``nn.Embedding``) ``decay**(L + 1)``, everything else (final norm, head, value or
    score head) 1. A weight tied between embedding and head is listed once, under the embedding's name,
    and trains at the embedding's rate."""
    import torch

    prefix, count = decoder_layers(model)
    embedding = {f"{name}.{p}" if name else p for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Embedding) and not name.startswith(f"{prefix}.")
                 for p, _ in m.named_parameters()}
    scales = {}
    for name, _ in model.named_parameters():
        if name.startswith(f"{prefix}."):
            scales[name] = decay ** (count - int(name[len(prefix) + 1:].split(".", 1)[0]))
        elif name in embedding:
            scales[name] = decay ** (count + 1)
        else:
            scales[name] = 1.0
    return scales


def layer_lr_groups(model: torch.nn.Module, lr: float, decay: float) -> list[dict]:
    """Optimizer parameter groups ``{"params", "lr"}`` for layer-wise LR decay (trainable parameters only),
    highest rate first (so a log of the first group's rate shows the peak)."""
    by_rate: dict[float, list] = defaultdict(list)
    scales = layer_scales(model, decay)
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_rate[lr * scales[name]].append(param)
    return [{"params": by_rate[rate], "lr": rate} for rate in sorted(by_rate, reverse=True)]


def param_groups(model: torch.nn.Module, train: TrainConfig, lr: float) -> list:
    """What a loop that builds its own optimizer passes it: the trainable parameters, in layer-wise
    groups when ``train.layer_lr_decay`` is set."""
    if train.layer_lr_decay is None:
        return [p for p in model.parameters() if p.requires_grad]
    return layer_lr_groups(model, lr, train.layer_lr_decay)


def split_by_layer_rate(groups: list[dict], model: torch.nn.Module, lr: float, decay: float) -> list[dict]:
    """Split each of a trainer's parameter groups (weight decay on / off) by layer rate, keeping its other
    settings: the groups an optimizer built by the HF Trainer gets."""
    rate = {id(p): g["lr"] for g in layer_lr_groups(model, lr, decay) for p in g["params"]}
    out = []
    for group in groups:
        by_rate: dict[float, list] = defaultdict(list)
        for param in group["params"]:
            by_rate[rate.get(id(param), lr)].append(param)
        out += [{**group, "params": by_rate[r], "lr": r} for r in sorted(by_rate, reverse=True)]
    return sorted(out, key=lambda g: -g["lr"])


def use_layer_lr_decay(trainer, train: TrainConfig) -> None:
    """Make an HF/TRL trainer build its optimizer with layer-wise rates (nothing when decay is unset).

    The trainer's own optimizer class and settings, and its weight-decay split (biases and norms
    without), are kept; each group is split by layer rate. It goes through ``optimizer_cls_and_kwargs``
    as an optimizer factory, which ``Trainer.create_optimizer`` calls both alone and when DeepSpeed takes
    the trainer's optimizer as its client optimizer (our DeepSpeed configs have no ``optimizer``
    section). Call it after the trainer applied peft, before ``train()``.
    """
    if train.layer_lr_decay is None:
        return
    decay = train.layer_lr_decay
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    layer_lr_groups(trainer.model, train.lr, decay)  # fails here, before training, for a model without layers

    def build(model, **settings):
        with_decay = set(trainer.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in with_decay], "weight_decay": trainer.args.weight_decay},
                  {"params": [p for n, p in named if n not in with_decay], "weight_decay": 0.0}]
        return optimizer_cls(split_by_layer_rate(groups, model, settings.get("lr", train.lr), decay), **settings)

    # A factory (not an Optimizer class): the Trainer instantiates it with no arguments, then calls it
    # with (model, **kwargs).
    trainer.optimizer_cls_and_kwargs = (lambda: build, kwargs)
