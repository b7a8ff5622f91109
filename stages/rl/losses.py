"""PPO losses and the per-token quantities they need (log-probs, entropy, explained variance).

Stats are returned as detached 0-d tensors (no host sync here; the driver calls ``.item()``
or all-reduces them as it likes).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor

from .masked import masked_mean, masked_var

__all__ = [
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "ppo_policy_loss",
    "truncated_is_weights",
    "value_loss",
    "logprobs_from_logits",
    "entropy_per_token",
    "entropy_from_logits",
    "explained_variance",
]

_MAX_LOG_RATIO = 20.0

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate_loss(loss_tok: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Reduce a ``[batch, T]`` per-token loss to a scalar.

    * ``token-mean``          -- ``sum(l * m) / sum(m)`` (every real token weighs the same);
    * ``seq-mean-token-mean`` -- mean over rows of each row's masked token mean (GRPO paper);
    * ``seq-mean-token-sum``  -- mean over rows of each row's masked token sum.
    """
    if mode == "token-mean":
        return masked_mean(loss_tok, mask)
    m = mask.to(loss_tok.dtype)
    if mode == "seq-mean-token-mean":
        return masked_mean(loss_tok, mask, dim=-1).mean()
    if mode == "seq-mean-token-sum":
        return (loss_tok * m).sum(dim=-1).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {list(LOSS_AGG_MODES)}")


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), per token, aggregated with ``loss_agg``.

    ::

        ratio_t = exp(logp_t - old_logp_t)
        l_t     = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high))

    ``clip_eps_high`` defaults to ``clip_eps`` (set it higher for DAPO's "clip-higher").
    The log-ratio is clamped to ``[-20, 20]`` before ``exp``.

    Stats (masked means over real tokens):

    * ``clip_fraction`` -- fraction of tokens where the clipped term is the max (strictly
      larger), i.e. where the gradient is cut;
    * ``approx_kl`` -- k3 estimate of ``KL(old || new)`` from samples of the old policy:
      ``mean(ratio - 1 - log(ratio))`` (>= 0, unbiased);
    * ``ratio_mean``, ``ratio_max``, ``policy_loss``.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss_tok = torch.maximum(unclipped, clipped)
    loss = aggregate_loss(loss_tok, mask, loss_agg)
    with torch.no_grad():
        m = mask != 0
        stats = {
            "policy_loss": loss.detach(),
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": ratio[m].max() if m.any() else ratio.new_zeros(()),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def truncated_is_weights(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor,
                         cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token truncated importance weights ``min(pi_old / pi_behavior, cap)`` (no gradient), for samples
    drawn by a behaviour policy other than the one the PPO ratio starts from (Espeholt et al. 2018's
    truncation; Yao et al. 2025 for rollout engines). 0 on padding.

    Stats: ``tis_weight_mean`` and ``tis_capped_fraction`` (tokens where the cap applied).
    """
    log_ratio = (old_logprobs - behavior_logprobs).detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    weights = torch.clamp(ratio, max=cap) * mask
    stats = {"tis_weight_mean": masked_mean(weights, mask),
             "tis_capped_fraction": masked_mean((ratio > cap).to(ratio.dtype), mask)}
    return weights, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    loss_agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 / TRL style).

    ::

        V_clip = old_V + clip(V - old_V, -clip_eps, clip_eps)
        l_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Stats: ``vf_clip_fraction`` (fraction of real tokens where the clipped error is strictly
    larger), ``value_loss``, ``value_mean``.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err_unclipped = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(err_unclipped, err_clipped), mask, loss_agg)
    with torch.no_grad():
        stats = {
            "value_loss": loss.detach(),
            "vf_clip_fraction": masked_mean((err_clipped > err_unclipped).to(values.dtype), mask),
            "value_mean": masked_mean(values, mask),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``log_softmax(logits)[..., labels]``: ``[batch, T, V]`` x ``[batch, T]`` -> ``[batch, T]``.

    Computed as ``logits[label] - logsumexp(logits)``.  fp32/fp64 logits go in one shot;
    half-precision logits are upcast to fp32 one row at a time (memory stays ~ one row).
    Shift logits/labels (``logits[:, :-1]``, ``input_ids[:, 1:]``) before calling.
    """
    labels = labels.long()
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row = row_logits.float()
        picked = row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


ENTROPY_CHUNK = 1024  # positions per chunk: the fp32 [chunk, V] temporaries of a 128k vocabulary stay ~0.5 GB


def _entropy(logits: Tensor) -> Tensor:
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def entropy_per_token(logits: Tensor, chunk: int = ENTROPY_CHUNK) -> Tensor:
    """``H = logsumexp(z) - sum(softmax(z) * z)`` per position: ``[..., V]`` -> ``[...]``.

    Computed over chunks of ``chunk`` positions, so the fp32 softmax of a bf16 ``[B, T, V]`` never
    exists whole; with grad, each chunk is recomputed in the backward pass (checkpointed) instead
    of keeping its temporaries.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.shape[0] <= chunk:
        return _entropy(flat).reshape(logits.shape[:-1])
    parts = [torch.utils.checkpoint.checkpoint(_entropy, part, use_reentrant=False) if part.requires_grad
             else _entropy(part) for part in flat.split(chunk)]
    return torch.cat(parts).reshape(logits.shape[:-1])


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Masked mean entropy of the per-token categorical: ``masked_mean(H(softmax(logits)), mask)``."""
    return masked_mean(entropy_per_token(logits), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over the real tokens (masked, biased variances).

    1 = perfect critic, 0 = no better than a constant, < 0 = worse.  NaN when ``Var[R] == 0``.
    """
    var_r = masked_var(returns, mask)
    var_res = masked_var(returns - values, mask)
    if float(var_r) == 0.0:
        return torch.full_like(var_r, float("nan"))
    return 1.0 - var_res / var_r
