"""The offline tiny base: a standard HF folder, a lossless per-character tokenizer, a tiny Llama."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.tiny_base import (
    IM_END,
    IM_START,
    UNICODE_PUNCTUATION,
    build_char_tokenizer,
    build_llama,
    build_tiny_base,
    pretraining_texts,
)

PROBE = "<|im_start|>user\n47+38=<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    """One tiny base with a few pretraining steps (exercises the Trainer path quickly)."""
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    metrics = build_tiny_base(out, pretrain_steps=4, pretrain_batch_size=4, seed=0)
    return out, metrics


def test_folder_is_a_standard_hf_model(built):
    out, metrics = built
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["head_dim"] == 32 and config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32" and config["use_cache"] is True
    assert not list(out.parent.glob(".tiny-llama.*")), "staging folder left behind"
    assert metrics["parameters"] > 100_000 and metrics["vocab_size"] == config["vocab_size"]
    assert metrics["pretrain_steps"] == 4 and len(metrics["pretrain_loss"]) >= 1
    assert metrics["final_loss"] == metrics["pretrain_loss"][-1]["loss"]


def test_special_ids_agree_between_tokenizer_and_configs(built):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out, _ = built
    tok = AutoTokenizer.from_pretrained(out)
    config, gen = AutoConfig.from_pretrained(out), GenerationConfig.from_pretrained(out)
    assert tok.eos_token == IM_END
    for cfg in (config, gen):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
        )
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


# A script run with plain Python outside the repo: proves the folder needs no rayalign import.
_PLAIN_LOAD = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, probe = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok(probe, return_tensors="pt", add_special_tokens=False).input_ids
with torch.no_grad():
    logits = model(ids).logits[0, -1].tolist()
chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
gen = model.generate(**chat, max_new_tokens=6, do_sample=False)
assert not any(m == "stages" or m.startswith("stages.") for m in sys.modules)
print(json.dumps({"logits": logits, "new_tokens": gen.shape[1] - chat["input_ids"].shape[1], "text": tok.decode(gen[0])}))
"""


def test_loads_and_generates_with_plain_transformers(built, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = built
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOAD, str(out), PROBE],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    assert 1 <= reply["new_tokens"] <= 6
    assert reply["text"].startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

    # Same weights, same logits: this process's load agrees with the independent one.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    ids = tok(PROBE, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    torch.testing.assert_close(logits, torch.tensor(reply["logits"]), rtol=1e-5, atol=1e-5)


def test_saved_model_has_the_same_logits_as_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "raw"
    metrics = build_tiny_base(out, pretrain_steps=0, seed=3)
    assert metrics["pretrain_loss"] == [] and metrics["final_loss"] is None
    tok = build_char_tokenizer()
    in_memory = build_llama(
        tok, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, max_position_embeddings=256, seed=3
    ).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.get_input_embeddings().weight.data_ptr() == reloaded.get_output_embeddings().weight.data_ptr()
    ids = tok(PROBE, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        torch.testing.assert_close(in_memory(ids).logits, reloaded(ids).logits)


def test_overwrite_false_refuses_an_existing_model(built):
    out, _ = built
    with pytest.raises(FileExistsError):
        build_tiny_base(out, pretrain_steps=0, overwrite=False)


def test_tokenizer_round_trips_text_exactly(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0])
    texts = [
        string.printable.replace("\x0b", "").replace("\x0c", ""),  # all but vertical tab / form feed
        "  two  spaces, a tab\tand\nnewlines\n\n",
        "Quotes “like this” — and … " + UNICODE_PUNCTUATION,
        "47+38=85",
        " leading and trailing ",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) == len(text)  # one token per character


def test_special_tokens_are_single_tokens_and_unknowns_map_to_unk(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0])
    text = f"{IM_START}user\nhi{IM_END}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(IM_START) and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + len("user\nhi")
    assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tok("x", add_special_tokens=True)["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]


def test_pretraining_corpus_is_deterministic_and_has_no_addition_answers():
    tok = build_char_tokenizer()
    texts = pretraining_texts(500, 0, tok)
    assert texts == pretraining_texts(500, 0, tok) and texts != pretraining_texts(500, 1, tok)
    assert all(t.startswith(IM_START) and t.rstrip().endswith(IM_END) for t in texts)
    import re

    assert not any(re.search(r"\d+\+\d+=", t) for t in texts)
