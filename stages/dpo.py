"""Preference optimisation of a policy: TRL's DPO (or CPO/ORPO/KTO) trainer in Ray Train workers.

Run it alone with ``rayalign run PIPELINE.yaml --only dpo``; the recipe: load the preference pairs
(or unpaired ``kto`` examples for ``loss: kto``), start the policy from the upstream model
(``from:``, normally sft), pick the objective by name from ``stages.preference_losses.LOSSES``,
train under DeepSpeed ZeRO, save the policy (the adapter, and the merged model if ``merge``),
and evaluate once on the held-out pairs.

Reference model (losses that have one): with a PEFT method it is the adapter-disabled base
(``ref_model=None`` plus ``peft_config``: one copy of the weights); with full fine-tuning an
explicit frozen copy of the starting policy (TRL would otherwise reload ``config._name_or_path``);
with ``precompute_ref_log_probs`` the starting policy scores the data once before training and
no reference is kept. The worker records which one in ``worker_info.json`` and the manifest.

On the tiny model plain sigmoid DPO lowers the chosen answers' likelihood too and collapses
generation; ``rpo_alpha: 1.0`` (DPO + NLL on the chosen answer) is what lifts held-out accuracy
over SFT (see ../shared/STACK.md).

Held-out data as in ``stages.reward``: ``eval_path``, ``eval_fraction``, else a builtin task's
test split. Metrics: the last logged rewards/chosen, rewards/rejected, accuracy, margin,
logps chosen/rejected (and KTO's ``kl``), their first values (``first_margin``), the held-out
evaluation (``heldout_*``), the loss curve and every other logged curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from stages import launcher, preference_losses, training_data
from stages.config import TrainingStageConfig
from stages.launcher import WORKER_INFO
from stages.log import stage_log
from stages.method_support import check_support
from stages.stage import StageContext, StageKind, StageResult
from stages.training_curves import summarize_training
from stages.training_data import periodic_eval, with_default_eval


class DPOConfig(TrainingStageConfig):
    """Preference optimisation of a policy (TRL DPO/CPO/ORPO/KTO trainers by ``loss``); see ``stages.dpo``."""

    kind: Literal["dpo"] = "dpo"
    data_inputs: ClassVar[dict[str, str]] = {"data": "preference"}  # record_kind: "kto" for the kto loss
    # The trainer's held-out numbers as heldout_<name> (heldout_loss, heldout_rewards/accuracies, ...).
    gate_metrics: ClassVar[tuple[str, ...]] = (*TrainingStageConfig.gate_metrics, "heldout_loss",
                                               "heldout_rewards/accuracies", "heldout_rewards/margins", "heldout_*",
                                               "train_examples_used")
    loss: str = Field("sigmoid", description="Objective by name (stages.preference_losses.LOSSES).")
    beta: float = Field(0.1, gt=0.0, description="Strength of the implicit KL penalty (IPO: tau; ORPO: lambda).")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="robust / simpo: probability a label is flipped.")
    rpo_alpha: float | None = Field(
        None, ge=0.0, description="Weight of an NLL term on the chosen answer (RPO); dpo-family and simpo losses."
    )
    simpo_gamma: float = Field(0.5, ge=0.0, description="simpo: target reward margin gamma.")
    precompute_ref_log_probs: bool = Field(False, description="Compute reference log-probs once before training.")
    desirable_weight: float = Field(1.0, gt=0.0, description="kto: weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="kto: weight of undesirable examples.")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        preference_losses.get_loss(value)  # ValueError listing the valid names
        return value

    @model_validator(mode="after")
    def _fields_fit_loss(self) -> DPOConfig:
        preference_losses.check_fields(self.loss, set(self.model_fields_set))
        if self.peft.init != "default":
            raise ValueError(f"peft.init: {self.peft.init} moves the base weights into the adapter, so the policy "
                             f"with the adapter off (DPO's reference) is not the starting model; use init: default")
        return self

    @model_validator(mode="after")
    def _method_runs_here(self) -> DPOConfig:
        """The peft method against this kind, ZeRO stage (and rollout engine): ``stages.method_support``."""
        check_support(self)
        return self

    def record_kind(self, field_name: str, default: str) -> str:
        """The record kind of a data field: ``kto`` losses read unpaired examples."""
        return preference_losses.family(self.loss).data_kind if field_name == "data" else default


STAGE = StageKind("dpo", DPOConfig, run="stages.dpo:run")

# Logged TRL metric -> manifest metric name (last logged value; "first_" + name for the first one).
SUMMARY_METRICS = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/accuracies": "accuracy",
    "rewards/margins": "margin",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
    "kl": "kl",
    "nll_loss": "nll_loss",
}

EVAL_NOISE = {"runtime", "samples_per_second", "steps_per_second", "epoch", "num_tokens"}


def run(ctx: StageContext) -> StageResult:
    config: DPOConfig = ctx.config
    family = preference_losses.family(config.loss)
    data = training_data.prepare(ctx, with_default_eval(config.data), family.data_kind, seed=config.train.seed)
    model_source = launcher.upstream_full_model(ctx, ctx.inputs["from"])
    job = launcher.worker_job(
        ctx, config, model_source,
        train_file=str(data.train_file),
        eval_file=str(data.eval_file) if data.eval_file else None,
        has_eval=periodic_eval(config, data),
    )
    log = launcher.launch(ctx, config, train_preference_worker, job)
    info = json.loads((ctx.work_dir / WORKER_INFO).read_text())
    counts = {k: info[k] for k in ("policy_parameters", "trainable_parameters", "ref_parameters")}
    result = summarize_training(ctx, config, log, data.summary,
                               extra_metrics={**summary_metrics(log["log_history"]), **info["metrics"], **counts})
    result.manifest.update(loss=config.loss, trainer=family.trainer.replace(":", "."), reference=info["reference"],
                           ref_model_is_none=info["ref_model_is_none"])
    return result


def summary_metrics(history: list[dict]) -> dict:
    """First and last logged value of the preference metrics (training log entries only)."""
    out = {}
    for key, name in SUMMARY_METRICS.items():
        values = [entry[key] for entry in history if key in entry]
        if values:
            out[name] = values[-1]
            out[f"first_{name}"] = values[0]
    return out


# --------------------------------------------------------------------------- worker side


def train_preference_worker(args: dict) -> None:
    """Per-worker preference-optimisation loop (Ray Train ``train_loop_per_worker``)."""
    from stages.models import load_model, peft_config
    from stages.worker import is_rank_zero, start_worker, train_and_save, training_arguments

    job, config, tokenizer = start_worker(args, DPOConfig)
    loss = preference_losses.get_loss(config.loss)
    trl_kwargs = preference_losses.trl_kwargs(config)
    trainer_cls, config_cls = preference_losses.trainer_classes(loss.family)
    train_args = training_arguments(config_cls, job, config, **trl_kwargs,
                                    keep_columns=loss.family in ("cpo", "orpo"))  # their collator needs raw columns
    load = dict(trust_remote_code=job.trust_remote_code, gradient_checkpointing=config.train.gradient_checkpointing,
                zero_stage=config.deepspeed.zero_stage)
    model = load_model(job.model_source, config.peft, job.precision, **load)
    ref_model = None
    if needs_frozen_copy(loss, config.peft, trl_kwargs):
        ref_model = load_model(job.model_source, config.peft, job.precision, **load).eval().requires_grad_(False)
    trainer = build_trainer(
        loss, trainer_cls, model=model, ref_model=ref_model, args=train_args,
        train_dataset=training_data.read_dataset(job.train_file),
        eval_dataset=training_data.read_dataset(job.eval_file),
        processing_class=tokenizer, peft_config=peft_config(config.peft, model_dir=job.model_source),
    )
    info = {"reference": reference_kind(loss, trainer, trl_kwargs), **parameter_counts(trainer)}
    if is_rank_zero():
        stage_log(job.stage, f"loss {loss.name} ({loss.family}), reference: {info['reference']}")
    train_and_save(trainer, job, config, early_stopping=True)
    metrics = {}
    if trainer.eval_dataset is not None:
        metrics = {f"heldout_{k.removeprefix('eval_')}": v for k, v in trainer.evaluate().items()
                   if isinstance(v, (int, float)) and k.removeprefix("eval_") not in EVAL_NOISE}
    if is_rank_zero():
        metrics.update(train_examples_used=len(trainer.train_dataset))
        (Path(job.work_dir) / WORKER_INFO).write_text(json.dumps({**info, "metrics": metrics}))


def needs_frozen_copy(loss, peft, trl_kwargs: dict) -> bool:
    """A reference copy is loaded only for full (or bias-only) fine-tuning of a reference-based loss scored
    on the fly: an adapter's reference is the policy with the adapter switched off."""
    family = preference_losses.FAMILIES[loss.family]
    return family.reference and peft.method in ("full", "bitfit") and not trl_kwargs.get("precompute_ref_log_probs")


def build_trainer(loss, trainer_cls, *, model, ref_model, args, train_dataset, eval_dataset, processing_class,
                  peft_config):
    """The TRL trainer of the loss's family (reference-free families take no ``ref_model``)."""
    kwargs = dict(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  processing_class=processing_class, peft_config=peft_config)
    if preference_losses.FAMILIES[loss.family].reference:
        kwargs["ref_model"] = ref_model
    return trainer_cls(**kwargs)


def reference_kind(loss, trainer, trl_kwargs: dict) -> str:
    if not preference_losses.FAMILIES[loss.family].reference:
        return "none (reference-free loss)"
    if trl_kwargs.get("precompute_ref_log_probs"):
        return "precomputed log-probs"
    if trainer.ref_model is None:
        return "adapter-disabled base"
    return "frozen copy"


def parameter_counts(trainer) -> dict:
    ref = getattr(trainer, "ref_model", None)
    return {
        "ref_model_is_none": ref is None,
        "policy_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "ref_parameters": sum(p.numel() for p in ref.parameters()) if ref is not None else 0,
    }
