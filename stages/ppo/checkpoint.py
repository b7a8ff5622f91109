"""Save and resume a PPO run: policy/adapter (+ value head), critic, optimizer and scheduler states,
the iteration index (which is also the data position: prompts are drawn by iteration), the KL
coefficient and every rank's RNG states.

Layout of ``<work_dir>/checkpoints/checkpoint-<iteration>/``::

    policy/      DeepSpeed ``save_checkpoint`` folder, or ``state.pt`` (trainable weights, optimizer,
                 scheduler) without DeepSpeed
    critic/      the same for a separate critic
    rng-<rank>.pt
    state.json   iteration, kl_coef, ...        (rank 0, written last)
    COMPLETE     marker: the folder is usable

Rank 0 reports the folder with ``ray.train.report(checkpoint=...)``, so Ray keeps a copy in the
run's storage; on a rerun :func:`find_resume` prefers Ray's checkpoint
(``ray.train.get_checkpoint()``) and falls back to the newest complete local folder, like
``stages.worker.resume_checkpoint``. (With DeepSpeed on several nodes each rank writes its shard to
its own disk: resume then relies on a shared ``work_dir``.)
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

import torch

from stages.ppo.distributed import barrier

PREFIX = "checkpoint-"
COMPLETE = "COMPLETE"
STATE = "state.json"


def checkpoints_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "checkpoints"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(work_dir: str | Path, iteration: int, trainees: dict, state: dict, rank: int) -> Path:
    """Every rank calls this (DeepSpeed checkpoints are collective); returns the folder."""
    folder = checkpoints_dir(work_dir) / f"{PREFIX}{iteration}"
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    barrier()
    for name, trainee in trainees.items():
        trainee.save(folder / name, rank)
    torch.save(rng_state(), folder / f"rng-{rank}.pt")
    barrier()
    if rank == 0:
        (folder / STATE).write_text(json.dumps({**state, "iteration": iteration}))
        (folder / COMPLETE).write_text("ok\n")
        for old in checkpoints_dir(work_dir).glob(f"{PREFIX}*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder


def latest_local(work_dir: str | Path) -> Path | None:
    folders = [p for p in checkpoints_dir(work_dir).glob(f"{PREFIX}*") if (p / COMPLETE).exists()]
    return max(folders, key=lambda p: int(p.name[len(PREFIX):]), default=None)


@contextlib.contextmanager
def find_resume(work_dir: str | Path):
    """Yields the checkpoint folder to resume from (Ray's last reported one, else the newest local), or None."""
    from stages.train_session import latest_checkpoint

    with latest_checkpoint() as path:
        if path is not None and (path / COMPLETE).exists():
            yield path
            return
    yield latest_local(work_dir)


def restore(folder: Path, trainees: dict, rank: int) -> dict:
    """Load every trainee's states and this rank's RNG; returns state.json (iteration, kl_coef, ...)."""
    for name, trainee in trainees.items():
        trainee.load(folder / name)
    rng = folder / f"rng-{rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))  # tensors and ints: no pickle
    return json.loads((folder / STATE).read_text())
