"""The per-worker PPO loop (Ray Train ``train_loop_per_worker``); the driver is ``stages.ppo.stage``.

Each iteration, on every worker, one function per step:

1. :func:`rollout` -- this rank's prompts of the iteration (a seeded permutation; the iteration
   index is the data position) to this rank's rollout engines (Ray actors): ``n`` samples each;
2. :func:`score` -- verifier / ``module:function`` in-process, reward model in an actor or here;
3. :func:`experience` -- old and reference log-probs, values (``stages.ppo.critic``), then advantages
   (``stages.rl.compute_advantages``) with the KL penalty in the reward or in the loss;
4. :func:`update` -- ``ppo_epochs`` passes over shuffled mini-batches: PPO-clip + value loss + entropy
   bonus (+ k3 KL for grpo/rloo) under DeepSpeed ZeRO or DDP;
5. :func:`sync` -- the policy to the engines (``stages.ppo.sync``);
6. :func:`record` -- metrics reduced over ranks -> a JSONL file, TensorBoard, the progress line;
7. :func:`report` -- to Ray Train (``stages.train_session``), with a checkpoint every ``train.save_steps``.
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
from stages.log import progress, stage_log
from stages.ppo import checkpoint as ckpt
from stages.ppo.config import PPOConfig
from stages.ppo.critic import Critic, build_critic, load_critic_model
from stages.ppo.distributed import dist_info, reduce_metrics
from stages.ppo.experience import Batch, Experience, make_experience, pack, response_logprobs
from stages.ppo.policy import ActorCritic, is_peft
from stages.ppo.prompts import PromptPlan, my_engines
from stages.ppo.sync import save_policy, sync_weights
from stages.ppo.tracking import open_tracker
from stages.ppo.trainee import Trainee, place_frozen, zero3_init
from stages.rl import AdaptiveKLController, FixedKLController, aggregate_loss, entropy_from_logits, k3
from stages.rl import explained_variance, ppo_policy_loss

METRICS_FILE = "ppo_metrics.jsonl"
# How each metric combines over ranks (mean where not named): token counts add, wall times take the slowest.
REDUCE_OPS = {"rollout_tokens": "sum", "training_tokens": "sum", "samples": "sum", "rollout_seconds": "max",
              "training_seconds": "max", "sync_seconds": "max", "experience_seconds": "max",
              "iteration_seconds": "max"}


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
    for iteration in range(run.start, job.iterations):
        started = time.perf_counter()
        results, seconds = rollout(run, iteration)
        scores, finished, parts = score(run, iteration, results)
        exp, seconds["experience"] = experience(run, results, scores, finished)
        stats, seconds["training"] = update(run, exp, iteration)
        synced = sync(run, iteration + 1)
        seconds["iteration"] = time.perf_counter() - started
        metrics = record(run, iteration + 1, exp, scores, finished, parts, {**stats, **exp.stats}, seconds, synced)
        report(run, iteration + 1, metrics)
    finish(run)


# --------------------------------------------------------------------------- setup


def start_run(job: PPOJob, config: PPOConfig, tokenizer, args: dict) -> PPORun:
    """Models, optimizers, prompts, engines and reward sources; resumed from a checkpoint if one exists."""
    from stages.ppo.policy import load_policy, load_reference
    from stages.ppo.rewards import RewardSources
    from stages.rollout.local import engine_group

    rank, world = dist_info()
    torch.manual_seed(config.train.seed + rank)
    if config.deepspeed.zero_stage is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if config.scaling.use_gpu else "gloo")
    load = dict(trust_remote_code=job.trust_remote_code)
    zero3 = zero3_init(config, job.precision)  # noqa: F841 - alive while the models load
    policy = load_policy(job.model_source, config.peft, job.precision,
                         gradient_checkpointing=config.train.gradient_checkpointing,
                         zero_stage=config.deepspeed.zero_stage, **load)
    critic_config = config.critic_config
    actor = ActorCritic(policy, value_head=critic_config is not None and critic_config.mode == "shared")
    ref_model = None if is_peft(policy) else load_reference(job.model_source, config.peft, job.precision, **load)
    critic_model = load_critic_model(config, job.critic_source, job.precision, tokenizer.pad_token_id,
                                     job.trust_remote_code)
    rows = [json.loads(line) for line in open(job.train_file)]
    plan = PromptPlan(rows, config.rollout.prompts_per_step, rank, world, config.train.seed)
    total_steps = optimizer_steps(config, job.iterations, plan.per_rank * config.rollout.n)
    policy_trainee = Trainee(actor, config.train.lr, config, job.precision, total_steps)
    algo = config.algorithm
    run = PPORun(
        job=job, config=config, rank=rank, world=world, tokenizer=tokenizer, actor=policy_trainee.module,
        ref_model=ref_model, policy=policy_trainee,
        critic=build_critic(config, critic_model, job.precision, total_steps), plan=plan,
        engines=engine_group(my_engines(args["engines"], rank, world)), all_engines=engine_group(args["engines"]),
        rewards=RewardSources(config.reward_fn, args.get("reward_actor") or job.reward_model_dir),
        kl_ctl=(AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon) if algo.kl_target
                else FixedKLController(algo.kl_coef)),
    )
    if ref_model is not None:  # the frozen copy (full fine-tuning) is placed or sharded like the policy
        run.ref_model = place_frozen(ref_model, config, job.precision, run.device)
    resume(run)
    run.history = load_history(run.work_dir, run.start) if rank == 0 else []
    run.writer = open_tracker(job, run.start) if rank == 0 else None
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
    """``n`` samples for each of this rank's prompts of the iteration; the engines sleep after (colocate)."""
    from stages.chat_templates import conversation_ids
    from stages.rollout import SamplingParams

    rollout_config, seed = run.config.rollout, run.config.train.seed
    indices = run.plan.indices(iteration)
    for i in indices:
        if i not in run.token_cache:
            run.token_cache[i] = conversation_ids(run.tokenizer, run.plan.rows[i]["prompt"], add_generation_prompt=True)
    params = SamplingParams(max_new_tokens=rollout_config.max_new_tokens, temperature=rollout_config.temperature,
                            top_p=rollout_config.top_p, top_k=rollout_config.top_k, n=rollout_config.n,
                            seed=seed * 1_000_003 + iteration * 10_007 + run.rank * 101)
    started = time.perf_counter()
    # The engines hold the weights of step `iteration` (the last sync); a restarted one gets them again.
    results = recovering(run, iteration, lambda: run.engines.generate([run.token_cache[i] for i in indices], params))
    seconds = {"rollout": time.perf_counter() - started}
    if rollout_config.colocate:
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
    engine_logprobs = torch.zeros(batch.mask.shape, dtype=torch.float32)
    for row, r in enumerate(results):
        engine_logprobs[row, :len(r.logprobs)] = torch.tensor(r.logprobs, dtype=torch.float32)
    engine_logprobs = engine_logprobs.to(run.device)
    run.actor.eval()
    run.critic.train(False)
    config = run.config
    exp = make_experience(run.actor, run.critic, run.ref_model, batch, engine_logprobs, scores, finished,
                          config.algorithm, run.kl_ctl.value, config.rollout.n,
                          chunk=max(config.train.batch_size, 16), temperature=config.rollout.temperature)
    return exp, time.perf_counter() - started


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

    if run.config.rollout.colocate and run.rank == 0:
        run.all_engines.wake()
    engines = run.all_engines if run.rank == 0 else None
    for attempt in range(2):
        try:
            synced = sync_weights(run.actor, engines, run.work_dir, step, run.config.rollout.sync)
            return {**synced, **verify_sync(run, step)}
        except EngineRestarted as exc:  # raised on every rank together (see sync_weights, verify_sync)
            if attempt:
                raise
            note_restart(run, exc, step)
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
    if rollout_config.verify_sync == "off":
        return {}
    if run.probe is None:
        from stages.chat_templates import conversation_ids

        prompt = conversation_ids(run.tokenizer, run.plan.rows[0]["prompt"], add_generation_prompt=True)
        run.probe = verify.Probe.build(run.tokenizer, prompt)
    expected = verify.trainer_logprobs(run.actor, run.probe, run.tokenizer.pad_token_id)
    verdict, restarted = None, None
    if run.rank == 0:
        tolerance = rollout_config.verify_tolerance or verify.default_tolerance(run.job.precision)
        try:
            reports = run.all_engines.serving(run.probe.prompt_ids, run.probe.response_ids)
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
    note_restart(run, failure, weights_step)
    sync(run, weights_step)
    return call() if failure is not None else result


def note_restart(run: PPORun, failure, step: int) -> None:
    """Count a restart (rank 0 records the count) and say what happens next."""
    run.engine_restarts += 1
    if failure is not None:
        stage_log(run.job.stage, f"{failure}; sending them the weights of step {step} and retrying", run.started)


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
    loss, stats = ppo_policy_loss(logp, exp.old_logprobs[idx], exp.advantages[idx], mask, clip_eps=algo.clip_eps,
                                  clip_eps_high=algo.clip_eps_high, loss_agg=algo.loss_agg)
    # The entropy bonus needs its gradient only when it is in the loss.
    entropy = entropy_from_logits((logits if algo.entropy_coef else logits.detach()) / temperature, mask)
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


def record(run: PPORun, step: int, exp: Experience, scores: torch.Tensor, finished: torch.Tensor, parts: dict,
           stats: dict, seconds: dict[str, float], synced: dict) -> dict:
    """The iteration's metrics, reduced over ranks; rank 0 appends them to the history, the JSONL file,
    TensorBoard and the log; the adaptive KL controller sees the measured KL."""
    mask = exp.batch.mask
    local = {
        "reward_mean": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "score_mean": float(exp.scores.mean()), "response_length": float(mask.sum(-1).mean()),
        "finished_fraction": float(finished.float().mean()), "kl_coef": float(run.kl_ctl.value),
        "rollout_tokens": float(mask.sum()), "rollout_seconds": seconds["rollout"],
        "training_tokens": float(exp.batch.attention_mask.sum()) * run.config.algorithm.ppo_epochs,
        "training_seconds": seconds["training"], "experience_seconds": seconds["experience"],
        "sync_seconds": synced["sync_seconds"], "lr": run.policy.lr, "iteration_seconds": seconds["iteration"],
        "samples": float(mask.shape[0]), "engine_restarts": float(run.engine_restarts),
        **({"sync_probe_diff": synced["sync_probe_diff"]} if "sync_probe_diff" in synced else {}),
        **{f"reward_{name}_mean": sum(v) / len(v) for name, v in parts.items() if len(parts) > 1},
        **stats,
    }
    if exp.values is not None:
        local["explained_variance"] = float(explained_variance(exp.values, exp.returns, mask))
    metrics = {k: v for k, v in reduce_metrics(local, REDUCE_OPS, run.device).items() if not math.isnan(v)}
    metrics["rollout_tokens_per_s"] = metrics["rollout_tokens"] / max(metrics["rollout_seconds"], 1e-9)
    # (not "train_*": curves_from_history drops those names, they are the HF Trainer's summary keys)
    metrics["training_tokens_per_s"] = metrics["training_tokens"] / max(metrics["training_seconds"], 1e-9)
    metrics["samples_per_s"] = metrics["samples"] / max(metrics["iteration_seconds"], 1e-9)
    run.kl_ctl.update(metrics["kl"], n_steps=run.samples_per_rank * run.world)
    metrics["step"] = step
    entry = {**metrics, "sync_method": synced.get("sync_method", "")}
    if run.rank == 0:
        write_records(run, step, entry)
    return entry


def write_records(run: PPORun, step: int, entry: dict) -> None:
    run.history.append(entry)
    append_metrics(run.work_dir, entry)
    if run.writer is not None:  # stages.ppo.tracking: numbers only, under ppo/
        run.writer.log(entry, step)
    if step % run.config.train.logging_steps == 0 or step == run.job.iterations or step == run.start + 1:
        value_loss = f"value_loss {entry['value_loss']:.4f} " if "value_loss" in entry else ""
        stage_log(run.job.stage, f"iteration {progress(step, run.job.iterations)} reward {entry['reward_mean']:.3f} "
                  f"kl {entry['kl']:.4f} entropy {entry['entropy']:.3f} {value_loss}"
                  f"rollout {entry['rollout_tokens_per_s']:.0f} tok/s sync {entry['sync_seconds']:.2f}s "
                  f"({entry['sync_method']})", run.started)


def report(run: PPORun, step: int, entry: dict) -> None:
    """Report the iteration to Ray Train, with a checkpoint every ``train.save_steps`` (not at the end)."""
    save_steps = run.config.train.save_steps
    if save_steps and step % save_steps == 0 and step < run.job.iterations:
        trainees = {"policy": run.policy, **run.critic.trainees()}
        folder = ckpt.save(run.work_dir, step, trainees, {"kl_coef": float(run.kl_ctl.value)}, run.rank)
        # One rank reports the shared folder, once (ckpt.save ended on a barrier: every shard is written).
        train_session.report(entry, checkpoint_dir=folder if run.rank == 0 else None)
    else:
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
    info = {"reference": "adapter-disabled policy" if run.ref_model is None else "frozen copy",
            "critic": run.critic.mode, "sync_method": run.history[-1].get("sync_method") if run.history else None,
            "engine_restarts": int(run.history[-1].get("engine_restarts", 0)) if run.history else 0,
            **parameter_counts(run.actor, run.critic.module, run.ref_model)}
    (run.work_dir / WORKER_INFO).write_text(json.dumps(info))
    (run.work_dir / TRAIN_LOG).write_text(json.dumps(log, default=float))
    shutil.rmtree(run.work_dir / "sync", ignore_errors=True)


def load_history(work_dir: Path, start: int) -> list[dict]:
    """The metrics of iterations up to ``start`` (a resumed run continues the curves); the file is rewritten."""
    path = work_dir / METRICS_FILE
    history = []
    if path.exists() and start > 0:
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        history = [h for h in history if h.get("step", 0) <= start]
    path.write_text("".join(json.dumps(h) + "\n" for h in history))
    return history


def append_metrics(work_dir: Path, entry: dict) -> None:
    with open(work_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
