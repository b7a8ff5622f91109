"""Loading models and tokenizers for training: precision, PEFT (LoRA, QLoRA, DoRA, IA3,
prompt tuning) and turning an upstream LoRA adapter into a full model when a stage needs one.

Everything saved here is a plain Hugging Face folder (safetensors only).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from stages.config import PeftConfig

if TYPE_CHECKING:  # torch is imported where it is used: loading a config must not pull it in
    import torch

ADAPTER_CONFIG = "adapter_config.json"


# --------------------------------------------------------------------------- precision


def bf16_supported(use_gpu: bool) -> bool:
    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # CPUs without native bf16 (no AVX512-BF16/AMX) emulate it slowly; fp32 is the better choice there.
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"))
    except AttributeError:
        return False


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``auto`` -> bf16 where the hardware has it, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported(use_gpu) else "fp32"
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_dir: str | Path, chat_template: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from stages.chat_templates import apply_chat_template_choice

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    apply_chat_template_choice(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------- PEFT


def peft_config(cfg: PeftConfig, head: str = "lm"):
    """The ``peft`` config for a stage's ``peft`` section; None for full fine-tuning.

    ``head="reward"``: a sequence classifier, whose new ``score`` head is trained and saved in full.
    """
    if cfg.method == "full":
        return None
    config = _peft_config(cfg, "SEQ_CLS" if head == "reward" else "CAUSAL_LM")
    if head == "reward" and hasattr(config, "modules_to_save"):
        config.modules_to_save = sorted({*(config.modules_to_save or []), "score"})
    return config


def _peft_config(cfg: PeftConfig, task_type: str):
    import peft

    if cfg.method in ("lora", "qlora", "dora"):
        return peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            modules_to_save=cfg.modules_to_save,
            use_dora=cfg.method == "dora",
            task_type=task_type,
        )
    if cfg.method == "ia3":
        targets = None if cfg.target_modules == "all-linear" else cfg.target_modules
        return peft.IA3Config(target_modules=targets, feedforward_modules=[], task_type=task_type)
    if cfg.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task_type)
    raise ValueError(f"unknown peft method {cfg.method!r}")


def model_init_kwargs(cfg: PeftConfig, precision: str, trust_remote_code: bool) -> dict:
    """Keyword arguments for ``from_pretrained``: dtype, and the 4-bit NF4 base for QLoRA."""
    kwargs: dict = {"dtype": torch_dtype(precision), "trust_remote_code": trust_remote_code}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch_dtype("fp32" if precision == "fp32" else precision)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,
        )
    return kwargs


def load_model(model_dir: str | Path, cfg: PeftConfig, precision: str, *, head: str = "causal-lm",
               trust_remote_code: bool = False, gradient_checkpointing: bool = False):
    """Load a full model for training (the trainer applies the PEFT config itself)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = model_init_kwargs(cfg, precision, trust_remote_code)
    if head == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    elif head == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, **kwargs)
    else:
        raise ValueError(f"unknown model head {head!r}")
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


# --------------------------------------------------------------------------- adapters and merged models


def is_adapter(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).exists()


def adapter_base(model_dir: str | Path) -> str:
    return json.loads((Path(model_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its (unquantized) base and save a plain HF folder, written aside first."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    task_type = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("task_type")
    loader = AutoPeftModelForSequenceClassification if task_type == "SEQ_CLS" else AutoPeftModelForCausalLM
    extra = {"num_labels": 1} if task_type == "SEQ_CLS" else {}
    model = loader.from_pretrained(str(adapter_dir), dtype=torch_dtype("fp32"), trust_remote_code=trust_remote_code, **extra)
    model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def full_model_dir(artifact_path: Path, model_dir: Path, cache_root: Path) -> Path:
    """A folder holding full weights for an upstream output: its merged model if it has one,
    the folder itself if it is full, else the adapter merged once into ``cache_root``."""
    merged = artifact_path / "merged"
    if (merged / "config.json").exists():
        return merged
    if not is_adapter(model_dir):
        return model_dir
    target = cache_root / artifact_path.name
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        merge_adapter(model_dir, target)
    return target
