"""Sequence scores -> per-token rewards, and score shaping (unfinished / overlong responses).

Convention: a reward model (or verifier) gives one score per sequence, ``scores: [batch]``.
It is placed on the **last real token** of the response (``max{t : mask[b, t] == 1}``);
every real token also pays the per-token KL penalty ``-kl_coef * kl``.  Padding gets 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masked import last_token_index

__all__ = ["token_rewards", "apply_unfinished_penalty", "length_penalty"]


def token_rewards(
    scores: Tensor, kl: Tensor, kl_coef: float | Tensor, mask: Tensor
) -> Tensor:
    """Per-token rewards ``[batch, T]``.

    ``r[b, t] = mask[b, t] * (-kl_coef * kl[b, t]) + [t == last(b)] * scores[b]``

    where ``last(b)`` is the last real token of row ``b``.  A row with no real token gets
    all zeros (its score is dropped).  ``kl`` is a per-token estimate (see ``stages.rl.kl``).
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = last_token_index(mask)
    has_token = last >= 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has_token]
    rewards = rewards.clone()
    rewards[rows, last[has_token]] += scores.to(rewards.dtype)[has_token]
    return rewards


def apply_unfinished_penalty(
    scores: Tensor, finished: Tensor, penalty: float, replace: bool = False
) -> Tensor:
    """Penalise responses that did not finish (no EOS before the length limit).

    ``replace=False`` (TRL's ``missing_eos_penalty``): ``score - penalty`` for unfinished rows.
    ``replace=True``: unfinished rows get the score ``penalty`` outright (e.g. ``-1.0``).
    Finished rows are unchanged.  ``finished`` is a bool tensor ``[batch]``.  Returns a new tensor.
    """
    finished = finished.to(torch.bool)
    penalised = torch.full_like(scores, penalty) if replace else scores - penalty
    return torch.where(finished, scores, penalised)


def length_penalty(
    lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0
) -> Tensor:
    """Soft overlong penalty (DAPO, Yu et al. 2025), to *add* to the scores: ``[batch]``, <= 0.

    With ``L`` the response length and ``start = max_length - buffer``::

        0                                   if L <= start
        -penalty * (L - start) / buffer     if start < L <= max_length
        -penalty                            if L > max_length
    """
    if buffer <= 0:
        raise ValueError("buffer must be > 0")
    start = max_length - buffer
    over = (lengths.to(torch.float32) - start).clamp(min=0.0, max=float(buffer))
    return -penalty * over / buffer
