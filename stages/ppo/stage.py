"""The ``ppo`` stage driver: rollout engines in Ray actors + one Ray Train job for policy (and critic).

Run it alone with ``rayalign run PIPELINE.yaml --only ppo``; the recipe:

1. load the prompts (``prompts:``, any prompt-only data) once and write them for the workers;
2. start ``rollout.num_engines`` rollout-engine actors (``stages.rollout``: hf or vLLM, in their own
   placement group, or colocated with the trainers) on the starting policy (``from:``, full
   weights), and the reward-model actor when ``reward:`` names a reward stage;
3. submit the held-out prompts (verifier tasks), greedy, first in each engine's queue: the starting
   accuracy once the engines have loaded;
4. ``launcher.launch`` the per-worker loop (``stages.ppo.worker``) with the engine handles at once, so
   that Ray Train starts its workers and they load their models while the engines load (on the demo's
   2 cores, 32 s less per PPO stage); each worker waits for that held-out call before its first engine
   call, so the starting accuracy is always the starting policy's (its samples carry weights version 0);
5. the engines now hold the final policy: score the held-out prompts again;
6. metrics/curves into the manifest (``training_curves.summarize_training``).

TRL has no PPO trainer any more (removed 2026-09), so the PPO loop is ours, built on ``stages.rl``.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import Future

from stages import launcher, training_data
from stages.job import PPOJob
from stages.ppo.config import PPOConfig
from stages.resources import READY_TIMEOUT_S, REWARD, ROLLOUT, STAGE_ACTORS, ready_placement_group, stage_resources
from stages.stage import StageContext, StageResult
from stages.training_curves import summarize_training

# Curves summarised as first/last/mean-of-last-quarter values in the metrics.
SUMMARY = ("reward_mean", "kl", "entropy", "response_length", "value_loss", "explained_variance",
           "rollout_tokens_per_s", "training_tokens_per_s", "sync_seconds", "clip_fraction", "approx_kl")


def run(ctx: StageContext) -> StageResult:
    from stages.ppo.worker import train_ppo_worker

    config: PPOConfig = ctx.config
    check_vllm_lora(config)
    data = training_data.prepare(ctx, config.prompts, "prompt", seed=config.train.seed)
    n_prompts = data.summary["train_records"]
    if config.rollout.prompts_per_step < config.scaling.num_workers:
        raise ValueError(f"rollout.prompts_per_step ({config.rollout.prompts_per_step}) must be >= "
                         f"scaling.num_workers ({config.scaling.num_workers})")
    iterations = config.train.max_steps or math.ceil(config.train.epochs * n_prompts / config.rollout.prompts_per_step)
    model_source = launcher.upstream_full_model(ctx, ctx.inputs["from"])
    reward_dir = str(ctx.inputs["reward"].model_dir) if "reward" in ctx.inputs else None
    ctx.run.connect_ray()
    engines = RolloutEngines(ctx, config, model_source)
    reward_actor = None
    try:
        # The engines load while Ray Train starts its workers (below), not before: each worker waits for
        # them before its first engine call, and so after the starting policy's held-out prompts.
        engines.start()
        if reward_dir and config.reward_placement == "actor":
            from stages.ppo.rewards import start_reward_actor

            reward_actor = start_reward_actor(reward_dir, env_vars=launcher.worker_env(ctx),
                                              **engines.reward_actor_options())
        evaluation = HeldOut.for_config(ctx, config, model_source)
        starting = engines.first_calls(evaluation)
        job = launcher.worker_job(
            ctx, config, model_source, PPOJob,
            train_file=str(data.train_file),
            iterations=iterations,
            critic_source=reward_dir or str(model_source),
            reward_model_dir=reward_dir if config.reward_placement == "worker" else None,
        )
        ctx.log(describe_run(config, iterations, engines))
        try:
            log = launcher.launch(ctx, config, train_ppo_worker, job, engines=engines.workers,
                                  engines_ready=engines.ready_refs, reward_actor=reward_actor)
        except Exception as error:
            failed = engine_start_error(starting)
            if failed is not None:  # an engine that failed to start says why, not the worker that waited for it
                raise failed from error
            raise
        before = starting.result()
        if evaluation and engines.in_worker:  # the held-out engine still holds the starting policy
            engines.group.update_weights(job.model_dir)
        after = evaluation.run(engines.group, weights=job.model_dir) if evaluation else {}
        if after:
            ctx.log(f"held-out accuracy of the trained policy: {after['accuracy']:.1%}")
    finally:
        if reward_actor is not None:  # before its placement group goes with the engines'
            import ray

            ray.kill(reward_actor)
        engines.shutdown()
    info = json.loads((ctx.work_dir / launcher.WORKER_INFO).read_text())
    extra = {**summary_metrics(log["log_history"]),
             **{f"initial_heldout_{k}": v for k, v in before.items()},
             **{f"heldout_{k}": v for k, v in after.items()},
             **{k: v for k, v in info.items() if isinstance(v, (int, float))}}
    result = summarize_training(ctx, config, log, data.summary, extra_metrics=extra)
    result.manifest.update(
        advantage=config.algorithm.advantage, critic=info["critic"], reference=info["reference"],
        rollout_engine=engines.engine_name, sync_method=info.get("sync_method"),
        heldout_source=evaluation.source if evaluation else None,
    )
    return result


def engine_start_error(starting: Future) -> BaseException | None:
    """Why the engines did not start, when they did not (the training workers failed waiting for them)."""
    try:
        return starting.exception(timeout=10)
    except TimeoutError:  # still loading: the training failed for a reason of its own
        return None


def describe_run(config: PPOConfig, iterations: int, engines: RolloutEngines) -> str:
    critic = config.critic_config
    rewards = " + ".join(filter(None, [config.reward_fn, config.reward and f"model:{config.reward}"]))
    return (f"{config.algorithm.advantage} for {iterations} iteration(s): {config.rollout.prompts_per_step} prompts "
            f"x {config.rollout.n} samples per iteration on "
            f"{config.scaling.num_workers if engines.in_worker else len(engines.workers)} {engines.engine_name} engine(s); "
            f"critic {critic.mode if critic else 'none'}; reward {rewards}")


def summary_metrics(history: list[dict]) -> dict:
    """First, last and late-mean (last quarter of the iterations) values of the main curves."""
    out = {}
    for key in SUMMARY:
        values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        if values:
            tail = values[-max(1, len(values) // 4):]
            out.update({f"first_{key}": values[0], f"last_{key}": values[-1], f"late_{key}": sum(tail) / len(tail)})
    methods = {h.get("sync_method") for h in history if h.get("sync_method")}
    if methods:
        out["sync_methods"] = len(methods)
    return out


def check_vllm_lora(config: PPOConfig) -> None:
    """Fail before anything starts when vLLM will serve the adapter and ``peft.r`` is not a rank it accepts."""
    if config.peft.method == "full":
        return
    from stages.rollout import resolve_engine_name, validate_lora_for_vllm

    if config.rollout.engine == "vllm" or (config.rollout.engine == "auto" and resolve_engine_name("auto") == "vllm"):
        validate_lora_for_vllm({"r": config.peft.r}, config.rollout.engine_kwargs.get("max_lora_rank"))


class RolloutEngines:
    """The rollout-engine actors of one stage run (driver side)."""

    def __init__(self, ctx: StageContext, config: PPOConfig, model_source) -> None:
        self.ctx, self.config, self.model_source = ctx, config, str(model_source)
        self.workers: list = []
        self.group = None
        self.placement_group = None
        self.engine_name = config.rollout.engine
        # engine trainer: the workers generate with their own policy; the one actor here (hf) scores the held-out
        # prompts before and after training.
        self.in_worker = config.rollout.engine == "trainer"
        # What the engines and the reward-model actor ask Ray for (stages.resources): one plan for all.
        self.plan = stage_resources(config, ctx.name)

    def engine_kwargs(self) -> dict:
        """The engines' constructor arguments: dtype, LoRA serving, and on GPUs vLLM's memory share,
        ``max_model_len``, sleep mode and TP (``stages.rollout.vllm_settings``); ``rollout.engine_kwargs`` win."""
        from stages.rollout.base import choose_max_lora_rank
        from stages.rollout.vllm_settings import longest_prompt_in_files, vllm_engine_kwargs

        rollout = self.config.rollout
        # "auto" is decided in the engine's actor (bf16 on its GPU, fp32 on a CPU), not on this driver.
        kwargs = {"dtype": {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[
            self.config.train.precision]}
        if self.config.peft.method == "qlora":  # the engines quantize the base as the trainer does
            kwargs["quantized_base"] = self.config.peft.quant_bits
        if self.config.peft.method != "full":
            # Used by vLLM (the hf engine ignores them): LoRA serving with a rank vLLM accepts.
            kwargs.update(enable_lora=True, max_lora_rank=choose_max_lora_rank(self.config.peft.r))
        tp = rollout.tensor_parallel_size  # TP ranks: one-GPU bundles each, vLLM's Ray executor (see start)
        on_gpu = rollout.gpus_per_engine > 0 or tp > 1 or (rollout.colocate and self.config.scaling.use_gpu)
        if on_gpu and getattr(self, "_longest_prompt", None) is None:  # tokenized once per run
            from stages.models import load_tokenizer

            tokenizer = load_tokenizer(self.model_source, self.config.chat_template, self.ctx.run.trust_remote_code)
            data = self.ctx.work_dir / "data"  # what training_data.prepare wrote for the workers
            self._longest_prompt = longest_prompt_in_files([data / "train.jsonl", data / "eval.jsonl"], tokenizer)
        kwargs.update(vllm_engine_kwargs(
            on_gpu=on_gpu, max_new_tokens=rollout.max_new_tokens, colocate=rollout.colocate,
            longest_prompt_tokens=getattr(self, "_longest_prompt", None), tensor_parallel_size=tp,
            gpu_fraction=1.0 if rollout.colocate or tp > 1 else min(1.0, rollout.gpus_per_engine or 1.0)))
        if rollout.colocate and not on_gpu:
            # Rollout and training alternate on the same cores (as in one TRL process): the engine, which
            # reserves no CPUs of its own, runs as many threads as a training worker (ppo_throughput.py).
            kwargs["num_threads"] = max(1, int(self.config.scaling.cpus_per_worker))
        return {**kwargs, **rollout.engine_kwargs}

    def start(self) -> None:
        """One placement group from the plan (the engines' bundles, then the reward actor's), reserved
        with a bounded wait; then the engines in their bundles (colocated ones outside it)."""
        from stages.rollout.actors import RolloutGroup, create_rollout_engines

        rollout, engines = self.config.rollout, self.plan.group(ROLLOUT)
        bundles = self.plan.bundles(STAGE_ACTORS)
        if bundles:
            self.placement_group = ready_placement_group(bundles, f"stage {self.ctx.name!r} (rollout engines and "
                                                                  f"reward-model actor)")
        kwargs = self.engine_kwargs()
        if engines.ranks > 1:  # vLLM's Ray executor places the ranks on the engine's bundles
            kwargs = {"tensor_parallel_size": engines.ranks, "distributed_executor_backend": "ray", **kwargs}
        self.workers = create_rollout_engines(
            1 if self.in_worker else engines.count, "hf" if self.in_worker else rollout.engine, self.model_source,
            num_cpus=engines.cpus, num_gpus=engines.actor_gpus,
            placement_group=self.placement_group if engines.bundles() else None, bundles_per_engine=engines.ranks,
            engine_kwargs=kwargs, env_vars=launcher.worker_env(self.ctx), ready=False,  # see first_calls
            max_restarts=rollout.max_restarts,
            reference=self.config.reference_placement == "engine" and not self.in_worker,
        )
        self.group = RolloutGroup(self.workers)
        self._info = [w.info.remote() for w in self.workers]  # answered once each engine has loaded
        self.ready_refs = list(self._info)  # what the training workers wait for before their first engine call

    def first_calls(self, evaluation: HeldOut | None) -> Future:
        """Submit the starting policy's held-out prompts, first in each engine's queue; the future waits for
        the engines to load (bounded), logs what serves the rollouts, and returns the starting accuracy."""
        from concurrent.futures import ThreadPoolExecutor

        pending = evaluation.submit(self.group) if evaluation else None
        if pending is not None:
            self.ready_refs = list(pending.refs)
        pool = ThreadPoolExecutor(1, thread_name_prefix=f"{self.ctx.name}-engines")
        future = pool.submit(self._when_ready, evaluation, pending)
        pool.shutdown(wait=False)
        return future

    def _when_ready(self, evaluation: HeldOut | None, pending) -> dict:
        from stages.resources import wait_ready

        engines = self.plan.group(ROLLOUT)
        infos = wait_ready(self._info, READY_TIMEOUT_S, f"{len(self.workers)} rollout engine(s) ({engines.describe()})")
        if self.in_worker:
            self.ctx.log("trainer engine: each training worker generates with its own policy (HF generate); "
                         "one colocated hf actor scores the held-out prompts")
        else:
            self.engine_name = infos[0]["engine"]
            self.ctx.log(f"{self.engine_name} engines: {engines.describe()}")
        before = evaluation.collect(pending, self.ctx.log) if evaluation else {}
        if before:
            self.ctx.log(f"held-out accuracy of the starting policy: {before['accuracy']:.1%} "
                         f"({before['prompts']} prompts)")
        return before

    def reward_actor_options(self) -> dict:
        """``start_reward_actor`` resources and placement: its bundle follows the engines' in the group."""
        reward = self.plan.group(REWARD)
        options = {"num_cpus": reward.cpus, "num_gpus": reward.gpus, "timeout_s": READY_TIMEOUT_S}
        if reward.bundles() and self.placement_group is not None:
            options.update(placement_group=self.placement_group, bundle_index=len(self.plan.bundles([ROLLOUT])))
        return options

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
        self.group = self.placement_group = None


class HeldOut:
    """Greedy held-out accuracy of whatever policy the engines hold, with a verifier task."""

    def __init__(self, task, examples: list, tokenizer, source: str, max_new_tokens: int) -> None:
        self.task, self.examples, self.tokenizer = task, examples, tokenizer
        self.source, self.max_new_tokens = source, max_new_tokens

    @classmethod
    def for_config(cls, ctx: StageContext, config: PPOConfig, model_source) -> HeldOut | None:
        from stages.sources import load_records, parse_builtin
        from stages.models import load_tokenizer
        from stages.tasks import TASKS, get_task

        prompts = config.prompts
        builtin = parse_builtin(prompts.path)[0] if prompts.path.startswith("builtin:") else None
        task_name = config.reward_fn if config.reward_fn in TASKS else (builtin if builtin in TASKS else None)
        source = prompts.eval_path or (f"builtin:{builtin}/test" if builtin else None)
        if task_name is None or source is None:
            return None
        examples = list(load_records(ctx.resolve(source), "prompt", format=prompts.format,
                                     limit=config.eval_limit).records)
        tokenizer = load_tokenizer(model_source, config.chat_template, ctx.run.trust_remote_code)
        return cls(get_task(task_name), examples, tokenizer, source, config.rollout.max_new_tokens)

    def submit(self, group):
        """The held-out prompts, greedy, submitted to the engines (``RolloutGroup.start_generate``)."""
        from stages.chat_templates import conversation_ids
        from stages.rollout import SamplingParams

        ids = [conversation_ids(self.tokenizer, [m.to_dict() for m in e.prompt], add_generation_prompt=True)
               for e in self.examples]
        return group.start_generate(ids, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0))

    def collect(self, pending, log) -> dict:
        """The starting policy's accuracy from :meth:`submit`'s call; {} when an engine died meanwhile (its
        restart serves the starting model, but the training workers may already have synced the others)
        or when a sample came from other weights than the starting ones."""
        from stages.rollout.base import EngineRestarted

        try:
            results = pending()
        except EngineRestarted as error:
            log(f"starting accuracy not measured: {error}")
            return {}
        if any(r.weights_version not in (None, 0) for r in results):
            log("starting accuracy not measured: an engine had other weights than the starting ones")
            return {}
        return self.grade(results)

    def run(self, group, weights: str | None = None) -> dict:
        """Greedy accuracy of what the engines hold; ``weights`` (the policy's folder) is sent again to an
        engine that died and was restarted on its starting model meanwhile."""
        from stages.rollout.base import EngineRestarted

        try:
            results = self.submit(group)()
        except EngineRestarted:
            if weights is not None:
                group.update_weights(weights)
            results = self.submit(group)()
        return self.grade(results)

    def grade(self, results: list) -> dict:
        from stages.tasks.grading import grade, verifier_accuracy

        graded = verifier_accuracy(*grade(self.task, self.examples, [r.response_text for r in results]))
        out = {"accuracy": graded["accuracy"], "prompts": graded["n"]}
        if len(graded["categories"]) > 1:
            out.update({f"{category}_accuracy": c["accuracy"] for category, c in graded["categories"].items()})
        return out
