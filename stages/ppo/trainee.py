"""A trained module of the PPO loop (the policy, a separate critic) with its optimizer and LR schedule,
under DeepSpeed ZeRO or plain torch (DDP through Ray Train)."""

from __future__ import annotations

from pathlib import Path

import torch

from stages.ds_config import deepspeed_config
from stages.optim import make_scheduler, param_groups
from stages.ppo.config import PPOConfig


def deepspeed_dict(config: PPOConfig, precision: str, lr: float, client_optimizer: bool) -> dict:
    train = config.train
    ds = deepspeed_config(config.deepspeed, config.scaling.use_gpu)
    ds.update(
        train_micro_batch_size_per_gpu=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        gradient_clipping=train.max_grad_norm,
        bf16={"enabled": precision == "bf16"},
        fp16={"enabled": precision == "fp16"},
        zero_allow_untested_optimizer=True,
    )
    if not client_optimizer:
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": train.weight_decay}}
    return ds


class Trainee:
    """A module and its optimizer + LR schedule: a DeepSpeed engine (ZeRO) or plain torch (DDP).

    ``forward`` is the wrapped module (call it for training forwards), ``module`` the bare one.
    ``backward`` + ``step`` count micro-batches; the optimizer steps every ``grad_accum`` of them.
    """

    def __init__(self, module: torch.nn.Module, lr: float, config: PPOConfig, precision: str, total_steps: int,
                 wrap: bool = True) -> None:
        train = config.train
        self.zero_stage = config.deepspeed.zero_stage
        self.grad_accum = train.grad_accum
        self.max_grad_norm = train.max_grad_norm
        self.micro = 0
        params = [p for p in module.parameters() if p.requires_grad]
        groups = param_groups(module, train, lr)  # the same tensors, by layer rate with train.layer_lr_decay
        if self.zero_stage is not None:
            import deepspeed

            offload = config.deepspeed.offload_optimizer
            optimizer = None if offload else torch.optim.AdamW(groups, lr=lr, weight_decay=train.weight_decay)
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=module, optimizer=optimizer, model_parameters=groups if offload else None,
                config=deepspeed_dict(config, precision, lr, client_optimizer=not offload),
                lr_scheduler=lambda opt: make_scheduler(opt, train, total_steps),
            )
            self.forward = self.engine
            self.module = self.engine.module
        else:
            from stages.train_session import prepare_model

            self.engine = None
            self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=train.weight_decay)
            self.scheduler = make_scheduler(self.optimizer, train, total_steps)
            self.params = params
            # DDP when world > 1 (outside Ray Train, e.g. in unit tests: wrap=False, the bare module).
            self.forward = prepare_model(module, move_to_device=config.scaling.use_gpu) if wrap else module
            self.module = module

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)  # scaled by 1 / grad_accum inside
        else:
            (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.engine is not None:
            self.engine.step()  # steps optimizer + scheduler at accumulation boundaries
            return
        if self.micro % self.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: Path, rank: int) -> None:
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder), tag="state", client_state={"micro": self.micro},
                                        exclude_frozen_parameters=True)
            return
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
            torch.save({"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "micro": self.micro}, folder / "state.pt")

    def load(self, folder: Path) -> None:
        if self.engine is not None:
            _, client = self.engine.load_checkpoint(str(folder), tag="state", load_module_strict=False)
            self.micro = (client or {}).get("micro", 0)
            return
        # Tensors, numbers and dicts only: loaded without unpickling arbitrary objects.
        state = torch.load(folder / "state.pt", weights_only=True)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]


def zero3_init(config: PPOConfig, precision: str):
    """Under ZeRO-3: the object that makes ``from_pretrained`` partition weights as they load
    (``zero.Init``), so no worker ever holds a full copy; keep it alive while models load. None otherwise."""
    if config.deepspeed.zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_dict(config, precision, config.train.lr, client_optimizer=True))


def place_frozen(module: torch.nn.Module, config: PPOConfig, precision: str, device) -> torch.nn.Module:
    """A forward-only model (the full fine-tune's reference) placed like the policy: sharded by a
    DeepSpeed engine without optimizer under ZeRO-3, on this worker's device otherwise."""
    if config.deepspeed.zero_stage != 3:
        return module.to(device)
    import deepspeed

    ds = deepspeed_dict(config, precision, config.train.lr, client_optimizer=True)
    engine, *_ = deepspeed.initialize(model=module, config=ds)
    return engine.module.eval()  # ZeRO-3's hooks on its submodules gather each layer's shards in forward

