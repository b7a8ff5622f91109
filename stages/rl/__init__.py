"""RL algorithm library: small pure torch functions for the PPO-family stages.

Conventions (all modules):

* per-token tensors are ``[batch, response_len]`` with ``mask`` = 1 on real response tokens
  and 0 on padding (bool or float);
* log-probs are per token (of the sampled token);
* sequence-level rewards (``scores``) are ``[batch]`` and are placed on the **last real
  token** of each response (see :func:`token_rewards`).

Modules: ``masked`` (masked reductions), ``kl`` (KL estimators + coef controllers),
``rewards`` (token rewards, score shaping), ``advantages`` (estimators by name),
``losses`` (PPO policy / value losses, log-probs, entropy).
"""

from .advantages import (
    ADVANTAGE_ESTIMATORS,
    NEEDS_CRITIC,
    AdvantageInputs,
    compute_advantages,
    gae,
    grpo,
    register_advantage,
    reinforce_pp,
    rloo,
)
from .kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    compute_kl,
    k1,
    k2,
    k3,
)
from .losses import (
    LOSS_AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    entropy_per_token,
    explained_variance,
    logprobs_from_logits,
    ppo_policy_loss,
    truncated_is_weights,
    value_loss,
)
from .masked import last_token_index, masked_mean, masked_sum, masked_var, masked_whiten
from .rewards import apply_unfinished_penalty, length_penalty, token_rewards

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "NEEDS_CRITIC",
    "AdvantageInputs",
    "compute_advantages",
    "gae",
    "grpo",
    "register_advantage",
    "reinforce_pp",
    "rloo",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "compute_kl",
    "k1",
    "k2",
    "k3",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "entropy_from_logits",
    "entropy_per_token",
    "explained_variance",
    "logprobs_from_logits",
    "ppo_policy_loss",
    "truncated_is_weights",
    "value_loss",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "apply_unfinished_penalty",
    "length_penalty",
    "token_rewards",
]
