"""Each named preference loss, checked against its formula computed by hand in plain torch.

No Ray: the stage's own pieces (``trl_kwargs``, ``trainer_classes``, ``build_trainer``) build an
in-process TRL trainer on a tiny random Llama; one batch from its dataloader goes through the
trainer's ``compute_loss`` and, independently, through copies of the policy and reference models
taken before the trainer saw them (plain forward, log_softmax, gather, the paper's formula).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.spec import SpecError, parse_spec

from stages.dpo import DPOConfig
from stages import preference_losses
from stages.dpo import build_trainer

PROBLEMS = [(12, 34, 46, 36), (47, 38, 85, 75), (20, 51, 71, 81), (19, 19, 38, 28)]


@pytest.fixture(scope="module")
def tiny():
    from stages.tiny_base import build_char_tokenizer, build_llama

    tokenizer = build_char_tokenizer()
    reference = build_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            max_position_embeddings=128, seed=0)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy that differs from its reference, so every log-ratio is non-zero
        generator = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return tokenizer, policy, reference


def pairs_dataset():
    from datasets import Dataset

    rows = [{"prompt": [{"role": "user", "content": f"{a}+{b}="}],
             "chosen": [{"role": "assistant", "content": str(c)}],
             "rejected": [{"role": "assistant", "content": str(r)}]} for a, b, c, r in PROBLEMS]
    return Dataset.from_list(rows)


def kto_dataset():
    from datasets import Dataset

    rows = []
    for a, b, c, r in PROBLEMS:
        prompt = [{"role": "user", "content": f"{a}+{b}="}]
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": str(c)}], "label": True})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": str(r)}], "label": False})
    return Dataset.from_list(rows[:4])


def trainer_for(config: DPOConfig, tiny, tmp_path):
    tokenizer, policy, reference = tiny
    loss = preference_losses.get_loss(config.loss)
    trainer_cls, config_cls = preference_losses.trainer_classes(loss.family)
    args = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=64, use_cpu=True,
                      bf16=False, fp16=False, gradient_checkpointing=False, report_to=[], learning_rate=0.0,
                      disable_tqdm=True, **preference_losses.trl_kwargs(config))
    data = kto_dataset() if loss.family == "kto" else pairs_dataset()
    trainer = build_trainer(loss, trainer_cls, model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                            args=args, train_dataset=data, eval_dataset=None, processing_class=tokenizer,
                            peft_config=None)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        value = trainer.compute_loss(trainer.model, batch).item()
    return value, batch


def token_logps(model, input_ids, attention_mask):
    """log π(x_t | x_<t) for t >= 1: plain forward, log_softmax, gather."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def completion_sums(model, batch, prefix=""):
    """Per-sequence summed log-prob of the completion tokens, and the completion lengths (DPO/KTO batches)."""
    mask = batch[f"{prefix}completion_mask"][:, 1:].float()
    logps = token_logps(model, batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"])
    return (logps * mask).sum(1), batch[f"{prefix}completion_mask"].sum(1).float(), logps, mask


def dpo_delta(tiny, batch):
    _, policy, reference = tiny
    pol, lengths, pol_tok, mask = completion_sums(policy, batch)
    ref, _, _, _ = completion_sums(reference, batch)
    n = pol.shape[0] // 2
    ratio_c, ratio_r = pol[:n] - ref[:n], pol[n:] - ref[n:]
    return ratio_c, ratio_r, lengths[:n], lengths[n:], pol_tok[:n], mask[:n]


@pytest.mark.parametrize("name,extra", [
    ("sigmoid", {}), ("hinge", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.2}), ("sigmoid", {"rpo_alpha": 0.7}),
])
def test_dpo_family_losses(tiny, tmp_path, name, extra):
    beta = 0.3
    config = DPOConfig(data="builtin:addition", loss=name, beta=beta, **extra)
    value, batch = trainer_for(config, tiny, tmp_path)
    ratio_c, ratio_r, len_c, len_r, chosen_tok, chosen_mask = dpo_delta(tiny, batch)
    delta = ratio_c - ratio_r
    assert delta.abs().min() > 1e-3  # the check is not vacuous
    if name == "sigmoid":
        expected = -F.logsigmoid(beta * delta).mean()
    elif name == "hinge":
        expected = torch.relu(1 - beta * delta).mean()
    elif name == "ipo":
        expected = ((ratio_c / len_c - ratio_r / len_r - 1 / (2 * beta)) ** 2).mean()
    else:
        eps = extra["label_smoothing"]
        expected = ((-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)).mean()
    if extra.get("rpo_alpha"):
        nll = -(chosen_tok * chosen_mask).sum() / chosen_mask.sum()  # mean token NLL of the chosen answers
        expected = expected + extra["rpo_alpha"] * nll
    assert value == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def labelled_logps(model, ids, attention, labels):
    """Per-sequence sum and count of log-probs of the label tokens (labels -100 are ignored)."""
    logps = token_logps(model, ids, attention)
    mask = (labels[:, 1:] != -100).float()
    return (logps * mask).sum(1), mask.sum(1)


def test_simpo_loss(tiny, tmp_path):
    beta, gamma, eps, alpha = 2.0, 0.8, 0.1, 0.5
    config = DPOConfig(data="builtin:addition", loss="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=eps,
                       rpo_alpha=alpha)
    value, batch = trainer_for(config, tiny, tmp_path)
    _, policy, _ = tiny
    sum_c, n_c = labelled_logps(policy, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    sum_r, n_r = labelled_logps(policy, batch["rejected_input_ids"], batch["rejected_attention_mask"],
                                batch["rejected_labels"])
    # SimPO: length-normalised log-probs, no reference, target margin gamma (Meng et al. 2024, eq. 6).
    z = beta * (sum_c / n_c - sum_r / n_r) - gamma
    expected = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    expected = expected + alpha * (-sum_c.sum() / n_c.sum())  # + rpo_alpha · NLL of the chosen answers
    assert value == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def test_orpo_loss(tiny, tmp_path):
    beta = 0.25
    value, batch = trainer_for(DPOConfig(data="builtin:addition", loss="orpo", beta=beta), tiny, tmp_path)
    _, policy, _ = tiny
    avg_c = torch.div(*labelled_logps(policy, batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                      batch["chosen_labels"]))
    avg_r = torch.div(*labelled_logps(policy, batch["rejected_input_ids"], batch["rejected_attention_mask"],
                                      batch["rejected_labels"]))
    # ORPO (Hong et al. 2024): odds(y) = P / (1 - P) with P the per-token average likelihood.
    log_odds = (avg_c - avg_r) - (torch.log(1 - torch.exp(avg_c)) - torch.log(1 - torch.exp(avg_r)))
    # TRL's NLL term covers the whole chosen sequence (prompt and answer), token-averaged.
    logps = token_logps(policy, batch["chosen_input_ids"], batch["chosen_attention_mask"])
    valid = batch["chosen_attention_mask"][:, 1:].float()
    nll = -(logps * valid).sum() / valid.sum()
    expected = nll - beta * F.logsigmoid(log_odds).mean()
    assert value == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def test_kto_loss(tiny, tmp_path):
    beta, w_d, w_u = 0.5, 1.0, 1.5
    config = DPOConfig(data="builtin:addition", loss="kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    value, batch = trainer_for(config, tiny, tmp_path)
    _, policy, reference = tiny
    pol, _, _, _ = completion_sums(policy, batch)
    ref, _, _, _ = completion_sums(reference, batch)
    kl_pol, _, _, _ = completion_sums(policy, batch, prefix="KL_")
    kl_ref, _, _, _ = completion_sums(reference, batch, prefix="KL_")
    # KTO (Ethayarajh et al. 2024, eq. 7): z = max(0, mean KL estimate over mismatched pairs in the batch).
    z = (kl_pol - kl_ref).mean().clamp(min=0)
    ratio = pol - ref
    label = batch["label"].bool()
    desirable = w_d * (1 - torch.sigmoid(beta * (ratio[label] - z)))
    undesirable = w_u * (1 - torch.sigmoid(beta * (z - ratio[~label])))
    expected = torch.cat([desirable, undesirable]).mean()
    assert label.any() and (~label).any()
    assert value == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


# --------------------------------------------------------------------------- the table and the config


def test_every_loss_is_covered_and_resolves():
    assert set(preference_losses.LOSSES) == {"sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"}
    for name, loss in preference_losses.LOSSES.items():
        trainer_cls, config_cls = preference_losses.trainer_classes(loss.family)
        assert trainer_cls.__name__.endswith("Trainer") and config_cls.__name__.endswith("Config")
        kwargs = preference_losses.trl_kwargs(DPOConfig(data="builtin:addition", loss=name))
        config_cls(output_dir="/tmp/unused", use_cpu=True, bf16=False, report_to=[], **kwargs)  # TRL accepts them


def test_rpo_alpha_becomes_trl_multi_loss():
    kwargs = preference_losses.trl_kwargs(DPOConfig(data="builtin:addition", loss="sigmoid", rpo_alpha=1.0))
    assert kwargs["loss_type"] == ["sigmoid", "sft"] and kwargs["loss_weights"] == [1.0, 1.0]
    assert preference_losses.trl_kwargs(DPOConfig(data="x", loss="simpo", rpo_alpha=0.3))["cpo_alpha"] == 0.3


def test_unknown_loss_lists_valid_names():
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "x", "stages": {"dpo": {"data": "builtin:addition", "loss": "dpo-v2"}}})
    message = str(err.value)
    assert "stages.dpo.loss" in message and "unknown loss 'dpo-v2'" in message
    for name in preference_losses.LOSSES:
        assert name in message


def test_fields_a_loss_ignores_are_errors():
    with pytest.raises(SpecError, match="simpo_gamma has no effect with loss 'sigmoid'"):
        parse_spec({"name": "x", "stages": {"dpo": {"data": "d", "simpo_gamma": 1.0}}})
    with pytest.raises(SpecError, match="rpo_alpha has no effect with loss 'orpo'"):
        parse_spec({"name": "x", "stages": {"dpo": {"data": "d", "loss": "orpo", "rpo_alpha": 1.0}}})
    with pytest.raises(SpecError, match="label_smoothing"):
        parse_spec({"name": "x", "stages": {"dpo": {"data": "d", "loss": "robust", "label_smoothing": 0.5}}})


def test_kto_loss_reads_kto_records():
    from stages.stage import data_sources

    spec = parse_spec({"name": "x", "stages": {"dpo": {"data": "d", "loss": "kto"}, "rm": {"kind": "reward", "data": "d"}}})
    assert data_sources(spec.stages["dpo"])["data"][1] == "kto"
    assert data_sources(spec.stages["rm"])["data"][1] == "preference"
