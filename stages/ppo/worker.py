"""The per-worker PPO loop (Ray Train ``train_loop_per_worker``); the driver is ``stages.ppo.stage``.

Each iteration, on every worker, one function per step:

1. :func:`rollout` -- this rank's prompts of the iteration (a seeded permutation; the iteration
   index is the data position) to this rank's rollout engines (Ray actors): ``n`` samples each;
   with ``rollout.off_policy_steps: 1`` they were submitted during the previous iteration's training
   and are waited for before its sync (``stages.ppo.generation``);
2. :func:`score` -- verifier / ``module:function`` in-process, reward model in an actor or here;
3. :func:`experience` -- old and reference log-probs, values (``stages.ppo.critic``), then advantages
   (``stages.rl.compute_advantages``) with the KL penalty in the reward or in the loss;
4. :func:`update` -- ``ppo_epochs`` passes over shuffled mini-batches: PPO-clip + value loss + entropy
   bonus (+ k3 KL for grpo/rloo) under DeepSpeed ZeRO or DDP;
5. :func:`sync` -- the policy to the engines (``stages.ppo.sync``);
6. :func:`record` (``stages.ppo.records``) -- metrics reduced over ranks -> a JSONL file, the tracker, the progress line;
7. :func:`report` -- to Ray Train (``stages.train_session``), with a checkpoint every ``train.save_steps``;
   in a sweep trial every iteration, with the sweep's metric, which goes on to Tune (ASHA).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages import train_session
from stages.job import PPOJob
from stages.launcher import TRAIN_LOG, WORKER_INFO
from stages.log import stage_log
from stages.ppo import checkpoint as ckpt
from stages.ppo.config import PPOConfig
from stages.ppo.critic import Critic, build_critic, load_critic_model
from stages.ppo.distributed import dist_info
from stages.ppo.experience import Batch, Experience, make_experience, pack, response_logprobs, rollout_stats
from stages.ppo.generation import (check_weights, note_restart, prompt_ids, sampling_params, settle, submit_ahead,
                                   wait_for_engines)
from stages.ppo.policy import ActorCritic, causal_lm, is_peft
from stages.ppo.prompts import PromptPlan, my_engines
from stages.ppo.records import load_history, record
from stages.ppo.sync import save_policy, sync_weights
from stages.ppo.tracking import open_tracker
from stages.ppo.trainee import Trainee, place_frozen, zero3_init
from stages.rl import AdaptiveKLController, FixedKLController, aggregate_loss, entropy_from_logits, k3
from stages.rl import ppo_policy_loss, truncated_is_weights
from stages.rollout.trainer_engine import SHARED_MODULE, TRAINER_ENGINE, TrainerEngine
from stages.tune_report import tune_values


@dataclass
class PPORun:
    """One worker's run: its models, data, engines and records."""

    job: PPOJob
    config: PPOConfig
    rank: int
    world: int
    tokenizer: object
    actor: ActorCritic
    ref_model: torch.nn.Module | None
    policy: Trainee
    critic: Critic
    plan: PromptPlan
    engines: object  # RolloutGroup over this rank's engines
    all_engines: object  # RolloutGroup over every engine (rank 0 syncs them)
    rewards: object  # stages.ppo.rewards.RewardSources
    kl_ctl: object
    start: int = 0
    resumed_from: str | None = None
    history: list[dict] = field(default_factory=list)
    writer: object = None
    probe: object = None  # stages.ppo.verify.Probe: what the engines score after each sync
    adapters: list = field(default_factory=list)  # the adapter each engine used at the last verified sync
    engine_restarts: int = 0
    token_cache: dict[int, list[int]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def work_dir(self) -> Path:
        return Path(self.job.work_dir)

    @property
    def device(self) -> torch.device:
        return next(self.actor.parameters()).device

    @property
    def samples_per_rank(self) -> int:
        return self.plan.per_rank * self.config.rollout.n


def train_ppo_worker(args: dict) -> None:
    """Per-worker PPO / GRPO / RLOO / REINFORCE++ loop."""
    from stages.worker import start_worker

    job, config, tokenizer = start_worker(args, PPOConfig, PPOJob)
    run = start_run(job, config, tokenizer, args)
    last_end = time.perf_counter()
    ahead = None  # the next iteration's samples, generated while this one trains (rollout.off_policy_steps)
    for iteration in range(run.start, job.iterations):
        results, seconds = ahead.take() if ahead else rollout(run, iteration)
        ahead = submit_ahead(run, iteration + 1)
        (scores, finished, parts), seconds["scoring"] = timed(score, run, iteration, results)
        exp, seconds["experience"] = experience(run, results, scores, finished)
        stats, seconds["training"] = update(run, exp, iteration)
        ahead = settle(run, ahead)  # before the weights change
        synced = sync(run, iteration + 1)
        # Wall time since the previous iteration ended: its reporting and checkpoint are counted too.
        seconds["iteration"] = time.perf_counter() - last_end
        metrics = record(run, iteration + 1, exp, scores, finished, parts, {**exp.stats, **stats}, seconds, synced)
        report(run, iteration + 1, metrics)
        last_end = time.perf_counter()
    finish(run)


def timed(fn, *args):
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


# --------------------------------------------------------------------------- setup


def start_run(job: PPOJob, config: PPOConfig, tokenizer, args: dict) -> PPORun:
    """Models, optimizers, prompts, engines and reward sources; resumed from a checkpoint if one exists."""
    from stages.ppo.policy import load_policy, load_reference
    from stages.ppo.rewards import RewardSources
    from stages.rollout.local import engine_group
    from stages.worker import init_deepspeed_distributed

    rank, world = dist_info()
    torch.manual_seed(config.train.seed + rank)
    if config.deepspeed.zero_stage is not None:
        init_deepspeed_distributed(config.scaling.use_gpu)
    load = dict(trust_remote_code=job.trust_remote_code)
    zero3 = zero3_init(config, job.precision)  # noqa: F841 - alive while the models load
    policy = load_policy(job.model_source, config.peft, job.precision,
                         gradient_checkpointing=config.train.gradient_checkpointing,
                         zero_stage=config.deepspeed.zero_stage, **load)
    critic_config = config.critic_config
    actor = ActorCritic(policy, value_head=critic_config is not None and critic_config.mode == "shared")
    # LoRA's reference is the adapter-disabled policy; reference_placement engine: the engines' actors hold it.
    ref_model = None if is_peft(policy) or config.reference_placement == "engine" else \
        load_reference(job.model_source, config.peft, job.precision, **load)
    critic_model = load_critic_model(config, job.critic_source, job.precision, tokenizer.pad_token_id,
                                     job.trust_remote_code)
    rows = [json.loads(line) for line in open(job.train_file)]
    plan = PromptPlan(rows, config.rollout.prompts_per_step, rank, world, config.train.seed)
    total_steps = optimizer_steps(config, job.iterations, plan.per_rank * config.rollout.n)
    policy_trainee = Trainee(actor, config.train.lr, config, job.precision, total_steps)
    algo = config.algorithm
    if config.rollout.engine == TRAINER_ENGINE:  # every rank samples with its own replica (no actor, no sync)
        engines = all_engines = engine_group([TrainerEngine(causal_lm(policy_trainee.module.policy), tokenizer)])
    else:
        engines, all_engines = engine_group(my_engines(args["engines"], rank, world)), engine_group(args["engines"])
    run = PPORun(
        job=job, config=config, rank=rank, world=world, tokenizer=tokenizer, actor=policy_trainee.module,
        ref_model=ref_model, policy=policy_trainee,
        critic=build_critic(config, critic_model, job.precision, total_steps), plan=plan,
        engines=engines, all_engines=all_engines,
        rewards=RewardSources(config.reward_fn, args.get("reward_actor") or job.reward_model_dir),
        kl_ctl=(AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon) if algo.kl_target
                else FixedKLController(algo.kl_coef)),
    )
    if ref_model is not None:  # the frozen copy (full fine-tuning) is placed or sharded like the policy
        run.ref_model = place_frozen(ref_model, config, job.precision, run.device)
    resume(run)
    run.history = load_history(run.work_dir, run.start) if rank == 0 else []
    run.writer = open_tracker(job, run.start) if rank == 0 else None
    if config.rollout.engine != TRAINER_ENGINE:  # the engines loaded while this worker did
        wait_for_engines(args.get("engines_ready") or [], run.all_engines, config)
    if run.start > 0:  # the engines start from the initial policy: bring them to the restored one
        sync(run, run.start)
    else:  # the engines and the trainer must agree before the first rollout too
        verify_sync(run, 0)
    return run


def optimizer_steps(config: PPOConfig, iterations: int, samples_per_rank: int) -> int:
    """Optimizer steps over the run (the LR schedule's length)."""
    minibatches = math.ceil(samples_per_rank / config.train.batch_size)
    return iterations * config.algorithm.ppo_epochs * max(1, minibatches // config.train.grad_accum)


def resume(run: PPORun) -> None:
    with ckpt.find_resume(run.work_dir) as folder:
        if folder is None:
            return
        state = ckpt.restore(folder, {"policy": run.policy, **run.critic.trainees()}, run.rank)
        run.start, run.resumed_from = state["iteration"], str(folder)
        if isinstance(run.kl_ctl, AdaptiveKLController):
            run.kl_ctl.value = state["kl_coef"]
        if run.rank == 0:
            stage_log(run.job.stage, f"resuming from {folder} (iteration {run.start})")


# --------------------------------------------------------------------------- the steps


def rollout(run: PPORun, iteration: int) -> tuple[list, dict[str, float]]:
    """``n`` samples for each of this rank's prompts of the iteration, generated now (on policy; also the
    first iteration of ``off_policy_steps: 1``); the engines sleep after (colocate)."""
    prompts, params = prompt_ids(run, iteration), sampling_params(run, iteration)
    with_reference = run.config.reference_placement == "engine"
    in_worker = run.config.rollout.engine == TRAINER_ENGINE  # generates with the trained module: no versions

    def generate() -> list:
        results = run.engines.generate(prompts, params, with_reference)
        return results if in_worker else check_weights(results, iteration)

    started = time.perf_counter()
    # The engines hold the weights of step `iteration` (the last sync); a restarted one gets them again.
    results = recovering(run, iteration, generate)
    elapsed = time.perf_counter() - started
    seconds = {"rollout": elapsed, "generate": elapsed, "lag": 0.0}
    if run.config.rollout.colocate:
        ckpt.barrier()
        if run.rank == 0:
            run.all_engines.sleep()
    return results, seconds


def score(run: PPORun, iteration: int, results: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sequence scores of the samples (every reward source summed), whether each ended, and each source's part."""
    from stages.data.records import PromptExample

    indices = run.plan.indices(iteration)
    examples = [PromptExample.from_trl(run.plan.rows[i]) for i in indices for _ in range(run.config.rollout.n)]
    totals, parts = run.rewards(examples, [r.response_text for r in results])
    scores = torch.tensor(totals, dtype=torch.float32, device=run.device)
    finished = torch.tensor([r.finished for r in results], device=run.device)
    return scores, finished, parts


def experience(run: PPORun, results: list, scores: torch.Tensor, finished: torch.Tensor) -> tuple[Experience, float]:
    """The padded batch, the engines' log-probs, and the trainer's old/ref log-probs, values and advantages."""
    started = time.perf_counter()
    batch = pack([r.prompt_ids for r in results], [r.response_ids for r in results],
                 run.tokenizer.pad_token_id).to(run.device)
    engine_logprobs = padded([r.logprobs for r in results], batch.mask.shape, run.device)
    ref_logprobs = None
    if run.config.reference_placement == "engine":  # scored in the engines' actors as they generated
        ref_logprobs = padded([r.ref_logprobs for r in results], batch.mask.shape, run.device)
    run.actor.eval()
    run.critic.train(False)
    config = run.config
    exp = make_experience(run.actor, run.critic, run.ref_model, batch, engine_logprobs, scores, finished,
                          config.algorithm, run.kl_ctl.value, config.rollout.n,
                          chunk=max(config.train.batch_size, 16), temperature=config.rollout.temperature,
                          old_from_update=old_logprobs_from_update(run), ref_logprobs=ref_logprobs)
    return exp, time.perf_counter() - started


def padded(rows: list[list[float]], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Per-token values of each response as a ``[B, T]`` float32 tensor, 0 after each row's end."""
    out = torch.zeros(shape, dtype=torch.float32)
    for row, values in enumerate(rows):
        out[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out.to(device)


def old_logprobs_from_update(run: PPORun) -> bool:
    """Whether the update's own forward can give the old log-probs (``make_experience``): one epoch over
    one micro-batch is one optimizer step on the policy that generated, no value head needs this
    iteration's policy forward, and no KL goes into the rewards before the update."""
    config, algo = run.config, run.config.algorithm
    kl_free_rewards = algo.kl_placement == "loss" or (algo.kl_coef == 0 and algo.kl_target is None)
    return (algo.ppo_epochs == 1 and run.samples_per_rank <= config.train.batch_size
            and not run.critic.shares_policy and kl_free_rewards)


def update(run: PPORun, exp: Experience, iteration: int) -> tuple[dict, float]:
    """The PPO epochs over one iteration's experience; their mean stats and the seconds they took."""
    started = time.perf_counter()
    run.actor.train()
    run.critic.train(True)
    stats = ppo_update(exp, run.policy, run.critic, run.config, run.kl_ctl.value,
                       seed=run.config.train.seed * 7919 + iteration)
    return stats, time.perf_counter() - started


def sync(run: PPORun, step: int) -> dict:
    """The policy to every engine (woken first under colocate), sent again once when an engine died and
    was restarted meanwhile; then verified (``rollout.verify_sync``)."""
    from stages.rollout.base import EngineRestarted

    if run.config.rollout.engine == TRAINER_ENGINE:  # the engine generates with the trained parameters themselves
        return {"sync_seconds": 0.0, "sync_method": SHARED_MODULE}
    if run.config.rollout.colocate and run.rank == 0:
        run.all_engines.wake()
    engines = run.all_engines if run.rank == 0 else None
    for attempt in range(2):
        try:
            synced = sync_weights(run.actor, engines, run.work_dir, step, run.config.rollout.sync,
                                  run.config.rollout.sync_bucket_mb)
            verified, seconds = timed(verify_sync, run, step)
            return {**synced, **verified, "verify_seconds": seconds}
        except EngineRestarted as exc:  # raised on every rank together (see sync_weights, verify_sync)
            if attempt:
                raise
            note_restart(run, exc, f"sending them the weights of step {step} and retrying")
    raise AssertionError("unreachable")


def verify_sync(run: PPORun, step: int) -> dict:
    """Every engine proves it serves the weights of ``step`` (``stages.ppo.verify``); collective.

    Rank 0 asks the engines and judges; every rank computes the trainer's probe log-probs (a ZeRO-3
    forward needs all ranks) and learns rank 0's verdict, so that all stop together on a mismatch.
    """
    from stages.ppo import verify
    from stages.ppo.distributed import from_rank0
    from stages.rollout.base import EngineRestarted

    rollout_config = run.config.rollout
    if rollout_config.verify_sync == "off" or rollout_config.engine == TRAINER_ENGINE:  # trainer: nothing was copied
        return {}
    if run.probe is None:
        from stages.chat_templates import conversation_ids

        prompt = conversation_ids(run.tokenizer, run.plan.rows[0]["prompt"], add_generation_prompt=True)
        run.probe = verify.Probe.build(run.tokenizer, prompt)
    # The engines score the probe while this process computes its own log-probs of it; not on CPU cores they
    # share with it (colocate): two thread pools on 2 cores made the check 11 -> 15 ms at the median, 42 at worst.
    overlap = not (rollout_config.colocate and run.device.type == "cpu")
    pending = run.all_engines.start_serving(run.probe.prompt_ids, run.probe.response_ids) \
        if run.rank == 0 and overlap else None
    expected = verify.trainer_logprobs(run.actor, run.probe, run.tokenizer.pad_token_id)
    verdict, restarted = None, None
    if run.rank == 0:
        tolerance = rollout_config.verify_tolerance or verify.default_tolerance(run.job.precision)
        try:
            reports = pending() if pending else run.all_engines.serving(run.probe.prompt_ids, run.probe.response_ids)
            verdict = verify.judge(reports, expected, step, tolerance, run.adapters, lora=is_peft(run.actor.policy))
            run.adapters = verdict.adapters
        except EngineRestarted as exc:
            restarted = exc
    died, failed, max_diff = from_rank0([float(restarted is not None), 0.0 if verdict is None or verdict.ok else 1.0,
                                         verdict.max_diff if verdict else 0.0], run.device)
    if died:  # every rank raises, so that sync() sends the weights again on all of them
        raise restarted or EngineRestarted([], "serving", "reported by rank 0")
    if failed:
        message = verify.explain(verdict, step) if verdict else f"weight sync at step {step} not verified (rank 0)"
        if rollout_config.verify_sync == "error":
            raise verify.SyncVerificationError(message)
        if run.rank == 0:
            stage_log(run.job.stage, f"WARNING: {message}", run.started)
    return {"sync_probe_diff": max_diff}


def recovering(run: PPORun, weights_step: int, call):
    """``call()`` on this rank's engines; when an engine of any rank died and was restarted, every rank
    sends the weights of ``weights_step`` again (collective) and the ranks whose call failed retry once."""
    from stages.ppo.distributed import any_rank
    from stages.rollout.base import EngineRestarted

    try:
        result, failure = call(), None
    except EngineRestarted as exc:
        result, failure = None, exc
    if not any_rank(failure is not None, run.device):
        return result
    note_restart(run, failure, f"sending them the weights of step {weights_step} and retrying")
    sync(run, weights_step)
    return call() if failure is not None else result


def ppo_update(exp: Experience, policy: Trainee, critic: Critic, config: PPOConfig, kl_coef: float,
               seed: int) -> dict:
    """``ppo_epochs`` passes over shuffled mini-batches of one iteration's experience; mean stats."""
    algo, batch_size, temperature = config.algorithm, config.train.batch_size, config.rollout.temperature
    n = exp.batch.mask.shape[0]
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    count = 0
    for _ in range(algo.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(exp.batch.mask.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            stats = minibatch_step(exp, idx, policy, critic, config, kl_coef, temperature)
            for key, value in stats.items():
                sums[key] = max(sums.get(key, 0.0), float(value)) if key == "ratio_max" else \
                    sums.get(key, 0.0) + float(value)
            count += 1
    return {k: (v if k == "ratio_max" else v / max(count, 1)) for k, v in sums.items()}


def minibatch_step(exp: Experience, idx: torch.Tensor, policy: Trainee, critic: Critic, config: PPOConfig,
                   kl_coef: float, temperature: float) -> dict:
    """One optimizer micro-step of the policy (and the critic) on the rows ``idx``; its stats."""
    algo = config.algorithm
    part: Batch = exp.batch.rows(idx)
    mask = part.mask
    forward_args = (part.input_ids, part.attention_mask, part.position_ids, part.T)
    logits, values = policy.forward(*forward_args, with_values=critic.shares_policy)
    logp = response_logprobs(logits, part, temperature)
    on_policy = exp.old_logprobs is None  # this forward is the rollout-time policy's (old_logprobs_from_update)
    old = logp.detach() if on_policy else exp.old_logprobs[idx]
    advantages, tis_stats = exp.advantages[idx], {}
    if algo.tis_cap is not None:  # samples drawn by the engine's policy, the ratio starts from the trainer's
        weights, tis_stats = truncated_is_weights(old, exp.engine_logprobs[idx], mask, algo.tis_cap)
        advantages = advantages * weights
    loss, stats = ppo_policy_loss(logp, old, advantages, mask, clip_eps=algo.clip_eps,
                                  clip_eps_high=algo.clip_eps_high, loss_agg=algo.loss_agg)
    stats.update(tis_stats)
    # The entropy bonus needs its gradient only when it is in the loss.
    entropy = entropy_from_logits((logits if algo.entropy_coef else logits.detach()) / temperature, mask)
    if on_policy:
        stats.update(rollout_stats(old, exp.ref_logprobs[idx], exp.engine_logprobs[idx], mask, algo.kl_estimator,
                                   temperature), entropy=entropy.detach())
    if algo.entropy_coef:
        loss = loss - algo.entropy_coef * entropy
    if algo.kl_placement == "loss" and kl_coef:
        kl_loss = aggregate_loss(k3(logp, exp.ref_logprobs[idx]) * mask, mask, algo.loss_agg)
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = kl_loss.detach()
    value_term, value_stats = critic.policy_loss_term(values, exp, idx, mask, algo)
    loss = loss + value_term
    stats.update(value_stats)
    policy.backward(loss)
    policy.step()
    stats.update(critic.update(forward_args, exp, idx, mask, algo))
    stats["entropy_train"] = entropy.detach()
    stats["loss"] = loss.detach()
    return stats


# --------------------------------------------------------------------------- records


def report(run: PPORun, step: int, entry: dict) -> None:
    """Report to Ray Train with a checkpoint every ``train.save_steps`` (not at the end), and metrics alone
    every ``train.logging_steps`` and at the last iteration; in a sweep trial, every iteration, with the
    sweep's metric (``stages.tune_report``) so that ASHA can stop the trial between iterations.

    Not every iteration outside a sweep: Ray Train v2 holds one report per worker until its controller
    polls, every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s), so reporting each 0.3 s iteration made it
    take ~2 s (benchmarks/ppo_throughput.py). Every rank reports at the same steps, as Ray Train requires
    (``entry`` is reduced over ranks, so its keys, and what follows from them, are the same on every rank).
    """
    save_steps, logging_steps = run.config.train.save_steps, run.config.train.logging_steps
    for_tune = tune_values(entry)
    if for_tune is not None:  # forwarded to Tune by the launcher's callback (the checkpoint stays with Train)
        entry = {**entry, **for_tune}
    if save_steps and step % save_steps == 0 and step < run.job.iterations:
        trainees = {"policy": run.policy, **run.critic.trainees()}
        folder = ckpt.save(run.work_dir, step, trainees, {"kl_coef": float(run.kl_ctl.value)}, run.rank)
        # One rank reports the shared folder, once (ckpt.save ended on a barrier: every shard is written).
        train_session.report(entry, checkpoint_dir=folder if run.rank == 0 else None)
    elif for_tune is not None or step % logging_steps == 0 or step == run.job.iterations:
        train_session.report(entry)


def finish(run: PPORun) -> None:
    """The final policy (and critic) as HF folders, the training log and the worker info (rank 0)."""
    from stages.ppo.policy import parameter_counts
    from stages.worker import model_summary, probe_outputs

    run.actor.eval()
    save_policy(run.actor, Path(run.job.model_dir), run.tokenizer)
    run.critic.save(run.actor, run.work_dir / "critic", run.rank)
    probe = probe_outputs(run.actor.policy, run.tokenizer)
    if run.writer is not None:
        run.writer.close()
    if run.rank != 0:
        return
    log = {
        "log_history": run.history,
        "train_metrics": {"train_runtime": time.monotonic() - run.started, "iterations": run.job.iterations},
        "global_step": run.job.iterations,
        "resumed_from": run.resumed_from,
        "resumed_step": run.start if run.resumed_from else None,
        "model_summary": model_summary(run.actor.policy),
        "probe": probe,
    }
    info = {"reference": "frozen copy in the engines' actors" if run.config.reference_placement == "engine" else
            "adapter-disabled policy" if run.ref_model is None else "frozen copy",
            "critic": run.critic.mode, "sync_method": run.history[-1].get("sync_method") if run.history else None,
            "engine_restarts": int(run.history[-1].get("engine_restarts", 0)) if run.history else 0,
            **parameter_counts(run.actor, run.critic.module, run.ref_model)}
    (run.work_dir / WORKER_INFO).write_text(json.dumps(info))
    (run.work_dir / TRAIN_LOG).write_text(json.dumps(log, default=float))
    shutil.rmtree(run.work_dir / "sync", ignore_errors=True)
