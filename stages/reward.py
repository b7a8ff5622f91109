"""Reward model: TRL's ``RewardTrainer`` (Bradley-Terry) in Ray Train workers.

Run it alone with ``rayalign run PIPELINE.yaml --only reward``; the recipe: load the preference
pairs (ties and empty responses are skipped and counted by the loader), start a
``AutoModelForSequenceClassification(num_labels=1)`` from the upstream model (``from:`` sft or
base), train with the stage's PEFT method under DeepSpeed ZeRO, write a plain HF
sequence-classification folder to ``model/`` (a LoRA adapter is merged into it; the adapter itself
stays in ``adapter/``), then score the held-out pairs with that folder.

Loss: ``-log σ(r_chosen - r_rejected - margin)`` (``margin`` only when the records carry one and
``use_margin``), plus ``center_rewards_coefficient · mean((r_chosen + r_rejected)²)`` when set.

Held-out data: ``data.eval_path``, else ``data.eval_fraction`` of the pairs; for a ``builtin:<task>``
source with neither, the task's test split ``builtin:<task>/test`` (disjoint problems).
Pairs longer than ``train.max_length`` tokens are dropped (TRL's rule, applied to the held-out
pairs too) and counted in the metrics. Held-out metrics: pairwise accuracy (``r_chosen >
r_rejected``, ties count as wrong), mean margin, mean/std of the chosen and rejected rewards, and for a
built-in task's pairs the accuracy per task category (``heldout_accuracy/carry``, ...).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from stages import launcher, training_data
from stages.config import TrainingStageConfig
from stages.job import RewardJob
from stages.method_support import check_support
from stages.stage import StageContext, StageKind, StageResult
from stages.training_curves import summarize_training


class RewardConfig(TrainingStageConfig):
    """A Bradley-Terry reward model (TRL ``RewardTrainer``) on preference pairs; see ``stages.reward``."""

    kind: Literal["reward"] = "reward"
    data_inputs: ClassVar[dict[str, str]] = {"data": "preference"}
    # Held-out pairwise accuracy (and per category), margin and pair count: stages.reward_scoring.
    gate_metrics: ClassVar[tuple[str, ...]] = (*TrainingStageConfig.gate_metrics, "heldout_accuracy",
                                               "heldout_margin", "heldout_pairs", "heldout_accuracy/*",
                                               "train_pairs_used", "train_pairs_too_long")
    use_margin: bool = Field(True, description="Subtract the pairs' margin column (when present) inside the loss.")
    center_rewards_coefficient: float | None = Field(
        None, ge=0.0, description="Weight of the centering term mean((r_chosen + r_rejected)^2); None disables it."
    )

    @model_validator(mode="after")
    def _method_runs_here(self) -> RewardConfig:
        """The peft method against this kind and ZeRO stage: ``stages.method_support``."""
        check_support(self)
        return self


STAGE = StageKind("reward", RewardConfig, run="stages.reward:run")


def run(ctx: StageContext) -> StageResult:
    config: RewardConfig = ctx.config
    data_config = training_data.with_default_eval(config.data)
    data = training_data.prepare(ctx, data_config, "preference", seed=config.train.seed)
    model_source = launcher.upstream_full_model(ctx, ctx.inputs["from"])
    uses_peft = config.peft.method not in ("full", "bitfit")  # bitfit saves a full model, as full does
    job = launcher.worker_job(
        ctx, config, model_source, RewardJob,
        # Trained weights (the adapter under PEFT) go to adapter/; model/ gets the merged classifier.
        model_dir=str(ctx.work_dir / "adapter") if uses_peft else str(ctx.model_dir),
        final_model_dir=str(ctx.model_dir),
        train_file=str(data.train_file),
        eval_file=str(data.eval_file) if data.eval_file else None,
        has_eval=training_data.periodic_eval(config, data),
        eval_task=training_data.held_out_task(data_config),
    )
    log = launcher.launch(ctx, config, train_reward_worker, job)
    info = json.loads((ctx.work_dir / launcher.WORKER_INFO).read_text())
    if "heldout_accuracy" in info["metrics"]:
        ctx.log(describe_heldout(info["metrics"]))
    result = summarize_training(ctx, config, log, data.summary, extra_metrics=info["metrics"])
    result.manifest.update(head="reward", adapter_dir="adapter" if uses_peft else None)
    return result


def describe_heldout(metrics: dict) -> str:
    """One log line: held-out pairwise accuracy, per task category where known, and the margin."""
    by_category = ", ".join(f"{key.split('/', 1)[1]} {value:.1%}" for key, value in sorted(metrics.items())
                            if key.startswith("heldout_accuracy/"))
    return (f"held-out pairwise accuracy {metrics['heldout_accuracy']:.1%} on {metrics['heldout_pairs']} pairs"
            + (f" ({by_category})" if by_category else "") + f", mean margin {metrics['heldout_margin']:.3f}")


# --------------------------------------------------------------------------- worker side


def train_reward_worker(args: dict) -> None:
    """Per-worker reward-model loop (Ray Train ``train_loop_per_worker``)."""
    from stages.models import load_model, peft_config
    from stages.worker import is_rank_zero, start_worker, train_and_save, training_arguments

    job, config, tokenizer = start_worker(args, RewardConfig, RewardJob)
    from trl import RewardConfig as TRLRewardConfig  # after start_worker: its logging settings see TRL's imports
    from trl import RewardTrainer

    train_args = training_arguments(TRLRewardConfig, job, config,
                                    center_rewards_coefficient=config.center_rewards_coefficient)
    model = load_model(job.model_source, config.peft, job.precision, head="reward",
                       trust_remote_code=job.trust_remote_code,
                       gradient_checkpointing=config.train.gradient_checkpointing,
                       zero_stage=config.deepspeed.zero_stage)
    model.config.pad_token_id = tokenizer.pad_token_id
    train_pairs = pairs_dataset(job.train_file, config.use_margin)
    trainer = RewardTrainer(
        model=model,
        args=train_args,
        train_dataset=train_pairs,
        eval_dataset=pairs_dataset(job.eval_file, config.use_margin) if job.has_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config(config.peft, head="reward", model_dir=job.model_source),
    )
    train_and_save(trainer, job, config, early_stopping=True)
    if is_rank_zero():
        final_dir = Path(job.final_model_dir)
        if Path(job.model_dir) != final_dir:
            merge_reward_adapter(job.model_dir, final_dir, tokenizer, job.trust_remote_code)
        metrics = {"train_pairs_used": len(trainer.train_dataset),
                   "train_pairs_too_long": len(train_pairs) - len(trainer.train_dataset)}
        if job.eval_file:
            categories = pair_categories(job.eval_file, job.eval_task) if job.eval_task else None
            metrics.update(score_pairs(final_dir, job.eval_file, config.train.max_length, categories=categories))
        (Path(job.work_dir) / launcher.WORKER_INFO).write_text(json.dumps({"metrics": metrics}))


def pairs_dataset(path: str | None, use_margin: bool):
    """The prepared pairs; the margin column kept (missing margins as 0) only when used."""
    dataset = training_data.read_dataset(path)
    if dataset is None or "margin" not in dataset.column_names:
        return dataset
    if not use_margin:
        return dataset.remove_columns("margin")
    return dataset.map(lambda row: {"margin": float(row["margin"] or 0.0)})


def merge_reward_adapter(adapter_dir: str | Path, out_dir: str | Path, tokenizer, trust_remote_code: bool = False):
    """Merge a sequence-classification adapter into its (unquantized) base, in the base's dtype; a plain HF folder."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from stages.models import adapter_base, merge_precision, torch_dtype

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base = AutoModelForSequenceClassification.from_pretrained(
        adapter_base(adapter_dir), num_labels=1, dtype=torch_dtype(merge_precision(adapter_dir)),
        low_cpu_mem_usage=True, trust_remote_code=trust_remote_code, use_safetensors=True,
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def pair_categories(pairs_file: str, task_name: str) -> list[str]:
    """The task category of each pair's prompt (e.g. ``carry``/``no_carry``), in file order."""
    from stages.data.records import PromptExample
    from stages.tasks import get_task

    task = get_task(task_name)
    return [task.category(PromptExample.from_trl(json.loads(line))) for line in open(pairs_file)]


def score_pairs(model_dir: str | Path, pairs_file: str, max_length: int, batch_size: int = 32,
                categories: list[str] | None = None) -> dict:
    """Held-out metrics of a saved reward model (``stages.reward_scoring``, as PPO and the eval score).

    Pairs with a side longer than ``max_length`` tokens are skipped and counted. ``categories`` (one
    per pair in the file) adds ``heldout_accuracy/<category>``.
    """
    from stages.reward_scoring import RewardScorer

    scorer = RewardScorer(model_dir, batch_size=batch_size)
    rows = [json.loads(line) for line in open(pairs_file)]
    categories = categories or [None] * len(rows)
    encoded, kept_categories, too_long = [], [], 0
    for row, category in zip(rows, categories, strict=True):
        ids = [scorer.encode(row["prompt"] + row[side]) for side in ("chosen", "rejected")]
        if max(len(i) for i in ids) > max_length:
            too_long += 1
            continue
        encoded.append(ids)
        kept_categories.append(category)
    chosen = scorer.score_ids([c for c, _ in encoded])
    rejected = scorer.score_ids([r for _, r in encoded])
    n = len(chosen)
    if n == 0:
        return {"heldout_pairs": 0, "heldout_pairs_too_long": too_long}
    margins = [c - r for c, r in zip(chosen, rejected)]
    by_category = {}
    for category in sorted({c for c in kept_categories if c is not None}):
        wins = [m > 0 for m, c in zip(margins, kept_categories) if c == category]
        by_category[f"heldout_accuracy/{category}"] = sum(wins) / len(wins)
    return {
        **by_category,
        "heldout_pairs": n,
        "heldout_pairs_too_long": too_long,
        "heldout_accuracy": sum(m > 0 for m in margins) / n,
        "heldout_margin": sum(margins) / n,
        "heldout_reward_chosen_mean": _mean(chosen),
        "heldout_reward_chosen_std": _std(chosen),
        "heldout_reward_rejected_mean": _mean(rejected),
        "heldout_reward_rejected_std": _std(rejected),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
