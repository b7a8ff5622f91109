"""Advantage estimators, registered by name.

Every estimator returns ``(advantages, returns)``, both ``[batch, T]`` and 0 on padding.
The raw functions can be called directly; the PPO driver calls them by name through
:func:`compute_advantages` with one :class:`AdvantageInputs`, whose fields are matched to
the estimator's parameters by name.

* ``gae``          -- needs a critic (``values``); the only one in :data:`NEEDS_CRITIC`.
* ``grpo``, ``rloo`` -- group baselines from sequence ``scores``; groups are *consecutive*
  rows of ``group_size`` (all samples of one prompt next to each other).  The KL term is
  expected in the loss, not in the reward, for these.  ``returns == advantages``.
* ``reinforce_pp`` -- discounted return-to-go of ``token_rewards`` (KL penalty included),
  whitened over the whole batch.

GAE advantages are returned raw; whitening them (``masked_whiten``) is the driver's call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from .masked import masked_whiten

__all__ = [
    "AdvantageInputs",
    "ADVANTAGE_ESTIMATORS",
    "NEEDS_CRITIC",
    "register_advantage",
    "compute_advantages",
    "gae",
    "grpo",
    "rloo",
    "reinforce_pp",
]

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
NEEDS_CRITIC: set[str] = set()


@dataclass(kw_only=True)
class AdvantageInputs:
    """Everything any estimator may need; each one reads only the fields it names.

    ``mask``: ``[batch, T]``; ``scores``: ``[batch]`` sequence scores; ``token_rewards``:
    ``[batch, T]`` (see ``stages.rl.rewards.token_rewards``); ``values``: ``[batch, T]`` critic
    values.  ``group_size``: samples per prompt (consecutive rows).
    """

    mask: Tensor
    scores: Tensor | None = None
    token_rewards: Tensor | None = None
    values: Tensor | None = None
    group_size: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    normalize_std: bool = True
    eps: float = 1e-6


_INPUT_FIELDS = frozenset(f.name for f in fields(AdvantageInputs))


def register_advantage(
    name: str, *, needs_critic: bool = False
) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register ``fn`` in :data:`ADVANTAGE_ESTIMATORS` under ``name``.

    Every parameter of ``fn`` must be a field of :class:`AdvantageInputs` (that is how
    :func:`compute_advantages` feeds it).  ``needs_critic`` adds ``name`` to
    :data:`NEEDS_CRITIC`.  Registering a taken name raises ``ValueError``.
    """

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        unknown = set(inspect.signature(fn).parameters) - _INPUT_FIELDS
        if unknown:
            raise TypeError(
                f"estimator {name!r} has parameters {sorted(unknown)} that are not "
                f"AdvantageInputs fields {sorted(_INPUT_FIELDS)}"
            )
        ADVANTAGE_ESTIMATORS[name] = fn
        if needs_critic:
            NEEDS_CRITIC.add(name)
        return fn

    return deco


def compute_advantages(name: str, inputs: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """Run the estimator ``name`` on ``inputs`` -> ``(advantages, returns)``, ``[batch, T]``.

    Unknown ``name`` -> ``ValueError`` listing the valid names; a required input that is
    ``None`` (e.g. ``values`` for ``gae``) -> ``ValueError`` naming it.
    """
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    kwargs = {}
    for pname, param in inspect.signature(fn).parameters.items():
        value = getattr(inputs, pname)
        if value is None and param.default is inspect.Parameter.empty:
            raise ValueError(f"advantage estimator {name!r} needs AdvantageInputs.{pname}")
        kwargs[pname] = value
    return fn(**kwargs)


def _check_groups(scores: Tensor, group_size: int, minimum: int = 1) -> None:
    if scores.dim() != 1:
        raise ValueError(f"scores must be [batch], got shape {tuple(scores.shape)}")
    if group_size < minimum:
        raise ValueError(f"group_size must be >= {minimum}, got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"batch {scores.shape[0]} is not a multiple of group_size {group_size}")


@register_advantage("gae", needs_critic=True)
def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over the real tokens.

    Backwards over the real tokens ``t`` of a row, with ``t'`` the next real token::

        delta_t = r_t + gamma * V_{t'} - V_t        (V_{t'} = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t'}    (A_{t'} = 0 after the last real token)
        returns = A + V

    Padded positions are skipped (they neither bootstrap nor carry reward) and get 0, so
    there is no bootstrapping past the last real token, and holes in the mask are passed
    over as if absent.  With ``gamma = lam = 1``: ``A_t = sum_{s >= t} r_s - V_t``.
    """
    m = mask.to(values.dtype)
    rewards = token_rewards.to(values.dtype)
    batch, T = values.shape
    next_value = values.new_zeros(batch)
    next_adv = values.new_zeros(batch)
    adv = torch.zeros_like(values)
    for t in reversed(range(T)):
        mt = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = a_t * mt
        next_adv = mt * a_t + (1 - mt) * next_adv
        next_value = mt * values[:, t] + (1 - mt) * next_value
    returns = (adv + values) * m
    return adv, returns


@register_advantage("grpo")
def grpo(
    scores: Tensor,
    mask: Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024) group-normalised outcome advantage, broadcast over tokens.

    For row ``i`` in group ``g`` (consecutive rows of ``group_size``)::

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)    (normalize_std=True)
        A_i =  r_i - mean_g(r)                        (normalize_std=False, Dr. GRPO)

    ``std_g`` is the unbiased (Bessel-corrected) sample std, as in TRL / verl; it is 0 for
    ``group_size == 1``.  ``A[i, t] = A_i * mask[i, t]``; ``returns = advantages``.
    """
    _check_groups(scores, group_size)
    r = scores.to(torch.float32 if not scores.is_floating_point() else scores.dtype)
    grouped = r.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    adv = centred.reshape(-1, 1) * mask.to(r.dtype)
    return adv, adv.clone()


@register_advantage("rloo")
def rloo(scores: Tensor, mask: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024), broadcast over tokens.

    ``A_i = r_i - (1 / (k - 1)) * sum_{j in group(i), j != i} r_j`` with ``k = group_size >= 2``
    (equivalently ``k / (k - 1) * (r_i - mean_g(r))``).  ``returns = advantages``.
    """
    _check_groups(scores, group_size, minimum=2)
    r = scores.to(torch.float32 if not scores.is_floating_point() else scores.dtype)
    grouped = r.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    adv = (grouped - baseline).reshape(-1, 1) * mask.to(r.dtype)
    return adv, adv.clone()


@register_advantage("reinforce_pp")
def reinforce_pp(
    token_rewards: Tensor, mask: Tensor, gamma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): whitened discounted return-to-go, no critic.

    Over the real tokens ``t`` of a row (``t'`` the next real one; padding skipped)::

        G_t = r_t + gamma * G_{t'}           (G after the last real token = 0)
        A   = masked_whiten(G, mask)          (global mean / std over the whole batch)

    ``token_rewards`` should already include the KL penalty.  Returns ``(A, G)``.
    """
    m = mask.to(token_rewards.dtype)
    batch, T = token_rewards.shape
    running = token_rewards.new_zeros(batch)
    returns = torch.zeros_like(token_rewards)
    for t in reversed(range(T)):
        mt = m[:, t]
        g_t = token_rewards[:, t] + gamma * running
        returns[:, t] = g_t * mt
        running = mt * g_t + (1 - mt) * running
    return masked_whiten(returns, mask), returns
