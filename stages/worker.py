"""The pieces every training worker shares (runs inside Ray Train workers).

A stage's ``train_fn_per_worker`` reads like a recipe::

    setup_worker(args)
    train_args = training_arguments(DPOConfig, args, beta=...)
    model = load_model(...)
    trainer = DPOTrainer(model=model, args=train_args, ...)
    train_and_save(trainer, args)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from stages.launcher import TRAIN_LOG


def setup_worker(args: dict) -> None:
    import torch

    os.environ.update(args.get("env", {}))
    torch.set_num_threads(args["threads"])
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()  # the progress callback prints one line per log step instead
    hf_logging.disable_progress_bar()


def is_rank_zero() -> bool:
    import ray.train

    return ray.train.get_context().get_world_rank() == 0


def training_arguments(config_cls, args: dict, **stage_fields):
    """The TRL/HF training arguments for a worker, built from the stage's typed ``train`` section.

    Every stage's trainer config is built here so that they agree on schedule, precision,
    DeepSpeed, checkpointing and tracking.
    """
    from stages.ds_config import deepspeed_config
    from pipeline.spec import DeepSpeedConfig

    train = args["train"]
    precision = args["precision"]
    length = {"max_steps": train["max_steps"]} if train["max_steps"] else {"num_train_epochs": train["epochs"]}
    save_steps = train["save_steps"]
    evaluate = bool(args.get("has_eval"))
    eval_steps = train["eval_steps"] or train["logging_steps"]
    early_stopping = bool(evaluate and train["early_stopping_patience"])
    if early_stopping and (save_steps is None or save_steps % eval_steps):
        save_steps = eval_steps  # keeping the best model needs a checkpoint at every evaluation
    kwargs = dict(
        output_dir=str(Path(args["work_dir"]) / "checkpoints"),
        learning_rate=train["lr"],
        lr_scheduler_type=train["lr_schedule"],
        lr_scheduler_kwargs={"min_lr_rate": 0.1} if train["lr_schedule"] == "cosine_with_min_lr" else None,
        warmup_steps=train["warmup_ratio"],  # a float in [0, 1) is a ratio of the total steps
        weight_decay=train["weight_decay"],
        max_grad_norm=train["max_grad_norm"],
        per_device_train_batch_size=train["batch_size"],
        per_device_eval_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["grad_accum"],
        seed=train["seed"],
        data_seed=train["seed"],
        logging_steps=train["logging_steps"],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=1,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if evaluate else None,
        gradient_checkpointing=train["gradient_checkpointing"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not args["use_gpu"],
        deepspeed=deepspeed_config(DeepSpeedConfig(**args["deepspeed"])),
        report_to=[] if args["report_to"] == "none" else [args["report_to"]],
        run_name=args["stage"],
        disable_tqdm=True,  # the progress callback prints one line per log step instead
        dataloader_num_workers=0,
        remove_unused_columns=False if stage_fields.pop("keep_columns", False) else True,
        **length,
        **stage_fields,
    )
    if save_steps is None:
        kwargs.pop("save_steps")
    config = config_cls(**kwargs)
    if config.deepspeed:
        # DeepSpeed must see the real world size before the model loads (ZeRO-3 on gloo otherwise
        # fails its batch-size check); harmless for the other stages.
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if args["use_gpu"] else "gloo")
    return config


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
                elapsed = time.monotonic() - self.start
                print(f"[rayalign] {stage}: step {state.global_step}/{state.max_steps} {shown} "
                      f"elapsed {elapsed:.1f}s", flush=True)

        return _Progress()


def resume_checkpoint(args: dict) -> str | None:
    """The checkpoint to resume from: Ray's last reported one, else the newest complete one in the
    output folder (a checkpoint cut off mid-write has no ``trainer_state.json`` and is ignored)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        path = Path(checkpoint.path) / "checkpoint"
        if (path / "trainer_state.json").exists():
            return str(path)
    output_dir = Path(args["work_dir"]) / "checkpoints"
    complete = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[-1]))) if complete else None


def checkpoint_step(checkpoint: str | None) -> int | None:
    if checkpoint is None:
        return None
    state = Path(checkpoint) / "trainer_state.json"
    return json.loads(state.read_text())["global_step"] if state.exists() else None


def train_and_save(trainer, args: dict, early_stopping: bool = False) -> None:
    """Train (resuming if a checkpoint exists), save the HF folder, and write the training log."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import EarlyStoppingCallback, PrinterCallback

    trainer.remove_callback(PrinterCallback)  # replaced by the one-line progress callback
    trainer.add_callback(ProgressCallback(args["stage"]))
    if args["train"]["save_steps"]:
        trainer.add_callback(RayTrainReportCallback())
    if early_stopping and args["train"]["early_stopping_patience"]:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=args["train"]["early_stopping_patience"]))
    trainer = prepare_trainer(trainer)
    checkpoint = resume_checkpoint(args)
    if checkpoint and is_rank_zero():
        print(f"[rayalign] {args['stage']}: resuming from {checkpoint}", flush=True)
    summary = model_summary(trainer.model)
    resumed_step = checkpoint_step(checkpoint)  # before training: checkpoint rotation deletes it
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_model(trainer, args)
    probe = probe_outputs(trainer)  # every rank: under ZeRO-3 the forward pass gathers shards
    if is_rank_zero():
        log = {
            "log_history": trainer.state.log_history,
            "train_metrics": result.metrics,
            "global_step": trainer.state.global_step,
            "resumed_from": checkpoint,
            "resumed_step": resumed_step,
            "model_summary": summary,
            "probe": probe,
        }
        (Path(args["work_dir"]) / TRAIN_LOG).write_text(json.dumps(log, default=float))


PROBE_TEXT = "12+34=46. The quick brown fox."


def probe_outputs(trainer) -> dict:
    """The trained in-memory model's last-position logits on a fixed text.

    Recorded in the training log so that anyone can check that the saved folder, reloaded with
    plain transformers/peft, computes the same function (a broken save shows up here).
    """
    import torch

    model = trainer.model
    ids = trainer.processing_class(PROBE_TEXT, return_tensors="pt").input_ids.to(trainer.args.device)
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


def save_model(trainer, args: dict) -> None:
    """Save weights (or the adapter) and tokenizer (the driver merges adapters afterwards).

    Every rank calls ``save_model``: under ZeRO-3 the weights are gathered across ranks.
    """
    model_dir = Path(args["model_dir"])
    trainer.save_model(str(model_dir))
    if not is_rank_zero():
        return
    (model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest holds the config
    trainer.processing_class.save_pretrained(str(model_dir))
