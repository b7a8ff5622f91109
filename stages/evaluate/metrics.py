"""Pure metric functions of the eval stage (no torch, no Ray): intervals, win rates, KL, perplexity.

    from stages.evaluate.metrics import accuracy, win_rate, kl_estimate, perplexity

    accuracy([True, False, True])          # {"accuracy": 0.667, "ci": [0.208, 0.939], "n": 3, "correct": 2}
    win_rate([1.0, 0.2], [0.5, 0.2])       # one win, one tie -> 0.75
    kl_estimate([[-1.0, -2.0]], [[-1.5, -2.5]])   # sequence KL 1.0 (policy samples only)
    perplexity([[-0.1, -0.3]])             # exp(0.2)

Confidence intervals are 95%: Wilson score intervals for proportions (accuracy, ranking accuracy),
the normal approximation (mean +- 1.96 standard errors) for means (win rate with ties counted
half, KL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from stages.tasks.grading import Z95, accuracy, accuracy_by_category, wilson_interval  # noqa: F401  (re-exported)

__all__ = ["Z95", "accuracy", "accuracy_by_category", "implicit_reward_ranking", "kl_estimate", "mean_std",
           "normal_interval", "outcome", "perplexity", "standard_error", "std", "wilson_interval", "win_rate"]


def normal_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """mean +- z * standard error (sample std, n - 1); a point for n == 1, NaNs for n == 0."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean - z * standard_error(values), mean + z * standard_error(values)


def standard_error(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    return std(values, ddof=1) / math.sqrt(n)


def std(values: Sequence[float], ddof: int = 0) -> float:
    n = len(values)
    if n - ddof <= 0:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - ddof))


def mean_std(values: Sequence[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    return {"mean": sum(values) / n if n else math.nan, "std": std(values), "n": n}


def outcome(score: float, reference_score: float, same_response: bool = False, tie_tolerance: float = 1e-5) -> float:
    """1 win, 0.5 tie, 0 loss. Identical responses always tie (their scores may differ in the last bits
    when scored in different batches); otherwise scores within ``tie_tolerance`` tie."""
    if same_response or abs(score - reference_score) <= tie_tolerance:
        return 0.5
    return 1.0 if score > reference_score else 0.0


def win_rate(scores: Sequence[float], reference_scores: Sequence[float], same: Sequence[bool] | None = None,
             tie_tolerance: float = 1e-5) -> dict:
    """Win rate against a reference, prompt by prompt, ties counted half; with the counts of wins,
    ties and losses and a normal 95% interval over the per-prompt outcomes."""
    if len(scores) != len(reference_scores):
        raise ValueError(f"{len(scores)} scores but {len(reference_scores)} reference scores")
    same = list(same) if same is not None else [False] * len(scores)
    outcomes = [outcome(s, r, d, tie_tolerance) for s, r, d in zip(scores, reference_scores, same)]
    n = len(outcomes)
    low, high = normal_interval(outcomes)
    return {
        "win_rate": sum(outcomes) / n if n else math.nan,
        "ci": [max(0.0, low), min(1.0, high)] if n else [math.nan, math.nan],
        "wins": outcomes.count(1.0),
        "ties": outcomes.count(0.5),
        "losses": outcomes.count(0.0),
        "n": n,
    }


def kl_estimate(policy_logprobs: Sequence[Sequence[float]], reference_logprobs: Sequence[Sequence[float]]) -> dict:
    """KL(policy || reference) from responses sampled from the policy.

    Each sample contributes ``sum_t log pi(y_t) - log ref(y_t)`` (the k1 estimator at sequence level,
    unbiased for the sequence KL); ``kl`` is their mean, ``ci`` its normal 95% interval, ``per_token``
    the sum over all samples divided by their total length. ``k3`` is the per-token mean of
    ``exp(r) - 1 - r`` with ``r = log ref - log pi`` (non-negative, lower variance, biased per token).
    """
    if len(policy_logprobs) != len(reference_logprobs):
        raise ValueError(f"{len(policy_logprobs)} policy samples but {len(reference_logprobs)} reference samples")
    per_sample, tokens, k3_sum = [], 0, 0.0
    for pol, ref in zip(policy_logprobs, reference_logprobs):
        if len(pol) != len(ref):
            raise ValueError(f"a sample has {len(pol)} policy log-probs but {len(ref)} reference log-probs")
        per_sample.append(sum(p - r for p, r in zip(pol, ref)))
        tokens += len(pol)
        k3_sum += sum(math.exp(r - p) - 1 - (r - p) for p, r in zip(pol, ref))
    n = len(per_sample)
    low, high = normal_interval(per_sample)
    return {
        "kl": sum(per_sample) / n if n else math.nan,
        "ci": [low, high],
        "per_token": sum(per_sample) / tokens if tokens else math.nan,
        "k3_per_token": k3_sum / tokens if tokens else math.nan,
        "samples": n,
        "tokens": tokens,
    }


def perplexity(token_logprobs: Sequence[Sequence[float]]) -> dict:
    """exp of the mean negative log-likelihood per token over all examples."""
    tokens = sum(len(t) for t in token_logprobs)
    nll = -sum(sum(t) for t in token_logprobs)
    return {
        "perplexity": math.exp(nll / tokens) if tokens else math.nan,
        "nll_per_token": nll / tokens if tokens else math.nan,
        "tokens": tokens,
        "examples": len(token_logprobs),
    }


def implicit_reward_ranking(policy_chosen: Sequence[float], reference_chosen: Sequence[float],
                            policy_rejected: Sequence[float], reference_rejected: Sequence[float],
                            tie_tolerance: float = 1e-6) -> dict:
    """Fraction of pairs whose implicit reward ``log pi/ref`` (summed over the response) is higher for
    the chosen response; ties count half (a model against itself scores 0.5). Wilson 95% interval."""
    margins = [(pc - rc) - (pr - rr) for pc, rc, pr, rr in
               zip(policy_chosen, reference_chosen, policy_rejected, reference_rejected)]
    outcomes = [0.5 if abs(m) <= tie_tolerance else float(m > 0) for m in margins]
    n = len(outcomes)
    low, high = wilson_interval(sum(outcomes), n)
    return {
        "accuracy": sum(outcomes) / n if n else math.nan,
        "ci": [low, high],
        "ties": outcomes.count(0.5),
        "mean_margin": sum(margins) / n if n else math.nan,
        "n": n,
    }
