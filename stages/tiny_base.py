"""An offline tiny base model: a per-character tokenizer and a small Llama, built on this machine.

Usage::

    from stages.tiny_base import build_tiny_base

    metrics = build_tiny_base(Path("models/tiny-llama"))              # ~200 pretraining steps
    metrics = build_tiny_base(Path("models/tiny-raw"), pretrain_steps=0)  # random init only

The folder is a standard HF model folder (``model.safetensors``, ``config.json``,
``generation_config.json``, tokenizer files with the chatml chat template) and loads with plain
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``: no rayalign import
and no model hub are needed.

Tokenizer: WordLevel over single characters (printable ASCII, newline, tab, carriage return and
some common unicode punctuation; anything else is ``<unk>``), a pre-tokenizer that isolates every
character and a ``Fuse`` decoder, so ``decode(encode(text)) == text`` for covered text. Special
tokens ``<pad>``, ``<s>``, ``</s>``, ``<unk>``, ``<|im_start|>`` and ``<|im_end|>`` are single
tokens; the eos is ``<|im_end|>`` so that generation stops at the end of an assistant turn. No bos
is added on encode.

Variants (``VARIANTS``, by builtin name): ``tiny-llama``, and ``tiny-llama-bias``, the same model
with biases in every attention and MLP projection (``attention_bias``/``mlp_bias``), for BitFit;
``tiny-llama-4m`` and ``tiny-llama-4m-bias``, the same recipe 8x larger (4.2M parameters).

Model: ``LlamaForCausalLM`` with 4 heads of size 32 (vLLM's CPU attention kernels take it), tied
embeddings, float32. Four heads rather than two of size 64 is what lets the model learn 2-digit
addition in a few hundred steps (measured: SFT loss 0.14 vs 0.77 after 700 steps, same budget).

Pretraining corpus (``pretrain_steps > 0``): chatml conversations, generated from ``seed``, of
  * echo: the user sends a random string of characters, the assistant repeats it;
  * count: ``count from 37`` -> ``37 38 39 40 41`` (digits in sequence, numbers up to 3 digits);
  * upper: ``upper: hello there`` -> ``HELLO THERE``;
  * some conversations start with a short system message.
It teaches the character vocabulary, number writing and the chat format (including ending a turn
with ``<|im_end|>``), but never shows an ``a+b=`` problem with its sum, so the base's accuracy on the
built-in addition task stays near zero and the gain from SFT is visible. Loss is on every token.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stages.chat_templates import TEMPLATES

PAD, BOS, EOS_DOC, UNK = "<pad>", "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS, EOS_DOC, UNK, IM_START, IM_END)  # ids 0..5 in this order

# Builtin base name -> its build_tiny_base options (stages.pretrained.BUILTIN_BASES holds their recipe versions).
# The 4m pair (4.2M parameters: hidden 256, 4 layers, 8 heads of 32, MLP 1024; same tokenizer and corpus): the
# base of benchmarks/compare_methods.py. There LoRA's loss tracks full fine-tuning's (1.41 vs 1.38 after 80
# steps), but 500 steps still leave both far from learning addition (4.3% vs 7.8% held out; benchmarks/README.md).
_FOUR_M = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "intermediate_size": 1024}
VARIANTS: dict[str, dict] = {"tiny-llama": {}, "tiny-llama-bias": {"bias": True},
                             "tiny-llama-4m": _FOUR_M, "tiny-llama-4m-bias": {**_FOUR_M, "bias": True}}

# Unicode punctuation that shows up in ordinary English text (quotes, dashes, ellipsis, ...).
UNICODE_PUNCTUATION = "…–—‘’“”«»•·°€£×÷"


def character_vocabulary() -> list[str]:
    """The tokens in id order: special tokens, printable ASCII, newline, tab, CR, unicode punctuation."""
    ascii_printable = [chr(i) for i in range(32, 127)]
    # "\r" so that text with Windows line endings still round-trips.
    return [*SPECIAL_TOKENS, *ascii_printable, "\n", "\t", "\r", *UNICODE_PUNCTUATION]


def build_char_tokenizer(chat_template: str | None = None, model_max_length: int = 256):
    """A ``PreTrainedTokenizerFast`` with one token per character; chatml template unless given another."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(character_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # `[\s\S]` rather than `.` so newlines are isolated too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Without a decoder `tokenizers` joins tokens with spaces; Fuse concatenates them as they are.
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        unk_token=UNK,
        # Cleanup would turn "a ." into "a." and break exact round trips.
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = chat_template or TEMPLATES["chatml"]
    return tokenizer


def build_llama(
    tokenizer,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int,
    bias: bool = False,
):
    """A randomly initialised float32 ``LlamaForCausalLM`` matched to ``tokenizer``'s special ids;
    ``bias``: biases in the attention and MLP projections."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, set_seed

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        attention_bias=bias,
        mlp_bias=bias,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    set_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


# --- pretraining corpus -------------------------------------------------------------------

_ECHO_CHARS = string.ascii_letters + string.digits + " .,!?-:;'()"
_WORDS = (
    "the a cat dog sun moon tree river stone bird house road light small big red blue green "
    "quick slow happy old new day night water fire wind cloud star".split()
)
_SYSTEMS = ("You are a helpful assistant.", "Answer briefly.", "You are a tiny model.")


def _conversation(rng: random.Random) -> list[dict]:
    kind = rng.choice(("echo", "count", "upper"))
    if kind == "echo":
        text = "".join(rng.choice(_ECHO_CHARS) for _ in range(rng.randint(1, 24))).strip() or "ok"
        user, assistant = text, text
    elif kind == "count":
        start, n = rng.randint(0, 990), rng.randint(3, 7)
        user, assistant = f"count from {start}", " ".join(str(start + i) for i in range(n))
    else:
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
        user, assistant = f"upper: {text}", text.upper()
    messages = [{"role": "system", "content": rng.choice(_SYSTEMS)}] if rng.random() < 0.25 else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def pretraining_texts(n: int, seed: int, tokenizer) -> list[str]:
    """``n`` chatml-rendered pretraining conversations (see the module docstring); no addition answers."""
    rng = random.Random(f"tiny-base-pretrain-{seed}")
    return [tokenizer.apply_chat_template(_conversation(rng), tokenize=False) for _ in range(n)]


def pretrain(
    model,
    tokenizer,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    work_dir: Path,
) -> list[dict]:
    """Train ``model`` in place with the HF ``Trainer`` on CPU; returns the logged loss curve."""
    from transformers import DataCollatorForLanguageModeling, PrinterCallback, Trainer, TrainingArguments

    texts = pretraining_texts(steps * batch_size, seed, tokenizer)
    rows = [{"input_ids": ids} for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.remove_callback(PrinterCallback)  # the curve is returned; keep builds quiet
    trainer.train()
    model.config.use_cache = True  # Trainer turns the KV cache off for training; generation wants it
    return [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]


# --- the builder --------------------------------------------------------------------------


def build_tiny_base(
    out_dir: Path,
    *,
    name: str = "tiny-llama",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    bias: bool = False,
    pretrain_steps: int = 200,
    pretrain_batch_size: int = 16,
    pretrain_learning_rate: float = 2e-3,
    seed: int = 0,
    overwrite: bool = True,
    torch_threads: int | None = None,
) -> dict:
    """Build the tiny base into ``out_dir`` (a standard HF folder) and return its metrics.

    The files are written to a temporary sibling folder and moved into place at the end, so a crash
    never leaves a half-written model behind; other files already in ``out_dir`` are kept.
    ``bias``: the ``tiny-llama-bias`` variant (see ``VARIANTS``). ``overwrite=False`` refuses to replace a model already in ``out_dir``. ``torch_threads`` sets
    torch's intra-op threads for the pretraining only (restored afterwards); ``1`` keeps the build
    fast when other processes share the cores (2 spinning threads ran ~10x slower there).
    Returns ``{"name", "out_dir", "parameters", "vocab_size", "pretrain_steps", "pretrain_loss"
    (list of {"step", "loss"}), "final_loss", "build_seconds"}``; the same dict, minus the
    path, is saved as ``build_info.json`` in the folder for provenance.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a model and overwrite=False")
    started = time.monotonic()
    tokenizer = build_char_tokenizer(model_max_length=max_position_embeddings)
    model = build_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings, seed=seed,
                        bias=bias)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        curve = []
        if pretrain_steps > 0:
            with _intra_op_threads(torch_threads):
                curve = pretrain(model, tokenizer, steps=pretrain_steps, batch_size=pretrain_batch_size,
                                 learning_rate=pretrain_learning_rate, seed=seed, work_dir=staging / "_trainer")
            shutil.rmtree(staging / "_trainer", ignore_errors=True)
        model.eval()
        metrics = {
            "name": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "pretrain_steps": pretrain_steps,
            "pretrain_loss": curve,
            "final_loss": curve[-1]["loss"] if curve else None,
            "build_seconds": round(time.monotonic() - started, 2),
        }
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "build_info.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**metrics, "out_dir": str(out_dir)}


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    import torch

    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    # A missing folder is renamed into place in one step; an existing one (a stage's output folder may
    # be created, and hold other files, before the build) gets the built files replaced one by one.
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    for path in staging.iterdir():
        target = out_dir / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()
