"""Supervised fine-tuning: TRL's ``SFTTrainer`` in Ray Train workers.

Run it alone with ``rayalign run configs/tiny.yaml --only sft``; the recipe:
load the conversations, start from the upstream model (full weights), train with the
stage's PEFT method under DeepSpeed ZeRO (with ``continual.ewc``, holding the weights the old task
needs near their upstream values), save the adapter (and the merged model if asked).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from stages import continual, launcher, training_data
from stages.config import ContinualConfig, TrainingStageConfig
from stages.job import SFTJob
from stages.method_support import check_support
from stages.stage import StageContext, StageKind, StageResult
from stages.training_curves import summarize_training


class SFTConfig(TrainingStageConfig):
    """Instruction SFT (TRL ``SFTTrainer``) on conversations."""

    kind: Literal["sft"] = "sft"
    assistant_only_loss: bool = True
    packing: bool = False
    continual: ContinualConfig = ContinualConfig()

    data_inputs: ClassVar[dict[str, str]] = {"data": "sft", "continual.ewc.data": "sft"}

    @model_validator(mode="after")
    def _method_runs_here(self) -> SFTConfig:
        """The peft method against this kind, ZeRO stage (and rollout engine): ``stages.method_support``."""
        check_support(self)
        ewc = self.continual.ewc
        if ewc is not None and self.deepspeed.zero_stage == 3:
            raise ValueError("continual.ewc: under ZeRO-3 a worker holds only a shard of each weight outside the "
                             "forward pass, so the penalty cannot read them; use deepspeed.zero_stage 0, 1 or 2")
        if ewc is not None and ewc.data is None and self.from_ == "base":
            raise ValueError("continual.ewc.data: the stage trains from the base model, which has no training data "
                             "here to estimate the Fisher on; give the old task's data")
        return self


STAGE = StageKind("sft", SFTConfig, run="stages.sft:run")


def run(ctx: StageContext) -> StageResult:
    config: SFTConfig = ctx.config
    data = training_data.prepare(ctx, config.data, "sft", seed=config.train.seed)
    previous = continual.prepare_previous_task(ctx, config)  # continual.ewc: the old task's data, else None
    source = ctx.inputs["from"]
    model_source = launcher.upstream_full_model(ctx, source)
    job = launcher.worker_job(
        ctx, config, model_source, SFTJob,
        train_file=str(data.train_file),
        eval_file=str(data.eval_file) if data.eval_file else None,
        eval_files={label: str(path) for label, path in data.eval_files.items()},
        has_eval=data.eval_file is not None,
        previous_task_file=str(previous.train_file) if previous else None,
        previous_task_eval_file=str(previous.eval_file) if previous and previous.eval_file else None,
    )
    log = launcher.launch(ctx, config, train_sft_worker, job)
    result = summarize_training(ctx, config, log, data.summary)
    if previous:
        result.data["continual.ewc.data"] = previous.summary
    return result


def train_sft_worker(args: dict) -> None:
    """Per-worker SFT loop (Ray Train ``train_loop_per_worker``)."""
    from stages.models import load_model, peft_config
    from stages.worker import start_worker, train_and_save, training_arguments

    job, config, tokenizer = start_worker(args, SFTConfig, SFTJob)
    from trl import SFTConfig as TRLSFTConfig  # after start_worker: its logging settings see TRL's imports
    from trl import SFTTrainer

    train_args = training_arguments(TRLSFTConfig, job, config, assistant_only_loss=config.assistant_only_loss,
                                    packing=config.packing)
    model = load_model(job.model_source, config.peft, job.precision, trust_remote_code=job.trust_remote_code,
                       gradient_checkpointing=config.train.gradient_checkpointing,
                       zero_stage=config.deepspeed.zero_stage)
    trainer = SFTTrainer(
        model=model,
        args=train_args,
        train_dataset=training_data.read_dataset(job.train_file),
        eval_dataset=training_data.read_dataset(job.eval_file),  # all tasks': eval_loss, early stopping, sweeps
        processing_class=tokenizer,
        peft_config=peft_config(config.peft, model_dir=job.model_source),
    )
    # A mixture's tasks one by one, on the final model (SFTTrainer.evaluate tokenizes a raw held-out set).
    per_task = {label: training_data.read_dataset(path) for label, path in job.eval_files.items()}
    if config.continual.ewc is not None:  # the Fisher and the anchor from the upstream weights, before any step
        per_task.update(continual.use_ewc(trainer, config.continual.ewc, job.previous_task_file,
                                          job.previous_task_eval_file))
    train_and_save(trainer, job, config, early_stopping=True, final_evals=per_task)
