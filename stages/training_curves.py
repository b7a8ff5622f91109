"""Turn a trainer's log history into the manifest's metrics and curves."""

from __future__ import annotations

from stages.config import TrainingStageConfig
from stages.models import model_type_of
from stages.stage import StageContext, StageResult

SKIP = {"step", "epoch", "total_flos"}


def curves_from_history(history: list[dict]) -> dict[str, list[dict]]:
    """metric name -> [{"step": s, "value": v}, ...] for every numeric value the trainer logged."""
    curves: dict[str, list[dict]] = {}
    for entry in history:
        step = entry.get("step")
        for key, value in entry.items():
            if key in SKIP or not isinstance(value, (int, float)) or key.startswith("train_"):
                continue
            curves.setdefault(key, []).append({"step": step, "value": float(value)})
    return curves


def summarize_training(ctx: StageContext, config: TrainingStageConfig, log: dict, data_summary: dict,
                       extra_metrics: dict | None = None) -> StageResult:
    curves = curves_from_history(log["log_history"])
    metrics = {"global_step": log["global_step"], **{k: v for k, v in log["train_metrics"].items()
                                                      if isinstance(v, (int, float))}}
    for name, points in curves.items():
        metrics[f"final_{name}"] = points[-1]["value"]
    if "loss" in curves:
        metrics["first_loss"] = curves["loss"][0]["value"]
    if "eval_loss" in curves:
        metrics["best_eval_loss"] = min(p["value"] for p in curves["eval_loss"])
    metrics.update(log.get("heldout") or {})  # a mixture's per-task held-out loss on the final model
    metrics.update(log.get("stage_metrics") or {})  # e.g. continual.ewc's Fisher: ewc_fisher_examples, _mean
    metrics.update(extra_metrics or {})
    merged = ctx.work_dir / "merged"
    manifest = {
        "model_type": model_type_of(ctx.model_dir),
        "peft_method": config.peft.method,
        "merged_dir": "merged" if merged.exists() else None,
        "resumed_from": log.get("resumed_from"),
        "resumed_step": log.get("resumed_step"),
        "model_summary": log.get("model_summary"),
        "probe": log.get("probe"),
        "worker_nodes": log.get("worker_nodes"),  # Ray node ids, rank order
    }
    return StageResult(metrics=metrics, curves=curves, data={"data": data_summary}, manifest=manifest)
