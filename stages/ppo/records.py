"""A PPO worker's records of each iteration: metrics reduced over ranks, then on rank 0 the history, the
JSONL file, the tracking backend and the progress line (``stages.ppo.worker`` calls :func:`record` with
its ``PPORun``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
import torch

from stages.log import progress, stage_log
from stages.ppo.distributed import reduce_metrics
from stages.ppo.experience import Experience
from stages.rl import explained_variance

METRICS_FILE = "ppo_metrics.jsonl"
# How each metric combines over ranks (mean where not named): token counts add, wall times take the slowest.
REDUCE_OPS = {"rollout_tokens": "sum", "training_tokens": "sum", "samples": "sum", "rollout_seconds": "max",
              "training_seconds": "max", "sync_seconds": "max", "experience_seconds": "max",
              "scoring_seconds": "max", "verify_seconds": "max", "iteration_seconds": "max",
              "generate_seconds": "max"}
# The timed parts of ``iteration_seconds`` (the rest: reporting to Ray Train, reducing metrics, Python).
PHASES = ("rollout", "scoring", "experience", "training", "sync", "verify")


def record(run, step: int, exp: Experience, scores: torch.Tensor, finished: torch.Tensor, parts: dict,
           stats: dict, seconds: dict[str, float], synced: dict) -> dict:
    """The iteration's metrics, reduced over ranks; rank 0 appends them to the history, the JSONL file,
    TensorBoard and the log; the adaptive KL controller sees the measured KL."""
    mask = exp.batch.mask
    local = {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "score_mean": float(exp.scores.mean()), "response_length": float(mask.sum(-1).mean()),
        "finished_fraction": float(finished.float().mean()), "kl_coef": float(run.kl_ctl.value),
        # rollout_seconds: what the trainer waited for its samples; generate_seconds: how long they took (the
        # same on policy; with off_policy_steps the generation ran during the previous update). rollout_lag:
        # the updates between the weights that generated and those that train.
        "rollout_tokens": float(mask.sum()), "rollout_seconds": seconds["rollout"],
        "generate_seconds": seconds["generate"], "rollout_lag": seconds["lag"],
        "training_tokens": float(exp.batch.attention_mask.sum()) * run.config.algorithm.ppo_epochs,
        "training_seconds": seconds["training"], "experience_seconds": seconds["experience"],
        "scoring_seconds": seconds["scoring"], "sync_seconds": synced["sync_seconds"],
        "verify_seconds": synced.get("verify_seconds", 0.0), "lr": run.policy.lr,
        "iteration_seconds": seconds["iteration"],
        "samples": float(mask.shape[0]), "engine_restarts": float(run.engine_restarts),
        **({"sync_probe_diff": synced["sync_probe_diff"]} if "sync_probe_diff" in synced else {}),
        **{f"reward_{name}_mean": sum(v) / len(v) for name, v in parts.items() if len(parts) > 1},
        **stats,
    }
    if exp.values is not None:
        local["explained_variance"] = float(explained_variance(exp.values, exp.returns, mask))
    metrics = {k: v for k, v in reduce_metrics(local, REDUCE_OPS, run.device).items() if not math.isnan(v)}
    metrics["rollout_tokens_per_s"] = metrics["rollout_tokens"] / max(metrics["generate_seconds"], 1e-9)
    # (not "train_*": curves_from_history drops those names, they are the HF Trainer's summary keys)
    metrics["training_tokens_per_s"] = metrics["training_tokens"] / max(metrics["training_seconds"], 1e-9)
    metrics["samples_per_s"] = metrics["samples"] / max(metrics["iteration_seconds"], 1e-9)
    run.kl_ctl.update(metrics["kl"], n_steps=run.samples_per_rank * run.world)
    metrics["step"] = step
    entry = {**metrics, "sync_method": synced.get("sync_method", "")}
    if run.rank == 0:
        write_records(run, step, entry)
    return entry


def write_records(run, step: int, entry: dict) -> None:
    run.history.append(entry)
    append_metrics(run.work_dir, entry)
    if run.writer is not None:  # stages.ppo.tracking: numbers only, under ppo/
        run.writer.log(entry, step)
    if step % run.config.train.logging_steps == 0 or step == run.job.iterations or step == run.start + 1:
        value_loss = f"value_loss {entry['value_loss']:.4f} " if "value_loss" in entry else ""
        stage_log(run.job.stage, f"iteration {progress(step, run.job.iterations)} reward {entry['reward_mean']:.3f} "
                  f"kl {entry['kl']:.4f} entropy {entry['entropy']:.3f} {value_loss}"
                  f"rollout {entry['rollout_tokens_per_s']:.0f} tok/s sync {entry['sync_seconds']:.2f}s "
                  f"({entry['sync_method']})", run.started)


def load_history(work_dir: Path, start: int) -> list[dict]:
    """The metrics of iterations up to ``start`` (a resumed run continues the curves); the file is rewritten."""
    path = work_dir / METRICS_FILE
    history = []
    if path.exists() and start > 0:
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        history = [h for h in history if h.get("step", 0) <= start]
    path.write_text("".join(json.dumps(h) + "\n" for h in history))
    return history


def append_metrics(work_dir: Path, entry: dict) -> None:
    with open(work_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
