"""Collectives of the PPO workers: rank and world, metric all-reduce, full parameters gathered to rank 0."""

from __future__ import annotations

import torch

from stages.train_session import barrier  # noqa: F401 - the PPO modules' collectives in one place


def dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_metrics(local: dict[str, float], ops: dict[str, str], device: torch.device | str = "cpu") -> dict[str, float]:
    """All-reduce a flat dict across ranks: ``mean`` by default, ``sum`` / ``max`` where ``ops`` says.

    ``device``: where the reduced tensor lives -- the worker's GPU under NCCL, which rejects CPU tensors.
    """
    import torch.distributed as dist

    keys = sorted(local)
    _, world = dist_info()
    if world == 1:
        return dict(local)
    out = {}
    for op_name, op in (("mean", dist.ReduceOp.SUM), ("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
        group = [k for k in keys if ops.get(k, "mean") == op_name]
        if not group:
            continue
        values = torch.tensor([float(local[k]) for k in group], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=op)
        if op_name == "mean":
            values /= world
        out.update(zip(group, values.cpu().tolist()))
    return out


def gathered_state_dict(module: torch.nn.Module, trainable_only: bool = False) -> dict | None:
    """Rank 0: ``{name: cpu tensor}`` of ``module``'s parameters (and persistent buffers); None elsewhere.

    Under ZeRO-3 each parameter is gathered on its own (``deepspeed.zero.GatheredParameters``), so at
    most one full parameter is materialised at a time. Every rank must call this.
    """
    rank, _ = dist_info()
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    out[name] = param.data.detach().cpu().clone()
        elif rank == 0:
            out[name] = param.detach().cpu().clone()
    if not trainable_only and rank == 0:
        persistent = set(module.state_dict().keys())
        out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in persistent})
    return out if rank == 0 else None


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on any (a collective: every rank must call it)."""
    import torch.distributed as dist

    _, world = dist_info()
    if world == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_rank0(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Rank 0's ``values`` on every rank (a collective; the other ranks pass placeholders of the same length)."""
    import torch.distributed as dist

    _, world = dist_info()
    if world == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.cpu().tolist()
