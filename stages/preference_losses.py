"""The preference objectives of the ``dpo`` stage, by name: one table, name -> (TRL trainer family, TRL kwargs).

Usage::

    from stages.preference_losses import LOSSES, trl_kwargs, trainer_classes

    loss = LOSSES["simpo"]                   # Loss(name, family="cpo", trl={"loss_type": "simpo"}, ...)
    trainer_cls, config_cls = trainer_classes(loss.family)   # trl.experimental.cpo.CPOTrainer, CPOConfig
    kwargs = trl_kwargs(stage_config)        # beta, loss_type, simpo_gamma, ... for config_cls

Families (what TRL 1.16 offers):
  * ``dpo``  -- ``trl.DPOTrainer``: sigmoid (DPO), ipo, hinge, robust; a reference model (the
    adapter-disabled base under PEFT, else a frozen copy, or precomputed log-probs); ``rpo_alpha``
    adds TRL's ``"sft"`` term (mean token NLL of the chosen answer) with that weight (RPO).
  * ``cpo``  -- ``trl.experimental.cpo.CPOTrainer``: simpo (reference-free, length-normalised,
    target margin ``simpo_gamma``); ``rpo_alpha`` becomes CPO's NLL weight ``cpo_alpha`` (default 0).
  * ``orpo`` -- ``trl.experimental.orpo.ORPOTrainer``: reference-free odds-ratio term plus the NLL
    of the chosen answer (built in, weight 1).
  * ``kto``  -- ``trl.KTOTrainer``: unpaired data (record kind ``kto``: prompt, completion, label),
    reference like ``dpo``, a batch KL estimate, ``desirable_weight``/``undesirable_weight``.

No heavy imports here: ``stages.dpo.DPOConfig`` validates its ``loss`` against this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    trainer: str  # "module:Class"
    config: str  # "module:Class"
    data_kind: str  # record kind the loader must produce
    reference: bool  # whether the objective uses a reference model
    uses: tuple[str, ...] = ()  # stage config fields every loss of the family reads


@dataclass(frozen=True)
class Loss:
    name: str
    family: str
    trl: dict = field(default_factory=dict)  # fixed TRL config kwargs
    uses: tuple[str, ...] = ()  # stage config fields this loss reads (beyond the family's)
    formula: str = ""


FAMILIES: dict[str, Family] = {
    "dpo": Family("trl:DPOTrainer", "trl:DPOConfig", "preference", True, ("rpo_alpha", "precompute_ref_log_probs")),
    "cpo": Family("trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig", "preference", False,
                  ("rpo_alpha", "label_smoothing")),
    "orpo": Family("trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig", "preference", False),
    "kto": Family("trl:KTOTrainer", "trl:KTOConfig", "kto", True,
                  ("precompute_ref_log_probs", "desirable_weight", "undesirable_weight")),
}

# Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)), log-probs summed over completion tokens.
LOSSES: dict[str, Loss] = {loss.name: loss for loss in [
    Loss("sigmoid", "dpo", {"loss_type": "sigmoid"}, formula="-log σ(β Δ)"),
    Loss("ipo", "dpo", {"loss_type": "ipo"}, formula="(Δ/|y| - 1/(2β))², log-ratios averaged per token"),
    Loss("hinge", "dpo", {"loss_type": "hinge"}, formula="max(0, 1 - β Δ)"),
    Loss("robust", "dpo", {"loss_type": "robust"}, ("label_smoothing",),
         formula="[-(1-ε) log σ(β Δ) + ε log σ(-β Δ)] / (1 - 2ε)"),
    Loss("simpo", "cpo", {"loss_type": "simpo"}, ("simpo_gamma",),
         formula="-log σ(β (avg log π(y_w) - avg log π(y_l)) - γ) (+ rpo_alpha · NLL)"),
    Loss("orpo", "orpo", {}, formula="NLL(y_w) - β log σ(log odds(y_w) - log odds(y_l)), avg token log-probs"),
    Loss("kto", "kto", {"loss_type": "kto"},
         formula="w_d (1 - σ(β(r_w - z))) | w_u (1 - σ(β(z - r_l))), z = clamp(KL estimate, 0)"),
]}

# Stage config fields that select or tune the objective (checked against what a loss reads).
LOSS_FIELDS = ("label_smoothing", "rpo_alpha", "simpo_gamma", "precompute_ref_log_probs",
               "desirable_weight", "undesirable_weight")


def valid_names() -> str:
    return ", ".join(sorted(LOSSES))


def get_loss(name: str) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {valid_names()}")
    return LOSSES[name]


def family(name: str) -> Family:
    return FAMILIES[get_loss(name).family]


def fields_used(name: str) -> set[str]:
    loss = get_loss(name)
    return {*FAMILIES[loss.family].uses, *loss.uses}


def check_fields(name: str, fields_set: set[str]) -> None:
    """ValueError when a field the loss ignores was set explicitly (a likely mistake)."""
    unused = sorted(f for f in fields_set & set(LOSS_FIELDS) if f not in fields_used(name))
    if unused:
        raise ValueError(f"{', '.join(unused)} has no effect with loss {name!r} "
                         f"(it reads: {', '.join(sorted(fields_used(name))) or 'beta only'})")


def trl_kwargs(config) -> dict:
    """The TRL config kwargs for a ``dpo`` stage config (its typed fields, nothing free-form)."""
    loss = get_loss(config.loss)
    kwargs: dict = {"beta": config.beta, **loss.trl}
    if loss.family == "dpo":
        kwargs["label_smoothing"] = config.label_smoothing
        kwargs["precompute_ref_log_probs"] = config.precompute_ref_log_probs
        if config.rpo_alpha:
            # RPO: the DPO term plus the NLL of the chosen answer, weighted (TRL's multi-loss form).
            kwargs["loss_type"] = [loss.trl["loss_type"], "sft"]
            kwargs["loss_weights"] = [1.0, float(config.rpo_alpha)]
        else:
            kwargs["loss_type"] = [loss.trl["loss_type"]]
    elif loss.family == "cpo":
        kwargs.update(simpo_gamma=config.simpo_gamma, label_smoothing=config.label_smoothing,
                      cpo_alpha=float(config.rpo_alpha or 0.0))
    elif loss.family == "kto":
        kwargs.update(precompute_ref_log_probs=config.precompute_ref_log_probs,
                      desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight)
    return kwargs


def _import(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def trainer_classes(family_name: str) -> tuple[type, type]:
    """(TRL trainer class, TRL config class) of a family."""
    fam = FAMILIES[family_name]
    return _import(fam.trainer), _import(fam.config)
