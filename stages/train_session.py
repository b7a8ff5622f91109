"""Where a training worker runs: in a Ray Train worker group, or alone in this process.

Every stage's per-worker function runs in either. Inside ``trainer.fit()`` these answer from Ray
Train; outside it (world size 1: a debugger, or the GPU benchmark on a machine without Ray) they
answer from torch alone, so the same worker code runs on a bare GPU box.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any


def _ray_train():
    """The ``ray.train`` module when this process is a Ray Train worker, else None."""
    try:
        import ray.train
    except ImportError:  # a machine without Ray: always standalone
        return None
    try:
        ray.train.get_context()
    except RuntimeError:  # Ray is installed, but this is not a Ray Train worker
        return None
    return ray.train


def quiet_reports() -> None:
    """Drop Ray Train's INFO line per ``report`` (a page of metrics per step and rank) from a quiet run.

    Its logger is named after its file, not its module, so neither ``RunConfig``'s log level nor a
    level on ``ray.train`` reaches it (Ray 2.60); the session's log files keep everything else.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # no Ray, or another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def in_ray_train() -> bool:
    return _ray_train() is not None


def world_rank() -> int:
    train = _ray_train()
    return train.get_context().get_world_rank() if train is not None else 0


def world_size() -> int:
    train = _ray_train()
    return train.get_context().get_world_size() if train is not None else 1


def barrier() -> None:
    """Wait for every rank (torch.distributed); a no-op alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device():
    """This worker's device: Ray Train's choice in a worker group, else the current CUDA device or the CPU."""
    import torch

    if _ray_train() is not None:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def prepare_model(module, move_to_device: bool):
    """DDP-wrap (and place) a module in a worker group; standalone, only place it."""
    if _ray_train() is None:
        return module.to(device()) if move_to_device else module
    import ray.train.torch

    return ray.train.torch.prepare_model(module, move_to_device=move_to_device)


def report(metrics: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
    """Report metrics (every rank, the same number of times) and, from one rank, a checkpoint folder.

    The folder is reported where it is (the stage's folder on shared storage): Ray copies it to its
    storage once, with no staging copy through the worker's local disk. Standalone: nothing to do.
    """
    train = _ray_train()
    if train is None:
        return
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = train.Checkpoint.from_directory(str(checkpoint_dir))
    kwargs = {"checkpoint_dir_name": Path(checkpoint_dir).name} if checkpoint_dir is not None else {}
    train.report(metrics, checkpoint=checkpoint, **kwargs)


@contextlib.contextmanager
def latest_checkpoint():
    """Yields a local folder holding the last checkpoint Ray Train keeps for this run (a restarted
    run resumes from it), downloaded first when the storage is remote; None when there is none."""
    train = _ray_train()
    checkpoint = train.get_checkpoint() if train is not None else None
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as path:
        yield Path(path)
