"""Supervised fine-tuning: TRL's ``SFTTrainer`` in Ray Train workers.

Run it alone with ``rayalign run configs/tiny.yaml --only sft``; the recipe:
load the conversations, start from the upstream model (full weights), train with the
stage's PEFT method under DeepSpeed ZeRO, save the adapter (and the merged model if asked).
"""

from __future__ import annotations

from pipeline.spec import SFTConfig
from stages import launcher, training_data
from stages.stage import StageContext, StageResult
from stages.training_curves import summarize_training


def run(ctx: StageContext) -> StageResult:
    config: SFTConfig = ctx.config
    data = training_data.prepare(ctx, config.data, "sft", seed=config.train.seed)
    source = ctx.inputs["from"]
    model_source = launcher.upstream_full_model(ctx, source)
    args = launcher.common_worker_args(
        ctx, config, model_source,
        train_file=str(data.train_file),
        eval_file=str(data.eval_file) if data.eval_file else None,
        has_eval=data.eval_file is not None,
        assistant_only_loss=config.assistant_only_loss,
        packing=config.packing,
    )
    log = launcher.launch(ctx, config, train_sft_worker, args)
    return summarize_training(ctx, config, log, data.summary)


def train_sft_worker(args: dict) -> None:
    """Per-worker SFT loop (Ray Train ``train_loop_per_worker``)."""
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from stages.models import load_model, load_tokenizer, peft_config
    from stages.worker import setup_worker, train_and_save, training_arguments
    from pipeline.spec import PeftConfig

    setup_worker(args)
    tokenizer = load_tokenizer(args["model_source"], args["chat_template"], args["trust_remote_code"])
    train_args = training_arguments(
        TRLSFTConfig, args,
        max_length=args["train"]["max_length"],
        assistant_only_loss=args["assistant_only_loss"],
        packing=args["packing"],
        dataset_num_proc=None,
    )
    peft = PeftConfig(**args["peft"])
    model = load_model(args["model_source"], peft, args["precision"], trust_remote_code=args["trust_remote_code"],
                       gradient_checkpointing=args["train"]["gradient_checkpointing"])
    trainer = SFTTrainer(
        model=model,
        args=train_args,
        train_dataset=training_data.read_dataset(args["train_file"]),
        eval_dataset=training_data.read_dataset(args["eval_file"]),
        processing_class=tokenizer,
        peft_config=peft_config(peft),
    )
    train_and_save(trainer, args, early_stopping=True)
