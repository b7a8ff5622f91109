"""What a PPO worker asks its rollout engines for, and the one-step-ahead rollouts of
``rollout.off_policy_steps: 1``.

On policy, an iteration generates, then trains, then syncs: the engines idle while the trainer trains,
and the trainer idles while they generate. One step ahead, the next iteration's prompts go to the
engines as soon as this iteration's samples are in, so generation runs during scoring, experience and
the update; the worker waits for them (:func:`settle`) before the weights change, and the iteration
takes about max(generate, train) + sync. The price: each iteration trains on samples of the policy
one update old, which ``algorithm.tis_cap`` can correct for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from stages.log import stage_log


@dataclass
class Ahead:
    """The rollouts of ``iteration``, submitted while the previous iteration trains."""

    iteration: int
    pending: Callable[[], list] | None  # waits for the engines (RolloutGroup.start_generate)
    submitted: float
    results: list | None = None
    waited: float = 0.0  # what the trainer spent waiting for them
    generated: float = 0.0  # from submission until they were in (at least the engines' time)

    def take(self) -> tuple[list, dict[str, float]]:
        return self.results, {"rollout": self.waited, "generate": self.generated, "lag": 1.0}


def prompt_ids(run, iteration: int) -> list[list[int]]:
    """The token ids of this rank's prompts of ``iteration`` (chat template applied; cached by row)."""
    from stages.chat_templates import conversation_ids

    ids = []
    for i in run.plan.indices(iteration):
        if i not in run.token_cache:
            run.token_cache[i] = conversation_ids(run.tokenizer, run.plan.rows[i]["prompt"], add_generation_prompt=True)
        ids.append(run.token_cache[i])
    return ids


def sampling_params(run, iteration: int):
    """The iteration's sampling settings; its seed depends on the run's seed, the iteration and the rank only,
    so a sample is the same whether it was generated ahead or not."""
    from stages.rollout import SamplingParams

    rollout, seed = run.config.rollout, run.config.train.seed
    return SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                          top_p=rollout.top_p, top_k=rollout.top_k, n=rollout.n,
                          seed=seed * 1_000_003 + iteration * 10_007 + run.rank * 101)


def check_weights(results: list, step: int) -> list:
    """``results`` when every sample came from the weights of ``step``; else :class:`EngineRestarted`, so that
    the caller sends the current weights and generates again: an engine that Ray restarted between two calls
    (no call failed) serves its starting model, version 0, until the next sync."""
    from stages.rollout.base import EngineRestarted

    stale = sorted({r.weights_version for r in results} - {step, None})
    if stale:
        raise EngineRestarted([], "the previous step", f"samples came from the weights of step "
                              f"{', '.join(map(str, stale))}, not step {step}")
    return results


def submit_ahead(run, iteration: int) -> Ahead | None:
    """Start generating ``iteration``'s samples on this rank's engines (which still hold the weights of the
    iteration being trained); None when on policy or past the last iteration."""
    if not run.config.rollout.off_policy_steps or iteration >= run.job.iterations:
        return None
    pending = run.engines.start_generate(prompt_ids(run, iteration), sampling_params(run, iteration),
                                         with_reference=run.config.reference_placement == "engine")
    return Ahead(iteration, pending, time.perf_counter())


def settle(run, ahead: Ahead | None) -> Ahead | None:
    """Wait for the samples generated ahead, on every rank, before rank 0 changes the engines' weights
    (collective: it doubles as the barrier that keeps a sync from overtaking another rank's generate).
    None when an engine of any rank died meanwhile: the next iteration then generates after the sync,
    on the restarted engines (counted like every restart)."""
    from stages.ppo.distributed import any_rank
    from stages.rollout.base import EngineRestarted

    if ahead is None:
        return None
    started = time.perf_counter()
    try:
        # The engines held the weights of the iteration being trained, one step before the samples' own.
        ahead.results, failure = check_weights(ahead.pending(), ahead.iteration - 1), None
    except EngineRestarted as exc:
        failure = exc
    ahead.pending = None
    ahead.waited, ahead.generated = time.perf_counter() - started, time.perf_counter() - ahead.submitted
    if not any_rank(failure is not None, run.device):
        return ahead
    note_restart(run, failure, f"generating iteration {ahead.iteration + 1} again after the sync")
    return None


def note_restart(run, failure, what_next: str) -> None:
    """Count a restart (rank 0 records the count) and say what happens next."""
    run.engine_restarts += 1
    if failure is not None:
        stage_log(run.job.stage, f"{failure}; {what_next}", run.started)


def wait_for_engines(ready: list, engines, config) -> None:
    """Block until the engines have loaded and served the driver's first calls (``ready``: the starting
    policy's held-out prompts), at most ``READY_TIMEOUT_S``; then check that vLLM accepts the LoRA rank. The
    driver does not wait for the engines before it starts the training workers: both load at once."""
    if ready:  # ray.wait: an engine that failed counts as done, and its error surfaces on the first call
        import ray  # only here: a standalone worker (engines in its process) may run where Ray is not installed

        from stages.resources import READY_TIMEOUT_S, PlacementTimeout

        done, _ = ray.wait(ready, num_returns=len(ready), timeout=READY_TIMEOUT_S, fetch_local=False)
        if len(done) < len(ready):
            raise PlacementTimeout(f"{len(ready) - len(done)} of {len(ready)} rollout engine call(s) not answered "
                                   f"after {READY_TIMEOUT_S:.0f}s: an engine is still loading, or Ray cannot place it")
    if config.peft.method != "full":  # "auto" resolves in the engine's actor: check the rank where it is vLLM
        from stages.rollout import validate_lora_for_vllm
        from stages.rollout.base import choose_max_lora_rank

        if any(info["engine"] == "vllm" for info in engines.info()):  # engines: RolloutGroup or LocalEngines
            validate_lora_for_vllm({"r": config.peft.r},
                                   config.rollout.engine_kwargs.get("max_lora_rank", choose_max_lora_rank(config.peft.r)))
