"""Adaptation methods beyond what a peft config expresses: BitFit, and saving PiSSA/OLoRA adapters
so that they load on the original base.

BitFit (``peft.method: bitfit``) trains only the biases: peft has no BitFit tuner, and it is
three lines of ``requires_grad`` (freeze everything, unfreeze the ``*.bias`` parameters), so it is
written here. The output is the full model, saved as a plain transformers folder.

PiSSA and OLoRA (``peft.init``) move the principal part of each target weight into the adapter and
leave the residual in the base: an adapter saved as it is only works on that residual base. peft
converts it into a plain LoRA adapter (rank 2r) for the original base when ``save_pretrained`` gets
the adapter as it was before training (``path_initial_model_for_weight_conversion``)::

    initial = save_initial_adapter(peft_model, work_dir)    # after get_peft_model, before training
    ...train...
    save_converted_adapter(peft_model, model_dir, initial)  # loads with plain peft on the original base
"""

from __future__ import annotations

from pathlib import Path

from stages.config import PeftConfig

# The folder name of the untrained PiSSA/OLoRA adapter (peft loads it as an adapter of this name).
INITIAL_ADAPTER = "initial_adapter"


def lora_init(cfg: PeftConfig) -> bool | str:
    """peft's ``init_lora_weights`` for ``peft.init``: True (B = 0, the default), ``pissa`` or ``olora``."""
    return True if cfg.init == "default" else cfg.init


def converts_on_save(cfg: PeftConfig) -> bool:
    """Whether the adapter must be converted for the original base when it is saved (PiSSA, OLoRA)."""
    return cfg.method in ("lora", "qlora") and cfg.init != "default"


# --------------------------------------------------------------------------- BitFit


def bias_names(names) -> list[str]:
    """The parameter names BitFit trains: those of ``*.bias`` parameters."""
    return [n for n in names if n == "bias" or n.endswith(".bias")]


def bitfit_problem(names, where: str = "the model") -> str | None:
    """Why BitFit cannot train a model with these parameter names (None: it can)."""
    if bias_names(names):
        return None
    return (f"peft.method bitfit trains only biases, and {where} has none; use a base with biases "
            "(builtin:tiny-llama-bias, or a model whose linear layers have bias=True) or another method")


def apply_bitfit(model, also_train: tuple[str, ...] = ()):
    """Freeze every parameter except the biases (and the modules named in ``also_train``, e.g. a reward
    model's new ``score`` head); fails before training when the model has no biases."""
    names = [n for n, _ in model.named_parameters()]
    if problem := bitfit_problem(names, type(model).__name__):
        raise ValueError(problem)
    keep = set(bias_names(names))
    for module in also_train:
        keep.update(n for n in names if n.startswith(f"{module}.") or f".{module}." in n)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return model


# --------------------------------------------------------------------------- PiSSA / OLoRA


def save_initial_adapter(model, work_dir: str | Path) -> Path:
    """Save a PiSSA/OLoRA peft model's untrained adapter (call it before training); returns its folder."""
    folder = Path(work_dir) / INITIAL_ADAPTER
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def save_converted_adapter(model, out_dir: str | Path, initial: str | Path) -> None:
    """Save a trained PiSSA/OLoRA peft model as a plain LoRA adapter of the original base (rank 2r)."""
    model.save_pretrained(str(out_dir), safe_serialization=True,
                          path_initial_model_for_weight_conversion=str(initial))
