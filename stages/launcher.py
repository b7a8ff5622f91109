"""The one Ray Train launcher every training stage uses.

A stage gives it a per-worker training function (``train_fn_per_worker(args)``) and the
arguments; the launcher builds the ``TorchTrainer`` from the stage's ``scaling`` section, runs
it, and returns what rank 0 wrote (log history, final metrics). Checkpoints go to the stage's
partial folder, so a stage killed mid-run resumes from its last checkpoint on the next run. With an
object-store ``storage``, Ray Train's run state and reported checkpoints go to the object store
(``<stage>/.ray-<fingerprint>``), so a run restarted on another host restores them too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from stages.config import TrainingStageConfig
from stages.job import WorkerJob, worker_arguments
from stages.log import is_verbose
from stages.models import is_adapter
from stages.remote_storage import RemoteFolder, ray_storage
from stages.stage import StageContext
from stages.tune_report import TUNE_METRIC_ENV, tune_callbacks

TRAIN_LOG = "train_log.json"
WORKER_INFO = "worker_info.json"  # rank 0's stage-specific results (held-out metrics, critic, sync method)


def upstream_full_model(ctx: StageContext, artifact) -> Path:
    """Full weights of an upstream output, for a stage to start from (an adapter is merged once, in a
    Ray task, and cached)."""
    from stages.models import full_model_dir

    return full_model_dir(artifact.path, artifact.model_dir, ctx.run.run_root / ".merged",
                          merge=lambda adapter, target: merge_in_ray(ctx, adapter, target))


def merge_in_ray(ctx: StageContext, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge an adapter into its base in a Ray task sized for it (never in the driver: on a KubeRay
    head an 8B merge is an OOM kill), in the base's dtype."""
    from stages.models import merge_adapter_in_ray

    ctx.run.connect_ray()
    ctx.log(f"merging the adapter {adapter_dir} into its base (a Ray task)")
    info = merge_adapter_in_ray(adapter_dir, out_dir, ctx.run.trust_remote_code, env_vars=worker_env(ctx))
    ctx.log(f"merged into {out_dir} ({info['precision']}, on {info['host']})")
    return Path(info["out_dir"])


def worker_env(ctx: StageContext) -> dict[str, str]:
    """Environment for training workers: offline hub, quiet Ray prints, tracking destinations."""
    env = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
    }
    if TUNE_METRIC_ENV in os.environ:  # this stage runs as a sweep trial
        env[TUNE_METRIC_ENV] = os.environ[TUNE_METRIC_ENV]
    if not is_verbose():  # vLLM logs every engine start step at INFO (dozens of lines per engine)
        env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")
    tracking = ctx.run.tracking
    run_root = ctx.run.run_root
    if tracking.backend == "tensorboard":
        env["TENSORBOARD_LOGGING_DIR"] = str(run_root / "tensorboard" / ctx.name)
    elif tracking.backend == "mlflow":
        env["MLFLOW_TRACKING_URI"] = tracking.mlflow_uri or (run_root / "mlruns").as_uri()
        if env["MLFLOW_TRACKING_URI"].startswith("file:"):  # mlflow >= 3.7 refuses a file store without it
            env["MLFLOW_ALLOW_FILE_STORE"] = "true"
        env["MLFLOW_EXPERIMENT_NAME"] = ctx.run.pipeline
        env["MLFLOW_RUN_NAME"] = ctx.name
    elif tracking.backend == "wandb":
        env["WANDB_PROJECT"] = tracking.project or ctx.run.pipeline
        env["WANDB_DIR"] = str(run_root)
        env["WANDB_NAME"] = ctx.name
    return env


def report_to(ctx: StageContext) -> str:
    return ctx.run.tracking.backend


def worker_job(ctx: StageContext, config: TrainingStageConfig, model_source: Path, job_cls: type[WorkerJob] = WorkerJob,
               **fields) -> WorkerJob:
    """What every training worker is told besides the config; stages add their own ``fields``."""
    return job_cls(
        stage=ctx.name,
        work_dir=str(ctx.work_dir),
        model_dir=str(fields.pop("model_dir", ctx.model_dir)),
        model_source=str(model_source),
        precision=config.train.precision,
        threads=max(1, int(config.scaling.cpus_per_worker)),
        report_to=report_to(ctx),
        # A CPU stage stays on the CPU even on a GPU node (and DeepSpeed need not guess, nor warn that it did).
        env={**worker_env(ctx), **({} if config.scaling.use_gpu else {"DS_ACCELERATOR": "cpu"})},
        trust_remote_code=ctx.run.trust_remote_code,
        **fields,
    )


def ray_run_folder(ctx: StageContext) -> tuple[str, str]:
    """Ray Train's run folder under an object store: <stage>/.ray-<fingerprint> (hidden from the store's
    listings, and the same on every host, so a run restarted anywhere restores its last checkpoint)."""
    return ctx.name, f".ray-{ctx.fingerprint}"


def ray_storage_location(ctx: StageContext) -> tuple[str, object | None]:
    """Ray Train's ``storage_path`` and ``storage_filesystem``: the attempt's folder for a local store,
    the object store itself (so that checkpoints persist beyond this host) for a remote one."""
    if ctx.run.storage_uri is None:
        return str(ctx.work_dir / "ray"), None
    return ray_storage(ctx.run.storage_uri, *ray_run_folder(ctx))


def launch(ctx: StageContext, config: TrainingStageConfig, train_fn_per_worker: Callable[[dict], None],
           job: WorkerJob, **handles) -> dict:
    """Run ``train_fn_per_worker`` on a Ray Train worker group; returns rank 0's training log.

    The worker gets :func:`stages.job.worker_arguments`: the job and the config as JSON, and ``handles``
    (Ray actors) as they are.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    ctx.run.connect_ray()
    storage_path, storage_filesystem = ray_storage_location(ctx)
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    trainer = TorchTrainer(
        train_loop_per_worker=train_fn_per_worker,
        train_loop_config=worker_arguments(job, config, **handles),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            # The same name and storage on a rerun make Ray restore the last reported checkpoint.
            name=f"{ctx.name}-{ctx.fingerprint}",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            worker_runtime_env={"env_vars": job.env},
            # Ray Train's controller and worker INFO lines (resources requested, worker group started, every
            # report) stay in the session's log files; the console gets its warnings, unless verbose.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING"),
            callbacks=tune_callbacks(),  # a sweep trial's per-step reports go on to Ray Tune
        ),
    )
    ctx.log(f"Ray Train: {scaling.num_workers} worker(s), {resources} each, ZeRO {config.deepspeed.zero_stage}, "
            f"peft {config.peft.method}")
    trainer.fit()
    ctx.log("Ray Train job finished")
    log = json.loads((ctx.work_dir / TRAIN_LOG).read_text())
    # Resume points are only needed until the stage completes.
    for transient in ("checkpoints", "ray"):
        shutil.rmtree(ctx.work_dir / transient, ignore_errors=True)
    if storage_filesystem is not None:
        RemoteFolder(ctx.run.storage_uri).child(*ray_run_folder(ctx)).delete()
    if config.merge and is_adapter(ctx.model_dir):
        # After the Ray Train job, in a Ray task of its own: inside a ZeRO-3 worker from_pretrained
        # would wait on the other ranks, and the driver (a KubeRay head) has no memory to spare.
        merge_in_ray(ctx, ctx.model_dir, ctx.work_dir / "merged")
    return log
