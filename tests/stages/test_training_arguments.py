"""The typed `train` section becomes the trainers' arguments the same way for every stage."""

from __future__ import annotations

from pipeline.spec import DeepSpeedConfig, PeftConfig, TrainConfig
from stages.worker import training_arguments


def worker_args(tmp_path, **train) -> dict:
    return {
        "stage": "sft", "work_dir": str(tmp_path), "train": TrainConfig(**train).model_dump(),
        "peft": PeftConfig().model_dump(), "deepspeed": DeepSpeedConfig().model_dump(), "precision": "fp32",
        "use_gpu": False, "report_to": "none", "has_eval": False,
    }


def test_schedule_length_and_checkpoints(tmp_path):
    from trl import SFTConfig

    args = training_arguments(SFTConfig, worker_args(tmp_path, max_steps=40, lr=1e-3, lr_schedule="linear",
                                                     warmup_ratio=0.1, batch_size=4, grad_accum=2, save_steps=10))
    assert (args.max_steps, args.learning_rate, args.lr_scheduler_type.value) == (40, 1e-3, "linear")
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(40) == 4
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 2)
    assert args.save_strategy.value == "steps" and args.save_steps == 10 and args.save_total_limit == 1
    assert args.use_cpu and not args.bf16 and not args.gradient_checkpointing
    assert args.report_to == [] and args.deepspeed is None


def test_epochs_eval_and_early_stopping(tmp_path):
    from trl import SFTConfig

    raw = worker_args(tmp_path, epochs=2, eval_steps=5, early_stopping_patience=3)
    raw["has_eval"] = True
    args = training_arguments(SFTConfig, raw)
    assert args.num_train_epochs == 2 and args.max_steps == -1
    assert args.eval_strategy.value == "steps" and args.eval_steps == 5
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    assert args.save_strategy.value == "steps" and args.save_steps == 5  # the best model needs a save per eval


def test_bf16_and_tracking_are_passed_through(tmp_path):
    from trl import SFTConfig

    raw = worker_args(tmp_path, max_steps=1, gradient_checkpointing=True)
    raw.update(report_to="tensorboard")
    args = training_arguments(SFTConfig, raw)
    assert args.report_to == ["tensorboard"] and args.gradient_checkpointing
