"""The pieces every training worker shares (runs inside Ray Train workers).

A stage's ``train_fn_per_worker`` reads like a recipe::

    job, config = worker_inputs(args, DPOConfig)   # typed, validated once
    setup_worker(job)
    train_args = training_arguments(trl.DPOConfig, job, config, beta=...)
    model = load_model(...)
    trainer = DPOTrainer(model=model, args=train_args, ...)
    train_and_save(trainer, job, config)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stages import train_session
from stages.adaptation import INITIAL_ADAPTER, converts_on_save, save_converted_adapter, save_initial_adapter
from stages.config import TrainingStageConfig
from stages.ds_config import deepspeed_config
from stages.job import StageConfigT, WorkerJob, worker_inputs
from stages.launcher import TRAIN_LOG
from stages.log import configure as configure_logging
from stages.log import is_verbose, progress, stage_log
from stages.optim import schedule_arguments, use_layer_lr_decay
from stages.tune_report import ReportToTune, tune_metric


def start_worker(args: dict, config_cls: type[StageConfigT], job_cls: type[WorkerJob] = WorkerJob):
    """A training worker's first lines: its typed job and config, the environment, the tokenizer."""
    from stages.models import load_tokenizer

    job, config = worker_inputs(args, config_cls, job_cls)
    job = resolve_on_worker(job, config)
    setup_worker(job)
    from transformers import set_seed  # after setup_worker's logging: it imports peft and bitsandbytes, which warn

    # Before any model loads: a new head (the reward model's score layer) is initialised from this seed,
    # so a stage rerun with the same fingerprint trains the same model.
    set_seed(config.train.seed)
    return job, config, load_tokenizer(job.model_source, config.chat_template, job.trust_remote_code)


def resolve_on_worker(job: WorkerJob, config: TrainingStageConfig) -> WorkerJob:
    """The job with ``precision: auto`` resolved here, where the model runs (bf16 where the hardware has it)."""
    from stages.models import resolve_precision

    return job.model_copy(update={"precision": resolve_precision(job.precision, config.scaling.use_gpu)})


def setup_worker(job: WorkerJob) -> None:
    import torch

    os.environ.update(job.env)
    torch.set_num_threads(job.threads)
    configure_logging()
    if not is_verbose():
        train_session.quiet_reports()
    if torch.cuda.is_available():
        # This worker's GPU as the current device before anything loads: a 4-bit (QLoRA) load and
        # NCCL otherwise put every local rank on GPU 0.
        torch.cuda.set_device(train_session.device())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the progress callback prints one line per log step instead
    try:
        from datasets.utils.logging import disable_progress_bar
    except ImportError:  # a standalone worker without datasets (the GPU check): nothing to quiet
        return
    disable_progress_bar()


def is_rank_zero() -> bool:
    return train_session.world_rank() == 0


def training_arguments(trl_config_cls, job: WorkerJob, config: TrainingStageConfig, **stage_fields):
    """The TRL/HF training arguments for a worker, built from the stage's typed ``train`` section.

    Every stage's trainer config is built here so that they agree on schedule, precision,
    DeepSpeed, checkpointing, sequence length and tracking; ``stage_fields`` are the trainer's own.
    """
    train = config.train
    length = {"max_steps": train.max_steps} if train.max_steps else {"num_train_epochs": train.epochs}
    save_steps = train.save_steps
    evaluate = job.has_eval
    eval_steps = train.eval_steps or train.logging_steps
    early_stopping = bool(evaluate and train.early_stopping_patience)
    if early_stopping and (save_steps is None or save_steps % eval_steps):
        save_steps = eval_steps  # keeping the best model needs a checkpoint at every evaluation
    kwargs = dict(
        output_dir=str(Path(job.work_dir) / "checkpoints"),
        **schedule_arguments(train),  # the one schedule of every stage (stages.optim)
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=1,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if evaluate else None,
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=job.precision == "bf16",
        fp16=job.precision == "fp16",
        use_cpu=not config.scaling.use_gpu,
        deepspeed=deepspeed_config(config.deepspeed, config.scaling.use_gpu),
        report_to=[] if job.report_to == "none" else [job.report_to],
        run_name=job.stage,
        disable_tqdm=True,  # the progress callback prints one line per log step instead
        dataloader_num_workers=0,
        remove_unused_columns=False if stage_fields.pop("keep_columns", False) else True,
        max_length=train.max_length,
        dataset_num_proc=None,  # tokenized in the worker's own process (Ray Train holds its CPUs)
        **length,
        **stage_fields,
    )
    if save_steps is None:
        kwargs.pop("save_steps")
    if kwargs["deepspeed"] and not config.scaling.use_gpu:
        skip_shm_allreduce_build()  # before the arguments: they may start the process group themselves
    arguments = trl_config_cls(**kwargs)
    if arguments.deepspeed:
        # DeepSpeed must see the real world size before the model loads (ZeRO-3 on gloo otherwise
        # fails its batch-size check); harmless for the other stages.
        init_deepspeed_distributed(config.scaling.use_gpu)
    return arguments


def init_deepspeed_distributed(use_gpu: bool) -> None:
    """DeepSpeed's process group: NCCL on GPUs, gloo on CPUs."""
    import deepspeed

    if not use_gpu:
        skip_shm_allreduce_build()
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def skip_shm_allreduce_build() -> None:
    """On CPUs, DeepSpeed's process group first JIT-compiles a shared-memory all-reduce op in every new
    environment (51 s of g++ on the 2-core machine, measured). Only its inference all-reduce (AutoTP) uses
    that op; ZeRO's collectives are torch.distributed's, so the op is marked unavailable instead of built."""
    import deepspeed.ops

    # DeepSpeed keeps this dict in its module so that edits to it persist (deepspeed/ops/__init__.py).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class ProgressCallback:
    """One line per log step on rank 0: stage, step/total, loss, elapsed."""

    def __new__(cls, stage: str):
        from transformers import TrainerCallback

        class _Progress(TrainerCallback):
            def __init__(self) -> None:
                self.start = time.monotonic()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not state.is_world_process_zero or not logs:
                    return
                shown = " ".join(
                    f"{k} {v:.4g}" for k, v in logs.items()
                    if isinstance(v, (int, float)) and k in ("loss", "eval_loss", "learning_rate", "grad_norm",
                                                             "rewards/accuracies", "rewards/margins", "accuracy")
                )
                stage_log(stage, f"step {progress(state.global_step, state.max_steps)} {shown}", self.start)

        return _Progress()


class ReportCheckpoints:
    """After each HF checkpoint save: every rank reports the metrics, rank 0 the checkpoint folder
    as it lies in the stage's folder (Ray's own callback first copies every rank's checkpoint
    through local ``/tmp``: a second full copy of an 8B checkpoint on each worker's disk)."""

    def __new__(cls):
        from transformers import TrainerCallback
        from transformers.trainer_utils import get_last_checkpoint

        class _Report(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                metrics = {}
                for entry in state.log_history:
                    metrics.update(entry)
                train_session.barrier()  # every rank's shard (ZeRO) is on disk before rank 0 hands the folder over
                folder = get_last_checkpoint(args.output_dir) if state.is_world_process_zero else None
                train_session.report(metrics, checkpoint_dir=folder)

        return _Report()


def resume_checkpoint(job: WorkerJob) -> str | None:
    """The checkpoint to resume from: Ray's last reported one, else the newest complete one in the
    output folder (a checkpoint cut off mid-write has no ``trainer_state.json`` and is ignored)."""
    with train_session.latest_checkpoint() as path:
        if path is not None and (path / "trainer_state.json").exists():
            return str(path)
    output_dir = Path(job.work_dir) / "checkpoints"
    complete = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[-1]))) if complete else None


def checkpoint_step(checkpoint: str | None) -> int | None:
    if checkpoint is None:
        return None
    state = Path(checkpoint) / "trainer_state.json"
    return json.loads(state.read_text())["global_step"] if state.exists() else None


STAGE_METRICS = "rayalign_stage_metrics"  # a trainer attribute: numbers a stage measured before training


def train_and_save(trainer, job: WorkerJob, config: TrainingStageConfig, early_stopping: bool = False,
                   final_evals: dict | None = None) -> None:
    """Train (resuming if a checkpoint exists), save the HF folder, and write the training log.
    ``final_evals`` (name -> held-out dataset) are evaluated once on the final model: ``heldout_loss/<name>``."""
    from transformers import EarlyStoppingCallback, PrinterCallback

    from stages.models import keep_trainable_in_precision

    trainer.remove_callback(PrinterCallback)  # replaced by the one-line progress callback
    trainer.add_callback(ProgressCallback(job.stage))
    if config.train.save_steps:
        trainer.add_callback(ReportCheckpoints())
    if tune_metric() is not None:  # a sweep trial: its metric at every log, for early stopping
        trainer.add_callback(ReportToTune())
    if early_stopping and config.train.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=config.train.early_stopping_patience))
    if config.peft.method == "qlora":  # before the optimizer exists: it is built in trainer.train()
        keep_trainable_in_precision(trainer.model, job.precision)
    use_layer_lr_decay(trainer, config.train)
    if converts_on_save(config.peft):  # PiSSA/OLoRA: the adapter as it starts
        if config.kind == "dpo":  # its reference is the adapter-disabled model: the residual, not the base
            raise ValueError(f"peft.init {config.peft.init!r} does not work in dpo: the reference model would be "
                             "the residual base; use init default")
        if is_rank_zero():
            save_initial_adapter(trainer.model, job.work_dir)
    checkpoint = resume_checkpoint(job)
    if checkpoint and is_rank_zero():
        stage_log(job.stage, f"resuming from {checkpoint}")
    summary = model_summary(trainer.model)
    resumed_step = checkpoint_step(checkpoint)  # before training: checkpoint rotation deletes it
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_model(trainer, job, config)
    probe = probe_outputs(trainer.model, trainer.processing_class)
    heldout, logged = {}, len(trainer.state.log_history)
    for name, dataset in (final_evals or {}).items():  # on every rank: under DeepSpeed evaluation is a collective
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=f"eval_{name}")
        heldout[f"heldout_loss/{name}"] = metrics[f"eval_{name}_loss"]
    del trainer.state.log_history[logged:]  # in the metrics as heldout_loss/<name>, not as one-point curves
    nodes = worker_nodes()
    if is_rank_zero():
        log = {
            "worker_nodes": nodes,
            "log_history": trainer.state.log_history,
            "train_metrics": result.metrics,
            "global_step": trainer.state.global_step,
            "resumed_from": checkpoint,
            "resumed_step": resumed_step,
            "model_summary": summary,
            "probe": probe,
            "heldout": heldout,
            "stage_metrics": getattr(trainer, STAGE_METRICS, {}),
        }
        (Path(job.work_dir) / TRAIN_LOG).write_text(json.dumps(log, default=float))


def worker_nodes() -> list[str]:
    """Every rank's Ray node id, in rank order: where the stage ran (its manifest records it). Every rank
    calls it (a collective)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


PROBE_TEXT = "12+34=46. The quick brown fox."


def probe_outputs(model, tokenizer) -> dict:
    """A trained in-memory model's last-position logits on a fixed text.

    Recorded in the training log so that anyone can check that the saved folder, reloaded with
    plain transformers/peft, computes the same function (a broken save shows up here). Every rank
    calls it: under ZeRO-3 the forward pass gathers shards.
    """
    import torch

    device = next(model.parameters()).device
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids.to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train(was_training)
    last = logits[0, -1] if logits.dim() == 3 else logits[0]
    return {"text": PROBE_TEXT, "logits": last.float().cpu().tolist()}


def model_summary(model) -> dict:
    """Parameter counts, and how many linear layers hold 4-bit weights (QLoRA)."""
    total = trainable = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", param.numel())  # ZeRO-3 partitions leave numel() at 0
        total += n
        trainable += n if param.requires_grad else 0
    four_bit = sum(1 for m in model.modules()
                   if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"))
    return {"total_params": total, "trainable_params": trainable, "linear4bit_modules": four_bit,
            "model_class": type(model).__name__}


def save_model(trainer, job: WorkerJob, config: TrainingStageConfig) -> None:
    """Save weights (or the adapter) and tokenizer (the driver merges adapters afterwards). A PiSSA/OLoRA
    adapter is saved converted to a plain LoRA adapter of the original base (``stages.adaptation``).

    Every rank calls ``save_model``: under ZeRO-3 the weights are gathered across ranks.
    """
    model_dir = Path(job.model_dir)
    trainer.save_model(str(model_dir))
    if not is_rank_zero():
        return
    if converts_on_save(config.peft):  # not under ZeRO-3 (stages.models.load_model refuses it)
        save_converted_adapter(trainer.model, model_dir, Path(job.work_dir) / INITIAL_ADAPTER)
    (model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest holds the config
    trainer.processing_class.save_pretrained(str(model_dir))
