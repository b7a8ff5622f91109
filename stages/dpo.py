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

from pipeline.spec import DPOConfig
from stages import launcher, preference_losses, training_data
from stages.launcher import WORKER_INFO
from stages.reward import periodic_eval, with_default_eval
from stages.stage import StageContext, StageResult
from stages.training_curves import summarize_training

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
    args = launcher.common_worker_args(
        ctx, config, model_source,
        loss=config.loss,
        trl_kwargs=preference_losses.trl_kwargs(config),
        train_file=str(data.train_file),
        eval_file=str(data.eval_file) if data.eval_file else None,
        has_eval=periodic_eval(config, data),
    )
    log = launcher.launch(ctx, config, train_preference_worker, args)
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
    from pipeline.spec import PeftConfig
    from stages.models import load_model, load_tokenizer, peft_config
    from stages.worker import is_rank_zero, setup_worker, train_and_save, training_arguments

    setup_worker(args)
    loss = preference_losses.get_loss(args["loss"])
    trainer_cls, config_cls = preference_losses.trainer_classes(loss.family)
    tokenizer = load_tokenizer(args["model_source"], args["chat_template"], args["trust_remote_code"])
    train_args = training_arguments(
        config_cls, args,
        max_length=args["train"]["max_length"],
        dataset_num_proc=None,
        keep_columns=loss.family in ("cpo", "orpo"),  # their collator needs the raw columns
        **args["trl_kwargs"],
    )
    peft = PeftConfig(**args["peft"])
    load = dict(trust_remote_code=args["trust_remote_code"],
                gradient_checkpointing=args["train"]["gradient_checkpointing"])
    model = load_model(args["model_source"], peft, args["precision"], **load)
    ref_model = None
    if needs_frozen_copy(loss, peft, args["trl_kwargs"]):
        ref_model = load_model(args["model_source"], peft, args["precision"], **load).eval().requires_grad_(False)
    trainer = build_trainer(
        loss, trainer_cls, model=model, ref_model=ref_model, args=train_args,
        train_dataset=training_data.read_dataset(args["train_file"]),
        eval_dataset=training_data.read_dataset(args["eval_file"]),
        processing_class=tokenizer, peft_config=peft_config(peft),
    )
    info = {"reference": reference_kind(loss, trainer, args["trl_kwargs"]), **parameter_counts(trainer)}
    if is_rank_zero():
        print(f"[rayalign] {args['stage']}: loss {loss.name} ({loss.family}), reference: {info['reference']}",
              flush=True)
    train_and_save(trainer, args, early_stopping=True)
    metrics = {}
    if trainer.eval_dataset is not None:
        metrics = {f"heldout_{k.removeprefix('eval_')}": v for k, v in trainer.evaluate().items()
                   if isinstance(v, (int, float)) and k.removeprefix("eval_") not in EVAL_NOISE}
    if is_rank_zero():
        metrics.update(train_examples_used=len(trainer.train_dataset))
        (Path(args["work_dir"]) / WORKER_INFO).write_text(json.dumps({**info, "metrics": metrics}))


def needs_frozen_copy(loss, peft, trl_kwargs: dict) -> bool:
    """A reference copy is loaded only for full fine-tuning of a reference-based loss scored on the fly."""
    family = preference_losses.FAMILIES[loss.family]
    return family.reference and peft.method == "full" and not trl_kwargs.get("precompute_ref_log_probs")


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
