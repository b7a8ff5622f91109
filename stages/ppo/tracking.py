"""The PPO worker's metrics to the run's tracking backend (``tracking.backend``).

The SFT, reward and DPO stages reach their backend through the HF Trainer's ``report_to``; PPO has its
own loop, so rank 0 logs through a :class:`Tracker` opened here. Destinations come from the environment
that ``stages.launcher.worker_env`` gives every worker (the job's ``env``, else the process's):

* ``tensorboard`` -- event files in ``TENSORBOARD_LOGGING_DIR`` (a resumed run purges the steps after
  its checkpoint, so the curves do not fork);
* ``mlflow``      -- a run named ``MLFLOW_RUN_NAME`` in experiment ``MLFLOW_EXPERIMENT_NAME`` at
  ``MLFLOW_TRACKING_URI``;
* ``wandb``       -- a run in ``WANDB_PROJECT`` / ``WANDB_DIR`` / ``WANDB_NAME``, in ``WANDB_MODE``
  (``offline`` where there is no network);
* ``none``        -- nothing.

    tracker = open_tracker(job, start_step=0)
    tracker.log({"reward_mean": 0.4, "sync_method": "nccl"}, step=1)   # -> ppo/reward_mean (text skipped)
    tracker.close()
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Protocol

from stages.job import WorkerJob

# Metric names carry the stage kind, as the HF Trainer's carry "train/" and "eval/".
PREFIX = "ppo/"
# Keys of a record that are not curves: the x axis itself.
NOT_METRICS = frozenset({"step"})


class Tracker(Protocol):
    """Where one worker's per-iteration metrics go."""

    def log(self, metrics: Mapping[str, object], step: int) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """``tracking.backend: none``, or a backend with nowhere to write."""

    def log(self, metrics: Mapping[str, object], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, log_dir: str, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after the checkpoint it resumes from.
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=start_step + 1 if start_step else None)

    def log(self, metrics: Mapping[str, object], step: int) -> None:
        for key, value in numeric_metrics(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    def __init__(self, uri: str | None, experiment: str | None, run_name: str) -> None:
        mlflow = import_backend("mlflow", "mlflow")
        if uri:
            mlflow.set_tracking_uri(uri)
        if experiment:
            mlflow.set_experiment(experiment)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)

    def log(self, metrics: Mapping[str, object], step: int) -> None:
        self.mlflow.log_metrics(numeric_metrics(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, project: str | None, directory: str | None, name: str, mode: str | None) -> None:
        wandb = import_backend("wandb", "wandb")
        if directory:  # wandb.init wants the folder to exist
            os.makedirs(directory, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=directory, name=name, mode=mode)

    def log(self, metrics: Mapping[str, object], step: int) -> None:
        self.run.log(numeric_metrics(metrics), step=step)

    def close(self) -> None:
        self.run.finish()
        # finish() can return before wandb's service process has written the last records (seen offline,
        # wandb 0.31); teardown waits for it, and the worker's process may end right after this.
        self.wandb.teardown()


def open_tracker(job: WorkerJob, start_step: int) -> Tracker:
    """The tracker for ``job.report_to``; ``start_step`` is the iteration a resumed run restarts after.

    Raises ImportError naming ``tracking.backend`` and the pip extra when the backend's package is missing.
    """
    def env(key: str) -> str | None:  # the job's env is what the worker sets; a bare process has its own
        return job.env.get(key) or os.environ.get(key)

    backend = job.report_to
    if backend == "tensorboard":
        log_dir = env("TENSORBOARD_LOGGING_DIR")
        return TensorBoardTracker(log_dir, start_step) if log_dir else NullTracker()
    if backend == "mlflow":
        return MlflowTracker(env("MLFLOW_TRACKING_URI"), env("MLFLOW_EXPERIMENT_NAME"),
                             env("MLFLOW_RUN_NAME") or job.stage)
    if backend == "wandb":
        return WandbTracker(env("WANDB_PROJECT"), env("WANDB_DIR"), env("WANDB_NAME") or job.stage,
                            env("WANDB_MODE"))
    if backend == "none":
        return NullTracker()
    raise ValueError(f"tracking.backend {backend!r} is not one of: tensorboard, mlflow, wandb, none")


def numeric_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """The curves of a record, prefixed: numbers only (``sync_method`` and other text are not curves)."""
    return {PREFIX + key: float(value) for key, value in metrics.items()
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def import_backend(backend: str, module: str) -> ModuleType:
    """The backend's package, or an error that says which setting asked for it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"tracking.backend is {backend!r}, but the {module!r} package is not installed in "
                          f"this worker's environment: pip install 'rayalign[{backend}]' "
                          f"(or set tracking.backend to tensorboard or none)") from error
