"""Per-token KL estimators between the policy and the reference model, and KL-coef controllers.

With ``d = logp - ref_logp`` (per-token log-probs of the *sampled* tokens under the policy
and the reference), the estimators of ``KL(pi || ref)`` (Schulman, "Approximating KL
divergence", 2020) are

* ``k1 = d``                           -- unbiased, can be negative, high variance;
* ``k2 = 0.5 * d^2``                   -- biased, always >= 0, low variance;
* ``k3 = exp(-d) - (-d) - 1``          -- unbiased, always >= 0, low variance
  (``= exp(ref - logp) - (ref - logp) - 1``).

All return a ``[batch, T]`` tensor; padding is *not* masked here (multiply by the mask
or use :func:`compute_kl` with ``mask``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "k1",
    "k2",
    "k3",
    "KL_ESTIMATORS",
    "compute_kl",
    "FixedKLController",
    "AdaptiveKLController",
]

KLEstimator = Callable[[Tensor, Tensor], Tensor]

# exp() of a log-ratio beyond this is clamped, so a wildly off token cannot give inf.
_MAX_LOG_RATIO = 20.0


def k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k1 = logp - ref_logp``."""
    return logprobs - ref_logprobs


def k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k2 = 0.5 * (logp - ref_logp)^2``."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1``.

    The log-ratio is clamped to ``[-20, 20]`` before ``exp`` for numerical safety
    (exact for any realistic value).
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": k1, "k2": k2, "k3": k3}


def compute_kl(
    logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1", mask: Tensor | None = None
) -> Tensor:
    """Per-token KL by estimator name (``"k1"``, ``"k2"``, ``"k3"``), zeroed on padding if ``mask``.

    Raises ``ValueError`` (listing the valid names) for an unknown estimator.
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid: {sorted(KL_ESTIMATORS)}"
        ) from None
    kl = fn(logprobs, ref_logprobs)
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    return kl


def _as_float(x: float | Tensor) -> float:
    return float(x.detach().item()) if isinstance(x, Tensor) else float(x)


@dataclass
class FixedKLController:
    """Constant KL coefficient: ``value == coef`` forever; ``update`` is a no-op."""

    coef: float

    @property
    def value(self) -> float:
        return self.coef

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op (kept for interface parity with :class:`AdaptiveKLController`)."""


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    On each ``update(current_kl, n_steps)``::

        err   = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + err * n_steps / horizon)

    so the coefficient grows when the measured KL is above ``target`` and shrinks below it.
    ``n_steps`` is the number of samples (or steps) the KL was measured over, in the same
    unit as ``horizon``.
    """

    init_coef: float
    target: float
    horizon: float
    value: float = field(init=False)

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = float(self.init_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        err = min(max(_as_float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
