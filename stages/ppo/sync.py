"""Weight sync: the trained policy pushed to the rollout engines after every update."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from typing import Any, Iterator

import torch

from stages.ppo.config import SYNC_BUCKET_MB
from stages.ppo.distributed import any_rank, dist_info, from_rank0, gathered_state_dict
from stages.ppo.policy import ActorCritic, causal_lm, is_peft


def save_policy(actor: ActorCritic, folder: Path, tokenizer=None) -> Path | None:
    """Write the policy as a plain HF folder (the adapter under LoRA, full weights otherwise); collective."""
    rank, _ = dist_info()
    policy = actor.policy
    if is_peft(policy):
        state = gathered_state_dict(policy, trainable_only=True)
        if rank == 0:
            policy.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    else:
        lm = causal_lm(policy)
        state = gathered_state_dict(lm)
        if rank == 0:
            lm.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    if rank == 0 and tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder if rank == 0 else None


def sync_weights(actor: ActorCritic, engines, work_dir: Path, step: int, mode: str = "auto",
                 bucket_mb: float = SYNC_BUCKET_MB) -> dict:
    """:func:`push_weights`, then every rank learns whether an engine died during it: all raise
    ``EngineRestarted`` then (the caller sends the weights again), so no rank waits in a collective alone."""
    from stages.rollout.base import EngineRestarted

    failure, result = None, {}
    try:
        result = push_weights(actor, engines, work_dir, step, mode, bucket_mb)
    except EngineRestarted as exc:  # raised on rank 0, which talks to the engines
        failure = exc
    if any_rank(failure is not None, next(actor.parameters()).device):
        raise failure or EngineRestarted([], "update_weights", "reported by rank 0")
    return result


def push_weights(actor: ActorCritic, engines, work_dir: Path, step: int, mode: str = "auto",
                 bucket_mb: float = SYNC_BUCKET_MB) -> dict:
    """Push the current policy to every rollout engine; returns ``{"sync_seconds", "sync_method", ...}``.

    Collective (every rank calls it; rank 0 talks to the engines). ``engines`` is a
    ``RolloutGroup`` over all engines (rank 0) or None. LoRA: the adapter goes through a folder
    (``<work_dir>/sync/step-N``; each engine loads it under a fresh LoRA id). Full weights:
    :func:`push_full_weights` (streamed, or a state_dict) or a saved folder (``mode: folder``). Each engine records
    ``step`` as the version it serves (``stages.ppo.verify``).
    """
    rank, _ = dist_info()
    started = time.perf_counter()
    sync_root = Path(work_dir) / "sync"
    infos = []
    if is_peft(actor.policy) or mode == "folder":
        folder = sync_root / f"step-{step}"
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        save_policy(actor, folder)
        if rank == 0:
            infos = engines.update_weights(str(folder), version=step)
            for old in sync_root.glob("step-*"):  # the engines have loaded it: older folders can go
                if old != folder and int(old.name.split("-")[1]) < step - 1:
                    shutil.rmtree(old, ignore_errors=True)
    else:
        infos = push_full_weights(actor, engines, step, mode, bucket_mb)
    result = {"sync_seconds": time.perf_counter() - started}
    if infos:
        result["sync_method"] = infos[0].method
        result["engine_sync_seconds"] = max(i.seconds for i in infos)
    return result


def push_full_weights(actor: ActorCritic, engines, step: int, mode: str = "auto",
                      bucket_mb: float = SYNC_BUCKET_MB) -> list:
    """Full weights to every engine; rank 0 gets the engines' ``SyncInfo`` list, the other ranks ``[]``.

    ``mode`` auto / stream: broadcast over a process group of the trainer and the engines' worker
    processes (``stages.rollout.weight_stream``), in buckets of at most ``bucket_mb`` MiB. ``auto`` falls
    back to a gathered state_dict through the object store (``mode`` state_dict) when no group can be formed
    (an engine without support, in-process engines, a timeout) or the stream fails; ``stream`` raises
    instead. Collective: rank 0's choice is broadcast before each path, so every rank runs the same ZeRO-3
    gathers.
    """
    rank, _ = dist_info()
    module = causal_lm(actor.policy)
    device = next(actor.parameters()).device
    why = f"rollout.sync is {mode}"
    if mode in ("auto", "stream"):
        if rank == 0:
            why = _stream_unavailable(engines, "nccl" if device.type == "cuda" else "gloo")
        if _rank0_decides(why is None, device):
            infos, why = _stream_full_weights(module, engines, step, int(bucket_mb * 2**20))
            if _rank0_decides(why is None, device):
                return infos
        if mode == "stream":
            reason = why if rank == 0 else "see rank 0"
            raise RuntimeError(f"rollout.sync=stream, but the weights could not be streamed: {reason}")
    state = gathered_state_dict(module)
    if rank != 0:
        return []
    infos = engines.update_weights(state, version=step)
    for info in infos:
        info.details.setdefault("stream_unavailable", why)
    return infos


def _rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (a collective)."""
    return from_rank0([1.0 if flag else 0.0], device)[0] > 0.5


def _stream_unavailable(engines, backend: str) -> str | None:
    """None when the engines' weight-stream group is ready (formed now or before), else why not."""
    prepare = getattr(engines, "prepare_weight_stream", None)
    if prepare is None:
        return f"{type(engines).__name__} cannot stream weights"
    return prepare(backend=backend)


def _stream_full_weights(module: torch.nn.Module, engines, step: int, bucket_bytes: int) -> tuple[list, str | None]:
    """Every rank gathers each parameter in turn; rank 0 broadcasts it. Returns (infos, None), or
    (None, why) when rank 0's stream failed; the gathers then still run to the end on every rank."""
    from stages.rollout.weight_stream import drain

    rank, _ = dist_info()
    tensors = _gathered_tensors(module, rank)
    if rank != 0:
        drain(tensors)
        return [], None
    try:
        infos, why = engines.stream_weights(_stream_metas(module), tensors, bucket_bytes, version=step), None
    except Exception as exc:  # noqa: BLE001 - a broken group or engine: the state_dict path takes over
        infos, why = None, f"stream failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    drain(tensors)  # after a failure: the gathers the other ranks are still running
    return infos, why


def _gathered_tensors(module: torch.nn.Module, rank: int) -> Iterator[Any]:
    """Each parameter, full, in ``named_parameters`` order (rank 0; None elsewhere), then rank 0's
    persistent buffers. Under ZeRO-3 a parameter is gathered only while the consumer holds it."""
    for _, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield param.data if rank == 0 else None
        else:
            yield param.detach() if rank == 0 else None
    if rank == 0:
        for _, buffer in _persistent_buffers(module):
            yield buffer.detach()


def _stream_metas(module: torch.nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, full shape) of what :func:`_gathered_tensors` yields, in the same order."""
    from stages.rollout.weight_stream import tensor_meta

    metas = [tensor_meta(n, p.dtype, getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()]
    return metas + [tensor_meta(n, b.dtype, b.shape) for n, b in _persistent_buffers(module)]


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers a state_dict holds (as ``gathered_state_dict`` sends them)."""
    persistent = set(module.state_dict().keys())
    return [(n, b) for n, b in module.named_buffers() if n in persistent]
