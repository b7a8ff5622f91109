"""A training stage run as a trial of a sweep reports its metric to Ray Tune at every logging step (HF
trainers: :class:`ReportToTune`) or every iteration (PPO/GRPO: :func:`tune_values`), so that a scheduler
(ASHA) can stop it early. The trial's driver sets ``RAYALIGN_TUNE_METRIC`` to ``<sweep metric>:<the
logged value it follows>`` (final_loss:loss, final_reward_mean:reward_mean); the launcher passes it to
the workers and forwards their reports to Tune (``TuneReportCallback``); outside a sweep nothing changes."""

from __future__ import annotations

import os

TUNE_METRIC_ENV = "RAYALIGN_TUNE_METRIC"


def tune_metric() -> tuple[str, str] | None:
    """(sweep metric, logged name) when this process trains a sweep trial, else None."""
    value = os.environ.get(TUNE_METRIC_ENV)
    if not value or ":" not in value:
        return None
    metric, _, logged = value.partition(":")
    return metric, logged


def tune_callbacks() -> list:
    """The Ray Train run callbacks of a trial: its workers' reports that carry the metric go on to Tune,
    without their checkpoint (a PPO trial's checkpoint iterations carry it; the checkpoint stays with Ray
    Train, which resumes from it). An HF trainer's checkpoint reports (``train.save_steps``) do not carry
    it, and Tune refuses a result without the sweep's metric: those stay with Ray Train alone."""
    followed = tune_metric()
    if followed is None:
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and followed[0] in metrics[0]:
                super().after_report(run_context, metrics, None)

    return [MetricReports()]


def tune_values(logged: dict) -> dict | None:
    """``{sweep metric: value}`` when this process trains a sweep trial and ``logged`` (one step's logged
    values) holds the value the metric follows; else None (nothing to tell Tune)."""
    followed = tune_metric()
    if followed is None or not isinstance(logged.get(followed[1]), (int, float)):
        return None
    return {followed[0]: float(logged[followed[1]])}


class ReportToTune:
    """Every rank, at every log that holds the followed value: ``{metric: value, "step": global_step}``
    (every rank reports, the same number of times, as Ray Train requires)."""

    def __new__(cls):
        from transformers import TrainerCallback

        from stages import train_session

        class _Report(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                values = tune_values(logs or {})
                if values is not None:
                    train_session.report({**values, "step": state.global_step})

        return _Report()
