"""Tests for stages.rl: expected numbers are worked out by hand (or plain python) below."""

from __future__ import annotations

import math

import pytest
import torch

from stages import rl
from stages.rl import (
    ADVANTAGE_ESTIMATORS,
    NEEDS_CRITIC,
    AdaptiveKLController,
    AdvantageInputs,
    FixedKLController,
    apply_unfinished_penalty,
    compute_advantages,
    compute_kl,
    entropy_from_logits,
    explained_variance,
    gae,
    grpo,
    k1,
    k2,
    k3,
    last_token_index,
    length_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    register_advantage,
    reinforce_pp,
    rloo,
    token_rewards,
    value_loss,
)

T = torch.tensor


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# ---------------------------------------------------------------- masked reductions


def test_masked_mean_and_var():
    x = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = T([[1, 1, 0], [1, 0, 0]])
    # real entries: 1, 2, 4 -> mean 7/3; squared deviations 16/9, 1/9, 25/9 -> sum 42/9
    close(masked_mean(x, m), 7 / 3)
    close(masked_var(x, m), 42 / 9 / 3)
    close(masked_var(x, m, unbiased=True), 42 / 9 / 2)
    close(masked_mean(x, m, dim=1), [1.5, 4.0])
    # bool mask works the same; all-padding gives 0, not NaN
    close(masked_mean(x, m.bool()), 7 / 3)
    close(masked_mean(x, torch.zeros_like(m)), 0.0)


def test_masked_whiten_mean0_std1_over_real_entries():
    x = T([[1.0, 2.0, 100.0], [4.0, 7.0, -50.0]])
    m = T([[1, 1, 0], [1, 1, 0]])
    w = masked_whiten(x, m)
    real = w[m.bool()]
    close(real.mean(), 0.0)
    close(real.std(unbiased=False), 1.0, atol=1e-4)
    assert torch.all(w[~m.bool()] == 0)
    # hand values: real entries 1,2,4,7 -> mean 3.5, var (6.25+2.25+0.25+12.25)/4 = 5.25
    close(w[0, 0], (1 - 3.5) / math.sqrt(5.25), atol=1e-4)
    # shift_mean=False keeps the mean, still unit std
    w2 = masked_whiten(x, m, shift_mean=False)
    close(w2[m.bool()].mean(), 3.5, atol=1e-4)
    close(w2[m.bool()].std(unbiased=False), 1.0, atol=1e-4)


def test_last_token_index():
    m = T([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert last_token_index(m).tolist() == [1, 3, -1, 2]


# ---------------------------------------------------------------- KL


def test_kl_estimators():
    logp = T([[-1.0, -2.0]])
    ref = T([[-1.5, -1.0]])
    # d = logp - ref = [0.5, -1.0]; ref - logp = [-0.5, 1.0]
    close(k1(logp, ref), [[0.5, -1.0]])
    close(k2(logp, ref), [[0.125, 0.5]])
    close(k3(logp, ref), [[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]])
    assert set(rl.KL_ESTIMATORS) == {"k1", "k2", "k3"}
    close(compute_kl(logp, ref, "k2", mask=T([[1, 0]])), [[0.125, 0.0]])
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        compute_kl(logp, ref, "k9")


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05


def test_adaptive_kl_controller_moves_coef():
    up = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    up.update(12.0, n_steps=100)  # err = 12/6 - 1 = 1 -> clipped to 0.2
    close(up.value, 0.1 * (1 + 0.2 * 100 / 10000), atol=1e-12)
    assert up.value > 0.1

    down = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    down.update(T(3.0), n_steps=100)  # err = -0.5 -> clipped to -0.2; tensors accepted
    close(down.value, 0.1 * (1 - 0.2 * 100 / 10000), atol=1e-12)
    assert down.value < 0.1

    small = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    small.update(6.6, n_steps=100)  # err = 0.1, inside the clip
    close(small.value, 0.1 * (1 + 0.1 * 100 / 10000), atol=1e-12)


# ---------------------------------------------------------------- rewards


def test_token_rewards_score_on_last_real_token():
    scores = T([1.0, 2.0, 3.0])
    kl = T([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    mask = T([[1, 1, 1], [1, 1, 0], [0, 1, 1]])  # full, right-padded, left-padded
    r = token_rewards(scores, kl, 0.5, mask)
    close(
        r,
        [
            [-0.05, -0.10, -0.15 + 1.0],
            [-0.20, -0.25 + 2.0, 0.0],
            [0.0, -0.40, -0.45 + 3.0],
        ],
    )


def test_apply_unfinished_penalty_and_length_penalty():
    scores = T([1.0, 2.0, 3.0])
    finished = T([True, False, True])
    close(apply_unfinished_penalty(scores, finished, 1.5), [1.0, 0.5, 3.0])
    close(apply_unfinished_penalty(scores, finished, -1.0, replace=True), [1.0, -1.0, 3.0])
    # max_length 10, buffer 4 -> free up to 6, linear to -penalty at 10, -penalty beyond
    close(length_penalty(T([5, 6, 8, 10, 12]), 10, 4, penalty=2.0), [0.0, 0.0, -1.0, -2.0, -2.0])


# ---------------------------------------------------------------- advantages


def test_gae_gamma1_lam1_is_return_to_go_minus_values():
    rewards = T([[1.0, 2.0, 3.0]])
    values = T([[0.5, 1.0, -1.0]])
    mask = T([[1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # return-to-go: [6, 5, 3]
    close(ret, [[6.0, 5.0, 3.0]])
    close(adv, [[5.5, 4.0, 4.0]])


def test_gae_with_padding_ignores_padded_positions():
    gamma, lam = 0.9, 0.8
    rewards = T([[0.0, 1.0, 100.0, 100.0]])  # garbage on padding
    values = T([[0.2, 0.5, 7.0, -7.0]])
    mask = T([[1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # t=1 (last real): delta = 1 - 0.5 = 0.5 (no bootstrap), A1 = 0.5
    # t=0: delta = 0 + 0.9*0.5 - 0.2 = 0.25, A0 = 0.25 + 0.72*0.5 = 0.61
    close(adv, [[0.61, 0.5, 0.0, 0.0]])
    close(ret, [[0.81, 1.0, 0.0, 0.0]])
    # plain python reference over the real tokens only
    r, v = [0.0, 1.0], [0.2, 0.5]
    a, last = [0.0, 0.0], 0.0
    for t in reversed(range(2)):
        nv = v[t + 1] if t + 1 < 2 else 0.0
        last = r[t] + gamma * nv - v[t] + gamma * lam * last
        a[t] = last
    close(adv[0, :2], a)


def test_gae_batch_rows_are_independent():
    rewards = T([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    values = T([[0.0, 0.0, 9.0], [0.0, 0.0, 0.0]])
    mask = T([[1, 0, 0], [1, 1, 1]])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]])


def test_grpo_two_groups():
    scores = T([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    mask = torch.ones(6, 2)
    mask[1, 1] = 0
    adv, ret = grpo(scores, mask, group_size=3, eps=0.0)
    # group 1: mean 2, sample std sqrt((1+0+1)/2) = 1 -> [-1, 0, 1]
    # group 2: mean 4/3, sample std sqrt((16/9+16/9+64/9)/2) = 4/sqrt(3)
    s3 = math.sqrt(3)
    per_row = [-1.0, 0.0, 1.0, -s3 / 3, -s3 / 3, 2 * s3 / 3]
    expected = [[a, a] for a in per_row]
    expected[1][1] = 0.0
    close(adv, expected)
    close(ret, expected)
    adv_nostd, _ = grpo(scores, torch.ones(6, 1), group_size=3, normalize_std=False)
    close(adv_nostd[:, 0], [-1.0, 0.0, 1.0, -4 / 3, -4 / 3, 8 / 3])
    with pytest.raises(ValueError, match="multiple"):
        grpo(scores, torch.ones(6, 1), group_size=4)


def test_rloo_leave_one_out_baseline():
    scores = T([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    adv, ret = rloo(scores, torch.ones(6, 2), group_size=3)
    # group 1: baselines (2+3)/2, (1+3)/2, (1+2)/2; group 2: (0+4)/2, (0+4)/2, 0
    per_row = [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 2.0, 0 - 2.0, 4 - 0.0]
    close(adv, [[a, a] for a in per_row])
    close(ret, adv)
    with pytest.raises(ValueError):
        rloo(scores, torch.ones(6, 2), group_size=1)


def test_reinforce_pp_discounting_and_whitening():
    rewards = T([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    adv, ret = reinforce_pp(rewards, mask, gamma=0.5)
    # row 0: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5; row 1: G1 = 3, G0 = 1.5
    close(ret, [[1.5, 1.0, 2.0], [1.5, 3.0, 0.0]])
    real = [1.5, 1.0, 2.0, 1.5, 3.0]
    mu = sum(real) / 5
    sd = math.sqrt(sum((g - mu) ** 2 for g in real) / 5 + 1e-8)
    close(adv, [[(1.5 - mu) / sd, (1.0 - mu) / sd, (2.0 - mu) / sd], [(1.5 - mu) / sd, (3.0 - mu) / sd, 0.0]])


def test_registry_and_compute_advantages():
    assert {"gae", "grpo", "rloo", "reinforce_pp"} <= set(ADVANTAGE_ESTIMATORS)
    assert NEEDS_CRITIC == {"gae"}
    with pytest.raises(ValueError) as err:
        compute_advantages("ppo_magic", AdvantageInputs(mask=torch.ones(2, 2)))
    for name in ("gae", "grpo", "reinforce_pp", "rloo"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", AdvantageInputs(mask=torch.ones(1, 2), token_rewards=torch.ones(1, 2)))

    mask = T([[1, 1, 0], [1, 1, 1]])
    scores = T([1.0, 3.0])
    tok = T([[0.5, 1.0, 0.0], [0.0, 0.0, 3.0]])
    values = T([[0.1, 0.2, 0.0], [0.3, 0.2, 0.1]])
    inputs = AdvantageInputs(
        mask=mask, scores=scores, token_rewards=tok, values=values, group_size=2, gamma=0.9, lam=0.7
    )
    for name, direct in [
        ("gae", gae(tok, values, mask, 0.9, 0.7)),
        ("grpo", grpo(scores, mask, 2)),
        ("rloo", rloo(scores, mask, 2)),
        ("reinforce_pp", reinforce_pp(tok, mask, 0.9)),
    ]:
        adv, ret = compute_advantages(name, inputs)
        assert adv.shape == ret.shape == mask.shape
        close(adv, direct[0])
        close(ret, direct[1])


def test_register_advantage_custom_and_errors():
    @register_advantage("_test_const")
    def const(scores, mask):
        return scores[:, None] * mask, scores[:, None] * mask

    try:
        adv, _ = compute_advantages("_test_const", AdvantageInputs(mask=torch.ones(2, 2), scores=T([1.0, 2.0])))
        close(adv, [[1.0, 1.0], [2.0, 2.0]])
        with pytest.raises(ValueError, match="already"):
            register_advantage("_test_const")(const)
    finally:
        ADVANTAGE_ESTIMATORS.pop("_test_const", None)
    with pytest.raises(TypeError, match="bogus"):
        register_advantage("_test_bad")(lambda mask, bogus: None)
    assert "_test_bad" not in ADVANTAGE_ESTIMATORS


# ---------------------------------------------------------------- losses


def _policy_case():
    # tokens: (A, ratio) -> per-token loss with clip_eps = 0.2
    #   (+1, 1.1) inside             -> -1.1
    #   (+1, 1.5) above 1.2, clipped -> max(-1.5, -1.2) = -1.2
    #   (-1, 0.5) below 0.8, clipped -> max(0.5, 0.8) = 0.8
    #   (-1, 1.5) above, not clipped -> max(1.5, 1.2) = 1.5
    #   (+1, 0.5) below, not clipped -> max(-0.5, -0.8) = -0.5
    #   padding (+1, 9.0)            -> ignored
    adv = T([[1.0, 1.0, -1.0], [-1.0, 1.0, 1.0]])
    ratios = [[1.1, 1.5, 0.5], [1.5, 0.5, 9.0]]
    old = T([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    new = old + torch.log(T(ratios))
    mask = T([[1, 1, 1], [1, 1, 0]])
    return new, old, adv, mask, ratios


def test_ppo_policy_loss_values_and_clip_fraction():
    new, old, adv, mask, ratios = _policy_case()
    new.requires_grad_(True)
    loss, stats = ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
    close(loss, (-1.1 - 1.2 + 0.8 + 1.5 - 0.5) / 5)
    close(stats["clip_fraction"], 2 / 5)
    real = [1.1, 1.5, 0.5, 1.5, 0.5]
    close(stats["ratio_mean"], sum(real) / 5)
    close(stats["approx_kl"], sum(r - 1 - math.log(r) for r in real) / 5)
    # clipped tokens and padding get no gradient
    loss.backward()
    g = new.grad
    assert g[0, 1] == 0 and g[0, 2] == 0 and g[1, 2] == 0
    assert g[0, 0] != 0 and g[1, 0] != 0 and g[1, 1] != 0


def test_ppo_policy_loss_clip_higher():
    new, old, adv, mask, _ = _policy_case()
    # clip range [0.8, 1.6]: the (+1, 1.5) token is now inside -> -1.5
    loss, stats = ppo_policy_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    close(loss, (-1.1 - 1.5 + 0.8 + 1.5 - 0.5) / 5)
    close(stats["clip_fraction"], 1 / 5)


def test_truncated_is_weights_cap_the_ratio_and_carry_no_gradient():
    from stages.rl import truncated_is_weights

    ratios = [[0.5, 1.0, 3.0], [2.0, 8.0, 1.0]]
    behavior = T([[-1.0, -2.0, -0.5], [-3.0, -2.5, -1.0]])
    old = (behavior + torch.log(T(ratios))).requires_grad_(True)
    mask = T([[1, 1, 1], [1, 1, 0]])
    weights, stats = truncated_is_weights(old, behavior, mask, cap=2.0)
    close(weights, [[0.5, 1.0, 2.0], [2.0, 2.0, 0.0]])  # capped at 2, 0 on padding
    assert not weights.requires_grad  # a weight on the advantage, not a path for the gradient
    close(stats["tis_weight_mean"], (0.5 + 1.0 + 2.0 + 2.0 + 2.0) / 5)
    close(stats["tis_capped_fraction"], 2 / 5)  # 3.0 and 8.0 (2.0 itself is not over the cap)
    # On policy (old == behaviour) every real token weighs 1 and the loss is PPO's own.
    ones, _ = truncated_is_weights(behavior, behavior, mask, cap=2.0)
    close(ones, mask)


def test_value_loss_clipping():
    values = T([[1.5, 2.0, 50.0]])
    old = T([[1.0, 1.0, 0.0]])
    returns = T([[2.0, 0.0, 0.0]])
    mask = T([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    # tok0: (1.5-2)^2 = 0.25, clipped V = 1.2 -> 0.64 -> max 0.64 (clipped term wins)
    # tok1: (2-0)^2 = 4, clipped V = 1.2 -> 1.44 -> max 4
    close(loss, 0.5 * (0.64 + 4.0) / 2)
    close(stats["vf_clip_fraction"], 0.5)


def test_logprobs_and_entropy_from_logits():
    logits = T([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = T([[2, 1]])
    lse = math.log(math.e + math.e**2 + math.e**3)
    close(logprobs_from_logits(logits, labels), [[3.0 - lse, -math.log(3)]])
    close(logprobs_from_logits(logits.bfloat16(), labels), [[3.0 - lse, -math.log(3)]], atol=2e-2)

    ent_logits = T([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0]]])
    close(entropy_from_logits(ent_logits, T([[1, 1, 0]])), (math.log(4) + 0.0) / 2, atol=1e-4)


def test_entropy_in_chunks_equals_one_shot_with_gradients():
    """Chunked entropy (memory bound for large vocabularies) computes the same values and gradients."""
    from stages.rl.losses import entropy_per_token

    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 11) * 3).requires_grad_(True)
    whole = entropy_per_token(logits, chunk=10_000)
    chunked = entropy_per_token(logits, chunk=4)  # 21 positions in 6 chunks, the last one short
    assert chunked.shape == (3, 7)
    close(chunked, whole.detach(), atol=1e-6)
    (grad_whole,) = torch.autograd.grad(whole.sum(), logits)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    close(grad_chunked, grad_whole, atol=1e-6)
    with torch.no_grad():
        close(entropy_per_token(logits.bfloat16(), chunk=5), whole.detach(), atol=5e-2)


def test_explained_variance():
    returns = T([[1.0, 2.0, 3.0, 99.0]])
    mask = T([[1, 1, 1, 0]])
    close(explained_variance(returns.clone(), returns, mask), 1.0)
    close(explained_variance(torch.full_like(returns, 2.0), returns, mask), 0.0)
    # residuals R - V = [1, 0, 0]: mean 1/3, var (4/9 + 1/9 + 1/9)/3 = 2/9; Var[R] = 2/3
    close(explained_variance(T([[0.0, 2.0, 3.0, 0.0]]), returns, mask), 1 - (2 / 9) / (2 / 3))
