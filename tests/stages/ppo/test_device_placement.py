"""One PPO iteration (score, experience, update, metrics) with the policy, reference and critic on
another device than the host: ``meta`` stands in for a GPU here.

Any tensor a step builds on the CPU and mixes with the models' outputs fails the way it would on a
GPU ("Expected all tensors to be on the same device"), so this catches the crash of a PPO stage
with ``use_gpu: true`` on its first iteration. Reading a scalar (a metric) from a meta tensor has no
value to read: :class:`MetaScalars` answers a placeholder, so the metrics code runs as built.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

META = torch.device("meta")


class MetaScalars(TorchDispatchMode):
    """``item()`` on a meta tensor answers 0.5 (1 for integers), a copy to the host gives zeros;
    every other op runs as it would, so mixing host and meta tensors still fails."""

    def __init__(self) -> None:
        super().__init__()
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                self.host_reads += 1
                return 0.5 if first.is_floating_point() else 1
            if func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
                self.host_reads += 1
                return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype)
        return func(*args, **kwargs)


def tensors_of(obj, prefix: str = ""):
    """(name, tensor) for every tensor in a dataclass tree."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from tensors_of(getattr(obj, name), f"{prefix}.{name}")


def ppo_run_on(device, tiny_base, peft: dict, algorithm: dict, critic: dict | None, batch_size: int = 4):
    """A PPORun as ``start_run`` builds it (no Ray: no engines, standalone worker), models on ``device``."""
    from stages.job import PPOJob
    from stages.models import load_tokenizer
    from stages.ppo.config import PPOConfig
    from stages.ppo.critic import build_critic, load_critic_model
    from stages.ppo.policy import ActorCritic, is_peft, load_policy, load_reference
    from stages.ppo.prompts import PromptPlan
    from stages.ppo.rewards import RewardSources
    from stages.ppo.trainee import Trainee, place_frozen
    from stages.ppo.worker import PPORun
    from stages.rl import FixedKLController
    from stages.sources import load_records

    config = PPOConfig.model_validate({
        "kind": "ppo", "from": "base", "prompts": "builtin:addition", "reward_fn": "addition", "peft": peft,
        "algorithm": algorithm, "critic": critic, "rollout": {"n": 2, "prompts_per_step": 4, "max_new_tokens": 4},
        "train": {"batch_size": batch_size, "max_steps": 1}})
    tokenizer = load_tokenizer(tiny_base)
    policy = load_policy(str(tiny_base), config.peft, "fp32")
    actor = ActorCritic(policy, value_head=config.critic_config.mode == "shared" if config.critic_config else False)
    actor.to(device)
    ref = None if is_peft(policy) else place_frozen(load_reference(str(tiny_base), config.peft, "fp32"),
                                                     config, "fp32", device)
    critic_model = load_critic_model(config, str(tiny_base), "fp32", tokenizer.pad_token_id, False)
    if critic_model is not None:
        critic_model.to(device)
    # The rows as the stage writes them for its workers (stages.training_data: TRL's JSON layout).
    rows = [json.loads(json.dumps(r.to_trl())) for r in load_records("builtin:addition/train", "prompt", limit=8).records]
    return PPORun(
        job=PPOJob(stage="ppo", work_dir=".", model_dir=".", model_source=str(tiny_base), precision="fp32",
                   threads=1, report_to="none", env={}, trust_remote_code=False, train_file="", iterations=1,
                   critic_source=str(tiny_base)),
        config=config, rank=1, world=1, tokenizer=tokenizer, actor=actor, ref_model=ref,
        policy=Trainee(actor, config.train.lr, config, "fp32", total_steps=1, wrap=False),
        critic=build_critic(config, critic_model, "fp32", total_steps=1),
        plan=PromptPlan(rows, config.rollout.prompts_per_step, 0, 1, seed=0), engines=None, all_engines=None,
        rewards=RewardSources("addition"), kl_ctl=FixedKLController(config.algorithm.kl_coef))


def rollouts_for(run) -> list:
    """What the engines would return for iteration 0: two samples per prompt, the second cut off."""
    from stages.chat_templates import conversation_ids
    from stages.rollout import Rollout

    out = []
    for i in run.plan.indices(0):
        prompt = conversation_ids(run.tokenizer, run.plan.rows[i]["prompt"], add_generation_prompt=True)
        for k, response in enumerate(([7, 8, run.tokenizer.eos_token_id], [9, 10, 11, 12])):
            out.append(Rollout(prompt_ids=prompt, response_ids=response, response_text=str(k),
                               logprobs=[-1.0] * len(response), finished=k == 0))
    return out


@pytest.mark.parametrize("peft, algorithm, critic, batch_size", [
    ({"method": "full"}, {"advantage": "gae"}, {"mode": "shared"}, 4),        # frozen reference copy, value head
    ({"method": "lora", "r": 4}, {"advantage": "gae"}, {"mode": "separate"}, 4),  # adapter-disabled reference
    ({"method": "lora", "r": 4}, {"advantage": "grpo", "tis_cap": 2.0}, None, 4),  # critic-free, KL in the loss, TIS
    ({"method": "full"}, {"advantage": "grpo"}, None, 8),  # one step: old log-probs from the update's forward
], ids=["full-shared", "lora-separate", "lora-grpo", "full-grpo-one-step"])
def test_one_iteration_keeps_every_tensor_on_the_models_device(tiny_base, peft, algorithm, critic, batch_size):
    from stages.ppo.records import record
    from stages.ppo.worker import experience, score, update

    run = ppo_run_on(META, tiny_base, peft, algorithm, critic, batch_size)
    assert run.device == META
    if run.ref_model is not None:
        assert {p.device for p in run.ref_model.parameters()} == {META}
    if run.critic.module is not None:
        assert {p.device for p in run.critic.module.parameters()} == {META}
    results = rollouts_for(run)
    import torch.fx.experimental._config as fx_config

    # Boolean indexing has a data-dependent size, which meta tensors do not have: assume every row is kept.
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True), MetaScalars() as mode:
        scores, finished, parts = score(run, 0, results)
        exp, seconds = experience(run, results, scores, finished)
        stats, _ = update(run, exp, 0)
        metrics = record(run, 1, exp, scores, finished, parts, {**stats, **exp.stats},
                         {"rollout": 0.1, "generate": 0.1, "lag": 0.0, "scoring": 0.0, "experience": seconds, "training": 0.1, "iteration": 0.3},
                         {"sync_seconds": 0.0})
    on_host = [name for name, t in tensors_of(exp, "exp") if t.device != META]
    assert not on_host, f"left on the host: {on_host}"
    assert scores.device == META and finished.device == META
    # The update ran on the device too: every trainable parameter is still a meta tensor.
    assert {p.device for p in run.actor.parameters()} == {META}
    assert mode.host_reads > 10  # the metrics were read (as placeholders) from device tensors
    assert {"reward_mean", "kl", "entropy", "loss"} <= set(metrics)
    assert ("tis_weight_mean" in metrics) == ("tis_cap" in algorithm)


def test_the_same_iteration_on_the_host_is_finite(tiny_base):
    """The control: the same code on the CPU gives real, finite numbers (so the meta run skipped nothing)."""
    from stages.ppo.records import record
    from stages.ppo.worker import experience, score, update

    run = ppo_run_on(torch.device("cpu"), tiny_base, {"method": "full"}, {"advantage": "gae"}, {"mode": "shared"})
    results = rollouts_for(run)
    scores, finished, parts = score(run, 0, results)
    exp, seconds = experience(run, results, scores, finished)
    stats, _ = update(run, exp, 0)
    metrics = record(run, 1, exp, scores, finished, parts, {**stats, **exp.stats},
                     {"rollout": 0.1, "generate": 0.1, "lag": 0.0, "scoring": 0.0, "experience": seconds, "training": 0.1, "iteration": 0.3}, {"sync_seconds": 0.0})
    assert all(torch.isfinite(t).all() for _, t in tensors_of(exp) if t.is_floating_point())
    # The hand-made responses carry logprobs -1 while the tiny model's are far lower: a large but finite gap.
    assert 0.1 < metrics["rollout_logprob_diff"] < 50
    assert metrics["finished_fraction"] == pytest.approx(0.5)


@pytest.mark.parametrize("peft", [{"method": "full"}, {"method": "lora", "r": 4}], ids=["full", "lora"])
def test_one_step_iterations_take_the_old_log_probs_from_the_update_with_the_same_result(tiny_base, peft, monkeypatch):
    """One epoch over one micro-batch (8 samples, batch_size 8), KL in the loss: the experience skips its policy
    forward, and the update, the KL, the entropy and the engine difference come out as with that forward."""
    import stages.ppo.worker as worker

    def one_iteration(old_from_update: bool):
        torch.manual_seed(0)
        run = ppo_run_on(torch.device("cpu"), tiny_base, peft, {"advantage": "grpo", "ppo_epochs": 1}, None,
                         batch_size=8)
        assert worker.old_logprobs_from_update(run)
        monkeypatch.setattr(worker, "old_logprobs_from_update", lambda run: old_from_update)
        results = rollouts_for(run)
        scores, finished, _ = worker.score(run, 0, results)
        exp, _ = worker.experience(run, results, scores, finished)
        assert (exp.old_logprobs is None) == old_from_update
        stats, _ = worker.update(run, exp, 0)
        trained = {n: p.detach().clone() for n, p in run.actor.named_parameters() if p.requires_grad}
        return {**exp.stats, **stats}, trained

    shortcut, shortcut_params = one_iteration(True)
    control, control_params = one_iteration(False)
    moved = max((shortcut_params[n] - p).abs().max().item() for n, p in control_params.items())
    assert moved < 1e-6, moved
    assert shortcut["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    for name in ("kl", "kl_per_token", "entropy", "rollout_logprob_diff", "policy_loss", "loss"):
        assert shortcut[name] == pytest.approx(control[name], rel=1e-5, abs=1e-6), name
