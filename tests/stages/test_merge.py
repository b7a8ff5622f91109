"""Adapter merges off the driver (a Ray task, in the base's dtype), and QLoRA's kbit preparation under ZeRO-3."""

from __future__ import annotations

import json
import os
import shutil

import torch

from stages.config import PeftConfig
from stages.models import (
    MERGE_MEMORY_FLOOR,
    UNKNOWN_WEIGHTS_BYTES,
    base_precision,
    base_weights_bytes,
    merge_memory_bytes,
    prepares_kbit_training,
)

GiB = 1024**3


def test_base_precision_reads_either_config_key():
    assert base_precision({"dtype": "bfloat16"}) == "bf16"
    assert base_precision({"torch_dtype": "float16"}) == "fp16"
    assert base_precision({"torch_dtype": "torch.bfloat16"}) == "bf16"
    assert base_precision({"text_config": {"dtype": "bfloat16"}}) == "bf16"
    assert base_precision({"dtype": "float32"}) == "fp32"
    assert base_precision({}) == "fp32"  # transformers' own default when the config names none


def test_merge_memory_estimate():
    assert merge_memory_bytes(16 * GiB) == 40 * GiB  # an 8B bf16 base: ~2.5x its weights
    assert merge_memory_bytes(1000) == MERGE_MEMORY_FLOOR
    assert merge_memory_bytes(None) == int(2.5 * UNKNOWN_WEIGHTS_BYTES)


def test_kbit_preparation_is_skipped_under_zero3():
    assert prepares_kbit_training("qlora", None)
    assert prepares_kbit_training("qlora", 2)
    assert not prepares_kbit_training("qlora", 3)
    assert not prepares_kbit_training("lora", None)
    assert not prepares_kbit_training("full", 3)


def test_qlora_under_zero3_loads_with_gradient_checkpointing(tiny_base):
    from peft import get_peft_model

    from stages.models import load_model, peft_config

    cfg = PeftConfig(method="qlora", r=4)
    model = load_model(tiny_base, cfg, "fp32", gradient_checkpointing=True, zero_stage=3)
    assert model.is_gradient_checkpointing
    model = get_peft_model(model, peft_config(cfg))
    model.train()
    ids = torch.tensor([[4, 10, 11, 12, 13]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_merge_runs_in_a_ray_task_in_the_base_dtype(ray_cluster, tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from stages.models import merge_adapter_in_ray

    base_dir = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(base_dir)
    for name in os.listdir(tiny_base):
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(tiny_base / name, base_dir / name)
    assert base_precision(json.loads((base_dir / "config.json").read_text())) == "bf16"
    assert base_weights_bytes(str(base_dir)) == (base_dir / "model.safetensors").stat().st_size

    # init_lora_weights=False: B is random, not zero, so the merge changes the weights
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16), lora)
    peft_model.save_pretrained(tmp_path / "adapter")
    for name in os.listdir(base_dir):
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(base_dir / name, tmp_path / "adapter" / name)

    info = merge_adapter_in_ray(tmp_path / "adapter", tmp_path / "merged", env_vars={"HF_HUB_OFFLINE": "1"})
    assert info["pid"] != os.getpid()  # not in this (the driver's) process
    assert info["precision"] == "bf16"
    assert not (tmp_path / "merged" / "adapter_config.json").exists()

    def tensors(path):
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    merged, base = tensors(tmp_path / "merged" / "model.safetensors"), tensors(base_dir / "model.safetensors")
    adapter = tensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert set(merged) == set(base)
    scaling = lora.lora_alpha / lora.r
    changed = 0
    for key, weight in base.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        if f"{prefix}.lora_A.weight" not in adapter:
            assert torch.equal(merged[key], weight), key
            continue
        delta = adapter[f"{prefix}.lora_B.weight"].float() @ adapter[f"{prefix}.lora_A.weight"].float() * scaling
        assert delta.abs().max() > 1e-2
        torch.testing.assert_close(merged[key].float(), weight.float() + delta, rtol=1e-2, atol=1e-2)
        changed += 1
    assert changed == 2 * json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]  # q_proj, v_proj
