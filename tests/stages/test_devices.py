"""Engines' and actors' device and dtype: decided where the model runs (``stages.devices``)."""

from __future__ import annotations

import json

import torch

from stages.devices import checkpoint_dtype, inference_dtype, local_device


def test_auto_dtype_on_a_gpu_follows_the_checkpoint(tmp_path, monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for declared, expected in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.bfloat16)):
        (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": declared}))
        assert checkpoint_dtype(tmp_path) == declared
        assert inference_dtype("auto", cuda, tmp_path) == expected, declared
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100: no bf16
    assert inference_dtype("auto", cuda, tmp_path) == torch.float16
    # On the CPU: fp32 whatever the checkpoint; an explicit name always wins.
    assert inference_dtype("auto", torch.device("cpu"), tmp_path) == torch.float32
    assert inference_dtype("bfloat16", torch.device("cpu"), tmp_path) == torch.bfloat16


def test_local_device_is_the_gpu_this_process_sees(monkeypatch):
    assert local_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert local_device() == torch.device("cuda", 3)
