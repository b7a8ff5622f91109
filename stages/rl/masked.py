"""Masked reductions over ``[batch, response_len]`` tensors.

``mask`` is 1 (or True) on real response tokens and 0 on padding; it may be bool or float
and is cast to the values' dtype.  Every reduction ignores the padded entries entirely.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_mean", "masked_sum", "masked_var", "masked_whiten", "last_token_index"]


def _as_weights(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum_i values_i * mask_i`` (over ``dim``, or over everything when ``dim`` is None)."""
    m = _as_weights(mask, values)
    return (values * m).sum() if dim is None else (values * m).sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(values * mask) / sum(mask)`` over ``dim`` (everything when None).

    An all-padding slice gives 0 (the denominator is clamped to a tiny positive number),
    never NaN.
    """
    m = _as_weights(mask, values)
    num = (values * m).sum() if dim is None else (values * m).sum(dim=dim)
    den = m.sum() if dim is None else m.sum(dim=dim)
    return num / den.clamp(min=1e-8)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of the masked entries (over everything): ``masked_mean((x - mu)^2)``.

    With ``unbiased=True`` it is multiplied by ``n / (n - 1)`` (Bessel), ``n = sum(mask)``;
    with ``n <= 1`` the correction is skipped (the biased value, 0, is returned).
    """
    mu = masked_mean(values, mask)
    var = masked_mean((values - mu) ** 2, mask)
    if unbiased:
        n = _as_weights(mask, values).sum()
        if float(n) > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = False,
) -> Tensor:
    """Normalise the masked entries to zero mean and unit variance.

    ``out = (x - mu) / sqrt(var + eps)``, with ``mu``, ``var`` the masked mean / variance
    (biased by default, so the masked entries of ``out`` have population std 1).  With
    ``shift_mean=False`` the mean is added back: ``out = (x - mu) / sqrt(var + eps) + mu``
    (scale only).  Padded positions of the output are 0.
    """
    mu = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=unbiased)
    out = (values - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mu
    return out * _as_weights(mask, out)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row of a ``[batch, T]`` mask (``-1`` if none).

    Works for right padding, left padding and holes: it is ``max{t : mask[b, t] != 0}``.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, positions, torch.full_like(positions, -1)).max(dim=-1).values
