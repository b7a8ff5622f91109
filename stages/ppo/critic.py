"""The value model of critic-based estimators (gae), behind one interface for its three modes.

* :class:`Critic` itself is "none" (grpo, rloo, reinforce_pp): no values, no value loss;
* :class:`SharedValueHead`: a value head on the policy's backbone (``ActorCritic(value_head=True)``),
  trained by the policy's optimizer: its loss is added to the policy loss (``vf_coef``);
* :class:`SeparateValueModel`: its own backbone and optimizer, stepped after the policy.

The loop calls the same methods whatever the mode: ``values`` while making experience,
``policy_loss_term`` and ``update`` per mini-batch, ``save`` at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from stages.ppo.config import AlgorithmConfig, PPOConfig
from stages.ppo.distributed import gathered_state_dict
from stages.ppo.policy import ActorCritic, is_peft, load_separate_critic, save_value_head
from stages.ppo.trainee import Trainee
from stages.rl import value_loss


class Critic:
    """No critic."""

    mode = "none"
    shares_policy = False  # the values come from the policy's own forward (a value head on it)

    @property
    def module(self) -> torch.nn.Module | None:
        return None

    def trainees(self) -> dict[str, Trainee]:
        """What a checkpoint saves besides the policy."""
        return {}

    def values(self, policy_values: Tensor | None, forward_args: tuple) -> Tensor | None:
        """Values of the response positions (no grad) while experience is made."""
        return None

    def policy_loss_term(self, values: Tensor | None, exp, idx, mask: Tensor,
                         algo: AlgorithmConfig) -> tuple[Tensor | float, dict]:
        """What the policy's loss adds for this mini-batch (a shared head's value loss)."""
        return 0.0, {}

    def update(self, forward_args: tuple, exp, idx, mask: Tensor, algo: AlgorithmConfig) -> dict:
        """A step of a critic with its own optimizer, after the policy's; its stats."""
        return {}

    def train(self, mode: bool = True) -> None:
        pass

    def save(self, actor: ActorCritic, folder: Path, rank: int) -> None:
        """Write the trained critic to ``folder`` (rank 0; collective under ZeRO-3)."""


class SharedValueHead(Critic):
    mode = "shared"
    shares_policy = True

    def values(self, policy_values, forward_args):
        return policy_values

    def policy_loss_term(self, values, exp, idx, mask, algo):
        loss, stats = value_loss(values, exp.values[idx], exp.returns[idx], mask, clip_eps=algo.value_clip_eps,
                                 loss_agg=algo.loss_agg)
        return algo.vf_coef * loss, stats

    def save(self, actor, folder, rank):
        state = gathered_state_dict(actor.value_head)
        if rank == 0:
            save_value_head(actor, folder, state)


class SeparateValueModel(Critic):
    mode = "separate"

    def __init__(self, trainee: Trainee) -> None:
        self.trainee = trainee

    @property
    def module(self):
        return self.trainee.module

    def trainees(self):
        return {"critic": self.trainee}

    def values(self, policy_values, forward_args):
        return self.trainee.module(*forward_args)

    def update(self, forward_args, exp, idx, mask, algo):
        predicted = self.trainee.forward(*forward_args)
        loss, stats = value_loss(predicted, exp.values[idx], exp.returns[idx], mask, clip_eps=algo.value_clip_eps,
                                 loss_agg=algo.loss_agg)
        self.trainee.backward(loss)
        self.trainee.step()
        return stats

    def train(self, mode=True):
        self.trainee.module.train(mode)

    def save(self, actor, folder, rank):
        model = self.trainee.module.model
        state = gathered_state_dict(model, trainable_only=is_peft(model))
        if rank == 0:
            from safetensors.torch import save_file

            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "critic.safetensors"))


def load_critic_model(config: PPOConfig, source: str, precision: str, pad_token_id: int,
                      trust_remote_code: bool) -> torch.nn.Module | None:
    """The separate critic's model (before any optimizer exists); None for the other modes."""
    critic = config.critic_config
    if critic is None or critic.mode != "separate":
        return None
    return load_separate_critic(source, config.peft, precision, pad_token_id, trust_remote_code=trust_remote_code)


def build_critic(config: PPOConfig, model: torch.nn.Module | None, precision: str, total_steps: int) -> Critic:
    """The critic of the configured mode; a separate one gets its optimizer here (``critic.lr``)."""
    critic = config.critic_config
    if critic is None:
        return Critic()
    if critic.mode == "shared":
        return SharedValueHead()
    return SeparateValueModel(Trainee(model, config.critic_lr, config, precision, total_steps))
