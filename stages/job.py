"""What the driver tells a training worker besides its stage's config, and how both cross the Ray boundary.

The launcher sends ``{"job": WorkerJob.model_dump(mode="json"), "config": <stage config>.model_dump(...)}``
(plus Ray actor handles, which are not JSON); the worker validates each back into its pydantic class
once, with :func:`worker_inputs`, and reads typed fields from then on.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import Field

from stages.config import ConfigModel, TrainingStageConfig

StageConfigT = TypeVar("StageConfigT", bound=TrainingStageConfig)


class WorkerJob(ConfigModel):
    """Folders, inputs and the settings the driver resolves for a stage's workers."""

    stage: str
    work_dir: str  # the stage's partial artifact folder
    model_dir: str  # where the trained weights (the adapter under PEFT) are saved
    model_source: str  # the full upstream model the workers start from
    # train.precision; "auto" is resolved by the worker on its own hardware (stages.worker.resolve_on_worker):
    # a CPU-only driver must not decide fp32 for GPU workers.
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    threads: int = Field(ge=1)  # torch threads per worker (its CPUs)
    report_to: str  # tracking backend, "none" for none
    env: dict[str, str] = Field(default_factory=dict)  # set in every worker before anything loads
    trust_remote_code: bool = False
    train_file: str | None = None  # the prepared JSONL rows (stages.training_data)
    eval_file: str | None = None
    # A mixture's held-out records per task (label -> JSONL, each also in eval_file): evaluated one by one
    # after training, so the manifest has every task's held-out loss.
    eval_files: dict[str, str] = Field(default_factory=dict)
    has_eval: bool = False  # evaluate during training (eval_steps / early stopping)


class SFTJob(WorkerJob):
    previous_task_file: str | None = None  # continual.ewc: the old task's training rows (the Fisher's examples)
    previous_task_eval_file: str | None = None  # and its held-out rows: heldout_loss/previous_task


class RewardJob(WorkerJob):
    final_model_dir: str  # the plain sequence classifier (the adapter merged into it under PEFT)
    eval_task: str | None = None  # the built-in task whose categories split the held-out metrics


class PPOJob(WorkerJob):
    iterations: int = Field(ge=1)
    critic_source: str  # a separate critic starts from the reward model when there is one, else the policy
    reward_model_dir: str | None = None  # reward_placement: worker -- each worker loads the reward model


def worker_arguments(job: WorkerJob, config: TrainingStageConfig, **handles: Any) -> dict:
    """The ``train_loop_config`` of a Ray Train job: the job and the config as JSON, plus actor handles.

    The config goes as the user wrote it (``exclude_unset``): validators that look at which keys were
    given (dpo: a setting its loss ignores is an error) see the same keys in the worker, and the
    defaults are filled in again from the same class.
    """
    return {"job": job.model_dump(mode="json"),
            "config": config.model_dump(mode="json", by_alias=True, exclude_unset=True), **handles}


def worker_inputs(args: dict, config_cls: type[StageConfigT],
                  job_cls: type[WorkerJob] = WorkerJob) -> tuple[WorkerJob, StageConfigT]:
    """The typed job and stage config a worker was given (validated once, in the worker). Every training
    worker starts here, so this is also where pickle loads are switched off (``stages.safe_loading``)."""
    from stages.safe_loading import forbid_pickle_loads

    forbid_pickle_loads()
    return job_cls.model_validate(args["job"]), config_cls.model_validate(args["config"])
