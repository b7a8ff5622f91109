"""Prompt tuning with text initialisation and prefix tuning with peft's reparameterisation MLP (issue 17), in this
process (no Ray) on the tiny base: exact trainable counts, and real SFT runs through the worker's code whose saved
adapters reload with plain peft to the logits the worker recorded."""

from __future__ import annotations

import json

import pytest
import torch

from stages.config import PeftConfig
from stages.models import load_model, peft_config

# The tiny base's shape (stages.tiny_base defaults): hidden 128, 2 layers, 4 heads = 4 key/value heads of 32.
HIDDEN, LAYERS, KV_WIDTH = 128, 2, 128


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prefix_parameters(tokens: int, encoder: int, layers: int = LAYERS, kv: int = KV_WIDTH) -> int:
    """peft's PrefixEncoder with prefix_projection: Embedding(tokens, kv), Linear(kv, encoder), tanh,
    Linear(encoder, layers * 2 * kv) (a key and a value per layer), both linears with bias."""
    return tokens * kv + (kv * encoder + encoder) + (encoder * layers * 2 * kv + layers * 2 * kv)


def test_prompt_tuning_from_text_starts_at_the_texts_token_embeddings(tiny_base):
    from peft import get_peft_model
    from transformers import AutoTokenizer

    cfg = PeftConfig(method="prompt_tuning", num_virtual_tokens=12, prompt_init_text="add the numbers")
    model = get_peft_model(load_model(tiny_base, cfg, "fp32"), peft_config(cfg, model_dir=tiny_base))
    assert trainable(model) == 12 * HIDDEN == 1536  # num_virtual_tokens x hidden, nothing else
    token_ids = AutoTokenizer.from_pretrained(str(tiny_base))("add the numbers").input_ids  # 15 characters
    assert len(token_ids) > 12  # cut to num_virtual_tokens (a shorter text repeats)
    words = model.get_input_embeddings().weight[token_ids[:12]]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight.detach(), words)
    random = get_peft_model(load_model(tiny_base, cfg, "fp32"),
                            peft_config(PeftConfig(method="prompt_tuning", num_virtual_tokens=12)))
    assert not torch.equal(random.prompt_encoder["default"].embedding.weight.detach(), words)


def test_prefix_tuning_trains_the_reparameterisation_mlp(tiny_base):
    from peft import get_peft_model

    cfg = PeftConfig(method="prefix_tuning", num_virtual_tokens=8, encoder_hidden_size=32)
    model = get_peft_model(load_model(tiny_base, cfg, "fp32"), peft_config(cfg))
    names = {n.removeprefix("prompt_encoder.default.") for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                     "transform.2.bias"}
    assert trainable(model) == prefix_parameters(8, 32) == 22048
    # Without the MLP the prefix is learned directly: tokens x layers x 2 x kv.
    direct = PeftConfig(method="prefix_tuning", num_virtual_tokens=8, prefix_projection=False)
    direct_model = get_peft_model(load_model(tiny_base, direct, "fp32"), peft_config(direct))
    assert trainable(direct_model) == 8 * LAYERS * 2 * KV_WIDTH
    # Default encoder width: the key/value width (peft's default).
    default = PeftConfig(method="prefix_tuning", num_virtual_tokens=8)
    assert trainable(get_peft_model(load_model(tiny_base, default, "fp32"), peft_config(default))) == \
        prefix_parameters(8, KV_WIDTH)


@pytest.mark.parametrize(("peft", "expected_trainable"), [
    ({"method": "prompt_tuning", "num_virtual_tokens": 16, "prompt_init_text": "Q: 12+34= A: 46"}, 16 * HIDDEN),
    ({"method": "prefix_tuning", "num_virtual_tokens": 8, "encoder_hidden_size": 32}, prefix_parameters(8, 32)),
])
def test_sft_with_virtual_tokens_learns_and_reloads_with_plain_peft(tiny_base, tmp_path, peft, expected_trainable):
    """The TRL path every stage worker takes (training_arguments, load_model, the trainer applying peft,
    train_and_save), without Ray: the loss falls, the count is exact, and the saved adapter, loaded with plain
    peft on the base, computes the logits the worker recorded for its trained model."""
    from datasets import Dataset
    from peft import AutoPeftModelForCausalLM
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from stages.job import WorkerJob
    from stages.launcher import TRAIN_LOG
    from stages.models import load_tokenizer
    from stages.sft import SFTConfig
    from stages.tasks import get_task
    from stages.worker import PROBE_TEXT, train_and_save, training_arguments

    config = SFTConfig(data="builtin:addition", peft=peft, train={
        "max_steps": 30, "batch_size": 8, "lr": 3e-2, "max_length": 64, "logging_steps": 1,
        "lr_schedule": "constant"})
    job = WorkerJob(stage="sft", work_dir=str(tmp_path), model_dir=str(tmp_path / "model"),
                    model_source=str(tiny_base), precision="fp32", threads=1, report_to="none")
    tokenizer = load_tokenizer(tiny_base)
    records = get_task("addition").load("sft", "train", 64).records
    rows = [{"messages": [m.to_dict() for m in r.messages]} for r in records]
    trainer = SFTTrainer(model=load_model(tiny_base, config.peft, "fp32"),
                         args=training_arguments(TRLSFTConfig, job, config), train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config(config.peft, model_dir=tiny_base))
    train_and_save(trainer, job, config)

    log = json.loads((tmp_path / TRAIN_LOG).read_text())
    assert log["model_summary"]["trainable_params"] == expected_trainable
    losses = [e["loss"] for e in log["log_history"] if "loss" in e]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # Mean of the first 3 logged losses -> of the last 3 of 30, measured: prompt tuning 2.93 -> 2.28, prefix
    # tuning 3.38 -> 1.88 (its step 3 spikes to 5.3 at this lr, then recovers). Asserted: at least 0.4 lower.
    assert last < first - 0.4, losses
    saved = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft["method"].upper() and saved["num_virtual_tokens"] == peft["num_virtual_tokens"]
    assert not list((tmp_path / "model").glob("*.bin"))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "model"), use_safetensors=True)
    reloaded.eval()
    with torch.no_grad():
        last_logits = reloaded(input_ids=tokenizer(PROBE_TEXT, return_tensors="pt").input_ids).logits[0, -1]
    assert torch.allclose(last_logits, torch.tensor(log["probe"]["logits"]), atol=1e-5)


@pytest.mark.parametrize(("values", "message"), [
    ({"method": "lora", "num_virtual_tokens": 8}, "peft.num_virtual_tokens applies to prompt_tuning and "
                                                  "prefix_tuning, not 'lora'"),
    ({"method": "prefix_tuning", "prompt_init_text": "hi"}, "peft.prompt_init_text applies to prompt_tuning, not "
                                                           "'prefix_tuning' \\(a prefix is keys and values"),
    ({"method": "prompt_tuning", "prompt_init_text": ""}, "prompt_init_text: String should have at least 1 character"),
    ({"method": "prompt_tuning", "prefix_projection": False}, "peft.prefix_projection applies to prefix_tuning, "
                                                              "not 'prompt_tuning'"),
    ({"method": "prefix_tuning", "prefix_projection": False, "encoder_hidden_size": 64},
     "peft.encoder_hidden_size is the width of prefix_tuning's reparameterisation MLP: it needs method "
     "prefix_tuning with prefix_projection true"),
    ({"method": "prefix_tuning", "encoder_hidden_size": 0}, "encoder_hidden_size: Input should be greater than or "
                                                           "equal to 1"),
])
def test_bad_virtual_token_options_fail_config_validation(values, message):
    from pipeline.spec import SpecError, parse_spec

    raw = {"name": "t", "stages": {"sft": {"data": "builtin:addition", "peft": values}}}
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


@pytest.mark.parametrize("method", ["full", "lora", "prompt_tuning", "prefix_tuning", "adapter"])
def test_a_dumped_peft_section_validates_back(method):
    """Sweep trials and Ray workers validate a config's full dump (every default written) back: a method's
    options at their defaults must not read as options given to another method."""
    from stages.config import PeftConfig

    config = PeftConfig(method=method)
    assert PeftConfig.model_validate(config.model_dump()) == config
