"""Experience making: rollouts from the engines -> padded tensors, old/ref log-probs, values, rewards
and advantages (``stages.rl`` does the maths).

Layout of a batch (:func:`pack`): every row is ``[pad.. prompt | response ..pad]``: prompts
left-padded to width ``P``, responses right-padded to width ``T``; ``position_ids`` count real
tokens only, so a row computes the same function as it would unpadded. Per-token tensors are
``[B, T]`` over the response positions, with ``mask`` 1 on real response tokens (the EOS that ended
a response included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from stages.ppo.config import AlgorithmConfig
from stages.ppo.critic import Critic
from stages.rl import (
    AdvantageInputs,
    compute_advantages,
    compute_kl,
    entropy_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    token_rewards,
)


@dataclass
class Batch:
    input_ids: Tensor  # [B, P + T]
    attention_mask: Tensor  # [B, P + T]
    position_ids: Tensor  # [B, P + T]
    mask: Tensor  # [B, T] float, 1 on real response tokens
    response_ids: Tensor  # [B, T]

    @property
    def T(self) -> int:
        return self.mask.shape[1]

    def rows(self, index) -> Batch:
        return Batch(self.input_ids[index], self.attention_mask[index], self.position_ids[index], self.mask[index],
                     self.response_ids[index])

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.mask,
                                               self.response_ids)))


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> Batch:
    """Left-padded prompts then right-padded responses (an empty response keeps one masked pad slot)."""
    B = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(r) for r in response_ids))
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if r:
            ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, P:P + len(r)] = 1
            mask[i, :len(r)] = 1.0
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, attn, position_ids, mask, ids[:, P:].clone())


def response_logprobs(logits: Tensor, batch: Batch, temperature: float = 1.0) -> Tensor:
    """Log-probs ``[B, T]`` of the response tokens under ``softmax(logits / temperature)`` (0 on padding)."""
    if temperature != 1.0:
        logits = logits / temperature
    return logprobs_from_logits(logits, batch.response_ids) * batch.mask


@dataclass
class Experience:
    """One worker's samples of one iteration, ready for the PPO epochs."""

    batch: Batch
    old_logprobs: Tensor | None  # [B, T] policy that generated (recomputed by the trainer); None: the update's own
    ref_logprobs: Tensor  # [B, T]
    values: Tensor | None  # [B, T] critic values at rollout time (None without a critic)
    scores: Tensor  # [B] sequence scores (after shaping)
    advantages: Tensor  # [B, T]
    returns: Tensor  # [B, T]
    kl: Tensor | None  # [B, T] per-token KL(policy || ref) estimate at rollout time (None with old_logprobs)
    engine_logprobs: Tensor  # [B, T] the engine's raw log-probs of the same tokens
    stats: dict = field(default_factory=dict)


@torch.no_grad()
def forward_old(actor, critic: Critic, ref_model, batch: Batch, chunk: int, temperature: float, policy: bool = True,
                reference: bool = True):
    """Old log-probs, reference log-probs and values, in chunks of ``chunk`` rows (no grad).
    ``policy=False``: no policy forward (old log-probs and entropy are None; see ``make_experience``);
    ``reference=False``: no reference forward (None: the engines scored it)."""
    from stages.ppo.policy import reference_logits

    old, ref, values, entropy = [], [], [], []
    for start in range(0, batch.mask.shape[0], chunk):
        part = batch.rows(slice(start, start + chunk))
        args = (part.input_ids, part.attention_mask, part.position_ids, part.T)
        v = None
        if policy:
            logits, v = actor(*args, with_values=critic.shares_policy)
            old.append(response_logprobs(logits, part, temperature))
            entropy.append(entropy_per_token(logits / temperature) * part.mask)
        if reference:
            ref.append(response_logprobs(reference_logits(actor, ref_model, *args), part, temperature))
        v = critic.values(v, args)
        if v is not None:
            values.append(v * part.mask)
    return (torch.cat(old) if old else None, torch.cat(ref) if ref else None, torch.cat(values) if values else None,
            torch.cat(entropy) if entropy else None)


def rollout_stats(old: Tensor, ref: Tensor, engine_logprobs: Tensor, mask: Tensor, estimator: str,
                  temperature: float) -> dict:
    """The KL to the reference and the engine-vs-trainer log-prob difference at rollout time."""
    kl = compute_kl(old, ref, estimator, mask)
    stats = {
        "kl": float(kl.sum(-1).mean()),  # per-sequence KL(policy || ref), mean over samples
        "kl_per_token": float(masked_mean(kl, mask)),
    }
    if temperature == 1.0:
        # Engine vs trainer on the same weights: a weight-sync / numerics check (0 when in step).
        stats["rollout_logprob_diff"] = float(masked_mean((engine_logprobs - old).abs(), mask))
    return stats


def shape_scores(scores: Tensor, finished: Tensor, algo: AlgorithmConfig) -> Tensor:
    from stages.rl import apply_unfinished_penalty

    if algo.unfinished_penalty is not None:
        scores = apply_unfinished_penalty(scores, finished, algo.unfinished_penalty)
    if algo.reward_clip is not None:
        scores = scores.clamp(-algo.reward_clip, algo.reward_clip)
    return scores


def advantages_for(algo: AlgorithmConfig, batch: Batch, scores: Tensor, kl: Tensor, kl_coef: float,
                   values: Tensor | None, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(advantages, returns, token_rewards)`` with the configured estimator (``stages.rl.compute_advantages``)."""
    name = algo.advantage
    kl_in_reward = algo.kl_placement == "reward"
    rewards = token_rewards(scores, kl, kl_coef if kl_in_reward else 0.0, batch.mask)
    inputs = AdvantageInputs(mask=batch.mask, scores=scores, token_rewards=rewards, values=values,
                             group_size=group_size, gamma=algo.gamma, lam=algo.lam,
                             normalize_std=algo.normalize_std)
    advantages, returns = compute_advantages(name, inputs)
    if name == "gae" and algo.whiten_advantages and batch.mask.sum() > 1:
        advantages = masked_whiten(advantages, batch.mask)
    return advantages, returns, rewards


def make_experience(actor, critic: Critic, ref_model, batch: Batch, engine_logprobs: Tensor, scores: Tensor,
                    finished: Tensor, algo: AlgorithmConfig, kl_coef: float, group_size: int, chunk: int,
                    temperature: float, old_from_update: bool = False, ref_logprobs: Tensor | None = None) -> Experience:
    """``old_from_update``: the iteration is one optimizer step over one micro-batch with the KL in the
    loss, so the update's own forward sees the policy that generated: its detached log-probs are the old
    ones (as TRL does with ``num_iterations=1``), this policy forward is skipped, and the update reports
    the rollout-time stats (``rollout_stats``). ``ref_logprobs``: the reference's, scored where the samples
    were generated (``reference_placement: engine``); else the reference forward runs here."""
    old, ref, values, entropy = forward_old(actor, critic, ref_model, batch, chunk, temperature,
                                            policy=not old_from_update, reference=ref_logprobs is None)
    ref = ref_logprobs if ref is None else ref
    mask = batch.mask
    kl = None if old is None else compute_kl(old, ref, algo.kl_estimator, mask)
    shaped = shape_scores(scores, finished, algo)
    advantages, returns, rewards = advantages_for(algo, batch, shaped, torch.zeros_like(mask) if kl is None else kl,
                                                  kl_coef, values, group_size)
    stats = {
        "non_score_reward": float((rewards.sum(-1) - shaped).mean()),
        "advantage_mean": float(masked_mean(advantages, mask)),
        "advantage_std": float(masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt()),
    }
    if old is not None:
        stats["entropy"] = float(masked_mean(entropy, mask))
        stats.update(rollout_stats(old, ref, engine_logprobs, mask, algo.kl_estimator, temperature))
    return Experience(batch=batch, old_logprobs=old, ref_logprobs=ref, values=values, scores=shaped,
                      advantages=advantages, returns=returns, kl=kl, engine_logprobs=engine_logprobs, stats=stats)
