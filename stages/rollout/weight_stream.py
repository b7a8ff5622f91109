"""Full weights from trainer rank 0 to the rollout engines' worker processes by broadcast, bucket by bucket.

The object-store path (``RolloutGroup.update_weights(state_dict)``) materialises the whole state_dict on
the trainer, again in the object store, again in each engine actor and again as a safetensors blob for
vLLM's worker. Here the trainer and every process that holds engine weights (each vLLM tensor-parallel
worker, or the ``hf`` engine's actor) form a process group of their own and the trainer broadcasts the
parameters in a fixed order; the metadata ``(name, dtype, shape)`` travels first, by Ray. Consecutive small
tensors share one broadcast (a bucket of ``rollout.sync_bucket_mb``): each broadcast is a round trip, which
cost ~1 ms per tensor on CPU (gloo) and dominated the sync of small models; larger tensors go alone. A
receiver turns the broadcasts into a ``(name, tensor)`` iterator, so extra memory is one bucket or one
parameter, whichever is larger.

The group never touches ``torch.distributed``'s default group (the trainer has DeepSpeed's, vLLM its
own): a ``TCPStore`` whose master is the trainer (port 0: the OS picks a free port, no race), a
``PrefixStore`` over it, and a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (GPU) backend object,
called directly with ``BroadcastOptions.rootRank = 0`` (``torch.distributed.broadcast(group=...)`` would
map *global* ranks, which mean nothing here). Group rank 0 is the trainer, ranks 1.. the engine workers.

Pure torch: the trainer side runs where vLLM is not installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

# (name, dtype as str(torch.dtype), shape): what a receiver needs to allocate each broadcast's buffer.
TensorMeta = tuple[str, str, tuple[int, ...]]

GROUP_PREFIX = "rayalign/weight-stream"
BACKENDS = ("gloo", "nccl")


def tensor_meta(name: str, dtype: torch.dtype, shape: Iterable[int]) -> TensorMeta:
    return (name, str(dtype), tuple(int(s) for s in shape))


def dtype_from_name(name: str) -> torch.dtype:
    """``"torch.bfloat16"`` -> ``torch.bfloat16``; anything else is an error (no eval of strings)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def stream_device(backend: str) -> torch.device:
    """Where a member's broadcast buffers live: NCCL moves GPU tensors, our gloo use moves CPU tensors."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def open_master_store(host: str, world: int, timeout_s: float) -> dist.TCPStore:
    """The trainer's store; its ``.port`` is the free port the OS gave it (port 0 avoids a pick-then-bind race)."""
    return dist.TCPStore(host, 0, world_size=world, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


@dataclass
class WeightGroup:
    """One member's end of a weight-stream group (``rank`` 0 = the trainer, the sender)."""

    rank: int
    world: int
    backend: str
    device: torch.device
    pg: Any = field(repr=False)
    store: Any = field(repr=False)  # kept alive with the group: the backend talks through it

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send (rank 0) or receive into (others) ``tensor``, in place."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        self.pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - a broken group may refuse a clean shutdown; it is dropped anyway
                pass
        self.pg = None
        self.store = None


def join_weight_group(host: str, port: int, rank: int, world: int, backend: str, timeout_s: float,
                      store: dist.Store | None = None) -> WeightGroup:
    """Become ``rank`` of the ``world``-member group whose store listens on ``host:port``; blocks until all
    members joined (at most ``timeout_s``). The trainer passes its master ``store``; the others connect."""
    if backend not in BACKENDS:
        raise ValueError(f"weight-stream backend must be one of {BACKENDS}, got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, world_size=world, is_master=False, timeout=timeout)
    # The port is unique per formation: a member of an older group cannot read this one's keys.
    prefixed = dist.PrefixStore(f"{GROUP_PREFIX}/{port}", store)
    group = WeightGroup(rank, world, backend, stream_device(backend), _backend(prefixed, rank, world, backend, timeout),
                        store)
    _check_membership(group)
    return group


def _backend(store: dist.Store, rank: int, world: int, backend: str, timeout: timedelta) -> Any:
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)  # connects the full mesh now
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world, options)  # connects on the first collective


def _check_membership(group: WeightGroup) -> None:
    """One small broadcast: makes NCCL connect now (it is lazy) and proves every member agrees on the size."""
    probe = torch.tensor([group.world if group.rank == 0 else -1], dtype=torch.int64, device=group.device)
    group.broadcast(probe)
    if int(probe.item()) != group.world:
        raise RuntimeError(f"weight-stream group: rank 0 says world {int(probe.item())}, this member {group.world}")


def bucket_plan(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """The broadcasts that carry ``metas``: runs of consecutive tensors of one dtype, each run at most
    ``bucket_bytes``. A tensor of half a bucket or more travels by itself, without a copy: copying it would
    save at most one broadcast (on a 95M model, copying its 2.25 MiB matrices into 4 MiB buckets made the
    sync 1.15x slower). Sender and receivers compute it from the same metadata. ``bucket_bytes`` 0: one
    broadcast per tensor."""
    plan: list[list[int]] = []
    run_bytes, run_dtype, run_open = 0, None, False
    for index, (_, dtype, shape) in enumerate(metas):
        size = math.prod(shape) * dtype_from_name(dtype).itemsize
        small = 2 * size < bucket_bytes
        if run_open and small and dtype == run_dtype and run_bytes + size <= bucket_bytes:
            plan[-1].append(index)
            run_bytes += size
        else:
            plan.append([index])
            run_bytes, run_dtype, run_open = size, dtype, small
    return plan


def send_tensors(group: WeightGroup, metas: Sequence[TensorMeta], tensors: Iterable[torch.Tensor],
                 bucket_bytes: int) -> tuple[int, int]:
    """Broadcast ``tensors`` (in ``metas`` order) in the buckets of :func:`bucket_plan`; returns (broadcasts,
    bytes). A bucket is filled as its tensors arrive (under ZeRO-3 each is gathered only while it is copied),
    so the extra memory is one bucket or one parameter, whichever is larger."""
    stream = iter(tensors)
    count = nbytes = 0
    for bucket in bucket_plan(metas, bucket_bytes):
        if len(bucket) == 1:
            flat = _on(group, next(stream)).contiguous().reshape(-1)
        else:
            flat = torch.empty(sum(math.prod(metas[i][2]) for i in bucket), dtype=dtype_from_name(metas[bucket[0]][1]),
                               device=group.device)
            offset = 0
            for _ in bucket:
                tensor = next(stream).detach()
                flat[offset:offset + tensor.numel()].copy_(tensor.reshape(-1))
                offset += tensor.numel()
        group.broadcast(flat)
        count += 1
        nbytes += flat.numel() * flat.element_size()
    return count, nbytes


def _on(group: WeightGroup, tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    # e.g. GPU trainer, gloo group: one parameter's host copy
    return tensor if tensor.device == group.device else tensor.to(group.device)


def receive_tensors(group: WeightGroup, metas: Sequence[TensorMeta], bucket_bytes: int
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` as each broadcast arrives (tensors of one bucket are views of its buffer, a new buffer
    per broadcast). Consume it to the end (see :func:`drain`): every member must take part in every
    broadcast, or the sender and the others wait until the timeout."""
    for bucket in bucket_plan(metas, bucket_bytes):
        shapes = [tuple(metas[i][2]) for i in bucket]
        buffer = torch.empty(sum(math.prod(s) for s in shapes), dtype=dtype_from_name(metas[bucket[0]][1]),
                             device=group.device)
        group.broadcast(buffer)
        offset = 0
        for index, shape in zip(bucket, shapes):
            size = math.prod(shape)
            yield metas[index][0], buffer[offset:offset + size].view(shape)
            offset += size


def drain(stream: Iterator[Any]) -> int:
    """Consume what a loader left of a stream (a loader may stop early); returns how many items that was."""
    return sum(1 for _ in stream)


def with_alias_after(stream: Iterable[tuple[str, torch.Tensor]], source: str | None,
                     alias: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream, plus ``(alias, tensor)`` right after ``source`` arrives (``source`` None: unchanged).

    For tied embeddings: the engine's ``lm_head.weight`` must be fed the embedding again (see
    ``vllm_engine._with_tied_lm_head``), and in a stream that is as soon as the embedding arrived.
    """
    for name, tensor in stream:
        yield name, tensor
        if source is not None and name == source:
            yield alias, tensor
