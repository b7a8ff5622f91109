"""Loading models and tokenizers for training: precision, PEFT (LoRA with rsLoRA and PiSSA/OLoRA
init, 4- or 8-bit QLoRA, DoRA, IA3, prompt tuning (random or text init), prefix tuning (with peft's
reparameterisation MLP); BitFit in ``stages.adaptation``) and turning an upstream LoRA adapter into a
full model when a stage needs one.

Everything saved here is a plain Hugging Face folder (safetensors only).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from stages.config import PeftConfig

if TYPE_CHECKING:  # torch is imported where it is used: loading a config must not pull it in
    import torch

ADAPTER_CONFIG = "adapter_config.json"
# A manifest's model_type -> the config file and the weights its model folder holds (None: any *.safetensors).
# The bottleneck names are stages.bottleneck_adapter's CONFIG_NAME and WEIGHTS_NAME (spelled out: that module
# imports torch, this table is read without it).
MODEL_FILES: dict[str, tuple[str, list[str] | None]] = {
    "full": ("config.json", None),
    "adapter": (ADAPTER_CONFIG, ["adapter_model.safetensors"]),
    "bottleneck-adapter": ("bottleneck_adapter.json", ["bottleneck_adapter.safetensors"]),
}


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


def peft_config(cfg: PeftConfig, head: str = "lm", model_dir: str | Path | None = None):
    """The ``peft`` config for a stage's ``peft`` section; None for full fine-tuning, BitFit and bottleneck
    adapters (no peft tuner: :func:`load_model` freezes all but the biases, or adds the adapters).

    ``head="reward"``: a sequence classifier, whose new ``score`` head is trained and saved in full.
    ``model_dir``: the model the stage starts from; prompt tuning's ``prompt_init_text`` is tokenized with its
    tokenizer (peft loads it by this path).
    """
    if cfg.method in ("full", "bitfit", "adapter"):
        return None
    config = _peft_config(cfg, "SEQ_CLS" if head == "reward" else "CAUSAL_LM", model_dir)
    if head == "reward" and hasattr(config, "modules_to_save"):
        config.modules_to_save = sorted({*(config.modules_to_save or []), "score"})
    return config


def _peft_config(cfg: PeftConfig, task_type: str, model_dir: str | Path | None = None):
    import peft

    from stages.adaptation import lora_init

    if cfg.method in ("lora", "qlora", "dora"):
        return peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            modules_to_save=cfg.modules_to_save,
            use_dora=cfg.method == "dora",
            use_rslora=cfg.use_rslora,
            init_lora_weights=lora_init(cfg),
            task_type=task_type,
        )
    if cfg.method == "ia3":
        targets = None if cfg.target_modules == "all-linear" else cfg.target_modules
        return peft.IA3Config(target_modules=targets, feedforward_modules=[], task_type=task_type)
    if cfg.method == "prompt_tuning":
        if cfg.prompt_init_text is None:
            return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task_type)
        if model_dir is None:
            raise ValueError("peft.prompt_init_text needs the starting model's tokenizer: pass model_dir")
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task_type,
                                       prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                       prompt_tuning_init_text=cfg.prompt_init_text,
                                       tokenizer_name_or_path=str(model_dir))
    if cfg.method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task_type,
                                       prefix_projection=cfg.prefix_projection,
                                       encoder_hidden_size=cfg.encoder_hidden_size)
    raise ValueError(f"unknown peft method {cfg.method!r}")


def model_init_kwargs(cfg: PeftConfig, precision: str, trust_remote_code: bool) -> dict:
    """Keyword arguments for ``from_pretrained``: dtype, and the quantized base for QLoRA."""
    # use_safetensors: a .bin (pickle) checkpoint is refused, never unpickled.
    kwargs: dict = {"dtype": torch_dtype(precision), "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg.quant_bits, precision)
    return kwargs


def quantization_config(bits: int, precision: str):
    """QLoRA's frozen base: 4-bit NF4 with double quantisation (computing and stored in the training
    dtype), or 8-bit LLM.int8 (``peft.quant_bits: 8``)."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch_dtype(precision)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


def without_cpu_repacking(model):
    """Keep bitsandbytes' 4-bit layers on one CPU kernel. bitsandbytes 0.50 repacks a 4-bit weight in place
    for its avx512-bf16 CPU kernel at the first eval-mode forward without gradients, and later train-mode
    forwards read the repacked weight with the generic kernel: measured 0.22 off in logits, and PPO's
    engine and trainer disagreeing by 0.1-0.2 in log-probs. GPUs never take that path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def keep_trainable_in_precision(model, precision: str) -> int:
    """Cast a QLoRA model's trainable weights back to the stage's precision; returns how many were cast.
    TRL's trainers cast them to bf16 whatever the training precision (the QLoRA paper's choice), and a
    reward model's ``score`` head, a plain Linear fed fp32 hidden states, then fails in fp32 training."""
    dtype, cast = torch_dtype(precision), 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def prepares_kbit_training(method: str, zero_stage: int | None) -> bool:
    """Whether ``load_model`` runs peft's ``prepare_model_for_kbit_training``: for QLoRA, except under
    ZeRO-3. There the weights are partitioned as they load, and the fp32 upcast of every non-quantized
    parameter it does breaks (and undoes) the partitioning; peft's "DeepSpeed ZeRO-3 + QLoRA" guide
    leaves it out (gradient checkpointing is then enabled directly)."""
    return method == "qlora" and zero_stage != 3


def load_model(model_dir: str | Path, cfg: PeftConfig, precision: str, *, head: str = "causal-lm",
               trust_remote_code: bool = False, gradient_checkpointing: bool = False,
               zero_stage: int | None = None):
    """Load a full model for training (the trainer applies the PEFT config itself; BitFit's freezing and the
    bottleneck adapters are done here). ``zero_stage``: the stage's ``deepspeed.zero_stage`` (None: no DeepSpeed)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from stages.adaptation import apply_bitfit, converts_on_save

    if converts_on_save(cfg) and zero_stage == 3:  # the untrained adapter is saved before training, unsharded
        raise ValueError(f"peft.init {cfg.init!r} does not combine with deepspeed.zero_stage 3 here; "
                         "use zero_stage 2 (or none), or init default")
    kwargs = model_init_kwargs(cfg, precision, trust_remote_code)
    if head == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    elif head == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, **kwargs)
    else:
        raise ValueError(f"unknown model head {head!r}")
    if cfg.method == "qlora":
        without_cpu_repacking(model)
    if prepares_kbit_training(cfg.method, zero_stage):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif cfg.method == "qlora" and gradient_checkpointing:  # ZeRO-3: what the skipped call would enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.method == "bitfit":
        apply_bitfit(model, tuple(cfg.modules_to_save or ()) + (("score",) if head == "reward" else ()))
    if cfg.method == "adapter":
        from stages.bottleneck_adapter import add_adapters

        model.requires_grad_(False)
        add_adapters(model, cfg.adapter_size, cfg.adapter_activation)  # new modules: trainable
    if cfg.method in ("bitfit", "adapter") and gradient_checkpointing:  # the frozen embedding's output must
        model.enable_input_require_grads()                               # still carry gradients
    return model


# --------------------------------------------------------------------------- adapters and merged models


def is_adapter(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_CONFIG).exists()


def model_type_of(model_dir: str | Path) -> str:
    """What a saved model folder holds, as manifests record it: a peft ``adapter``, a
    ``bottleneck-adapter`` (``stages.bottleneck_adapter``) or ``full`` weights (:data:`MODEL_FILES`)."""
    for model_type, (config, _) in MODEL_FILES.items():
        if model_type != "full" and (Path(model_dir) / config).exists():
            return model_type
    return "full"


def adapter_base(model_dir: str | Path) -> str:
    return json.loads((Path(model_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


# Merges run where the memory is declared: a Ray task sized from the base's weights (a merge on the
# driver -- a KubeRay head -- once OOM-killed it for an 8B model). In the base's own dtype: an fp32
# merge doubles the memory and writes a twice-as-large fp32 folder.
#
# Who needs a merged folder at all: a stage that trains from an upstream adapter (full weights to
# start from), and ``merge: true``. Consumers that could take the adapter directly instead, without a
# merge: vLLM (``enable_lora`` + ``LoRARequest``, as the rollout engines already do for PPO weight
# sync; not for adapters with ``modules_to_save``), peft (``AutoPeftModelForCausalLM`` on the adapter
# folder, e.g. an eval engine or the DPO reference), and training stages that would stack a new
# adapter on ``base + adapter`` (peft ``PeftModel.from_pretrained(...).merge_and_unload()`` in the
# worker, still one merge per worker). Not done yet: every upstream adapter is merged once and cached.
MERGE_MEMORY_FACTOR = 2.5  # base weights + merged copy being written + slack
MERGE_MEMORY_FLOOR = 2 * 1024**3
UNKNOWN_WEIGHTS_BYTES = 5 * 1024**3  # a hub base not in the local cache: assume one 5 GB shard's worth
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
               "fp32": "fp32", "half": "fp16", "float": "fp32"}


def _base_file(base: str, filename: str) -> Path | None:
    """A file of the base (a local folder, or a hub id already in the local cache); None when absent."""
    if Path(base).is_dir():
        path = Path(base) / filename
        return path if path.exists() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base, filename)
    except Exception:  # noqa: BLE001 - not a repo id, no cache: unknown
        return None
    return Path(found) if isinstance(found, str) else None


def base_precision(base_config: dict) -> str:
    """``bf16``/``fp16``/``fp32`` from a config.json (``dtype`` in transformers 5, ``torch_dtype`` before);
    fp32 when it names none (transformers' own default)."""
    value = base_config.get("dtype") or base_config.get("torch_dtype")
    text_config = base_config.get("text_config")
    if value is None and isinstance(text_config, dict):
        value = text_config.get("dtype") or text_config.get("torch_dtype")
    return DTYPE_NAMES.get(str(value).removeprefix("torch."), "fp32")


def merge_precision(adapter_dir: str | Path) -> str:
    config = _base_file(adapter_base(adapter_dir), "config.json")
    return base_precision(json.loads(config.read_text())) if config else "fp32"


def base_weights_bytes(base: str) -> int | None:
    """Bytes of the base's weights: its safetensors (else .bin) files, or the hub index's total size."""
    if Path(base).is_dir():
        files = list(Path(base).glob("*.safetensors")) or list(Path(base).glob("*.bin"))
        return sum(f.stat().st_size for f in files) or None
    index = _base_file(base, "model.safetensors.index.json")
    if index is not None:
        return int(json.loads(index.read_text()).get("metadata", {}).get("total_size", 0)) or None
    single = _base_file(base, "model.safetensors")
    return single.stat().st_size if single is not None else None


def merge_memory_bytes(weights_bytes: int | None) -> int:
    """Memory to declare for a merge task: ~2.5x the base's weights, at least the floor."""
    weights = UNKNOWN_WEIGHTS_BYTES if weights_bytes is None else weights_bytes
    return max(MERGE_MEMORY_FLOOR, int(MERGE_MEMORY_FACTOR * weights))


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its (unquantized) base in this process, in the base's dtype, and save
    a plain HF folder, written aside and renamed into place. Use :func:`merge_adapter_in_ray` from a driver."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    task_type = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get("task_type")
    loader = AutoPeftModelForSequenceClassification if task_type == "SEQ_CLS" else AutoPeftModelForCausalLM
    extra = {"num_labels": 1} if task_type == "SEQ_CLS" else {}
    model = loader.from_pretrained(str(adapter_dir), dtype=torch_dtype(merge_precision(adapter_dir)),
                                   low_cpu_mem_usage=True, trust_remote_code=trust_remote_code,
                                   use_safetensors=True, **extra)
    model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    del model
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def _merge_task(adapter_dir: str, out_dir: str, trust_remote_code: bool) -> dict:
    import socket

    from stages.log import configure

    configure()  # before peft / transformers are imported (quiet mode quiets their import-time notices)

    merge_adapter(adapter_dir, out_dir, trust_remote_code)
    return {"out_dir": out_dir, "pid": os.getpid(), "host": socket.gethostname(),
            "precision": merge_precision(adapter_dir)}


def merge_adapter_in_ray(adapter_dir: str | Path, out_dir: str | Path, trust_remote_code: bool = False, *,
                         env_vars: dict[str, str] | None = None) -> dict:
    """:func:`merge_adapter` in a Ray task (1 CPU, ``memory`` from the base's size) on a connected Ray;
    returns where it ran (``pid``, ``host``), ``precision`` and ``out_dir``. ``out_dir`` must be on
    storage the task's node sees (the run's storage is shared by every node)."""
    import ray

    memory = merge_memory_bytes(base_weights_bytes(adapter_base(adapter_dir)))
    largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest and memory > largest:  # infeasible would wait forever; the largest node may still fit it
        memory = int(largest)
    options: dict = {"num_cpus": 1, "memory": memory, "max_retries": 0}
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    task = ray.remote(_merge_task).options(**options)
    return ray.get(task.remote(str(adapter_dir), str(out_dir), trust_remote_code))


def full_model_dir(artifact_path: Path, model_dir: Path, cache_root: Path,
                   merge: Callable[[Path, Path], object] | None = None) -> Path:
    """A folder holding full weights for an upstream output: its merged model if it has one,
    the folder itself if it is full, else the adapter merged once into ``cache_root``
    (``merge(adapter, target)``: :func:`merge_adapter` in this process by default)."""
    merged = artifact_path / "merged"
    if (merged / "config.json").exists():
        return merged
    if not is_adapter(model_dir):
        return model_dir
    target = cache_root / artifact_path.name
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        (merge or merge_adapter)(model_dir, target)
    return target
