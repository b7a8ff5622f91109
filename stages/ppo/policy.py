"""The trained modules of a PPO stage: the policy (with an optional value head) and a separate critic.

* :class:`ActorCritic` -- the policy causal LM (plain, or a peft ``PeftModel``) and, for
  ``critic.mode: shared``, a linear value head on the policy's last hidden state. One ``forward``
  returns the response positions' logits and values, so DDP / DeepSpeed see a single forward per
  backward.
* :class:`SeparateCritic` -- its own backbone plus the scalar ``score`` head of a
  sequence-classification model (initialised from the reward model when there is one), applied at
  every position (``critic.mode: separate``).
* The reference policy: the adapter-disabled policy under LoRA/QLoRA (``with disable_adapter():``,
  no second copy), a frozen copy of the starting policy under full fine-tuning.

All forwards take a batch laid out by :func:`stages.ppo.experience.pack` (left-padded prompts of width
``P`` followed by right-padded responses of width ``T``) and ``keep = T``, and return tensors for
the ``T`` response positions: ``logits[:, t]`` (from the hidden state at ``P - 1 + t``) predicts
response token ``t``; ``values[:, t]`` is the value of the state before token ``t``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def causal_lm(policy):
    """The transformers causal LM inside a (possibly peft-wrapped) policy (LoRA layers injected)."""
    return policy.get_base_model() if is_peft(policy) else policy


def backbone_of(model):
    """The decoder stack of a transformers ``*ForCausalLM`` / ``*ForSequenceClassification``."""
    return getattr(model, model.base_model_prefix)


def hidden_size(model) -> int:
    config = model.config
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size)


class ActorCritic(nn.Module):
    """The policy, and a value head on its backbone when the critic is shared."""

    def __init__(self, policy: nn.Module, value_head: bool = False) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = None
        if value_head:
            lm = causal_lm(policy)
            head = nn.Linear(hidden_size(lm), 1)
            nn.init.normal_(head.weight, std=1.0 / (hidden_size(lm) + 1) ** 0.5)
            nn.init.zeros_(head.bias)
            dtype = next(p.dtype for p in lm.parameters() if p.is_floating_point())
            self.value_head = head.to(dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32)

    def forward(self, input_ids, attention_mask, position_ids, keep: int, with_values: bool = True):
        """Logits ``[B, keep, V]`` and values ``[B, keep]`` (None without a head) of the ``keep`` response positions."""
        lm = causal_lm(self.policy)
        hidden = backbone_of(lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state[:, -keep - 1:-1]
        logits = lm.get_output_embeddings()(hidden)
        values = None
        if self.value_head is not None and with_values:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logits, values

    @contextlib.contextmanager
    def reference(self):
        """Inside: the forward computes the reference policy (adapter disabled); LoRA/QLoRA only."""
        with self.policy.disable_adapter():
            yield


class SeparateCritic(nn.Module):
    """A value model of its own: backbone + scalar head at every position."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model  # a *ForSequenceClassification (num_labels=1), maybe peft-wrapped

    def forward(self, input_ids, attention_mask, position_ids, keep: int):
        inner = causal_lm(self.model)
        hidden = backbone_of(inner)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state[:, -keep - 1:-1]
        head = getattr(inner, "score", None) or getattr(inner, "classifier")
        return head(hidden).squeeze(-1).float()


def load_policy(model_source: str, peft_cfg, precision: str, *, trust_remote_code: bool = False,
                gradient_checkpointing: bool = False, zero_stage: int | None = None):
    """The trainable policy: the causal LM, with a fresh LoRA adapter for lora/qlora.
    ``zero_stage``: the stage's ``deepspeed.zero_stage`` (QLoRA under ZeRO-3 skips the kbit preparation)."""
    from peft import get_peft_model

    from stages.models import load_model, peft_config

    model = load_model(model_source, peft_cfg, precision, trust_remote_code=trust_remote_code,
                       gradient_checkpointing=gradient_checkpointing, zero_stage=zero_stage)
    config = peft_config(peft_cfg)
    if config is not None:
        model = get_peft_model(model, config)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config is not None:
            model.enable_input_require_grads()
    return disable_dropout(model)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off (as TRL's RL trainers do): old log-probs, the update's forward and the engines then
    compute the same function, so the PPO ratio starts at exactly 1."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def load_reference(model_source: str, peft_cfg, precision: str, trust_remote_code: bool = False):
    """The frozen starting policy (full fine-tuning only; LoRA uses the adapter-disabled policy)."""
    from stages.models import load_model

    ref = load_model(model_source, peft_cfg, precision, trust_remote_code=trust_remote_code)
    return ref.eval().requires_grad_(False)


def load_separate_critic(source: str, peft_cfg, precision: str, pad_token_id: int, trust_remote_code: bool = False):
    """A sequence-classification model as the critic; LoRA/QLoRA get an adapter with the head trained in full."""
    from peft import get_peft_model

    from stages.models import load_model, peft_config

    model = load_model(source, peft_cfg, precision, head="reward", trust_remote_code=trust_remote_code)
    model.config.pad_token_id = pad_token_id
    config = peft_config(peft_cfg, head="reward")
    if config is not None:
        model = get_peft_model(model, config)
    return SeparateCritic(disable_dropout(model))


def reference_logits(actor: ActorCritic, ref_model, input_ids, attention_mask, position_ids, keep: int):
    """Logits of the reference policy for the response positions (no grad)."""
    if ref_model is None:
        with actor.reference():
            logits, _ = actor(input_ids, attention_mask, position_ids, keep, with_values=False)
        return logits
    hidden = backbone_of(ref_model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state[:, -keep - 1:-1]
    return ref_model.get_output_embeddings()(hidden)


def parameter_counts(actor: ActorCritic, critic: nn.Module | None, ref_model) -> dict:
    def count(module, trainable=False):
        if module is None:
            return 0
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad or not trainable)

    return {
        "policy_parameters": count(actor.policy),
        "trainable_parameters": count(actor.policy, True),
        "value_head_parameters": count(actor.value_head),
        "critic_parameters": count(critic),
        "critic_trainable_parameters": count(critic, True),
        "ref_parameters": count(ref_model),
    }


def save_value_head(actor: ActorCritic, folder: Path, state: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else {k: v.detach().cpu().contiguous() for k, v in
                                              actor.value_head.state_dict().items()}
    save_file(state, str(folder / "value_head.safetensors"))
