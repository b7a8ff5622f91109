"""Reward sources of a PPO stage: programmatic (in the training worker) and reward models.

* ``reward_fn: addition`` / ``gsm8k`` (any ``stages.tasks`` name): the task's verifier,
  ``task.reward(prompt, response) -> 1.0 / 0.0``;
* ``reward_fn: package.module:function``: called once per batch as
  ``function(prompts=[PromptExample, ...], completions=[str, ...]) -> [float, ...]``
  (``PromptExample.prompt`` holds the messages, ``.answer`` the reference answer, if any);
* ``reward: <reward stage>``: the stage's sequence-classification model scores
  ``prompt messages + {"role": "assistant", "content": response}`` (``stages.reward_scoring``, the
  same scorer the reward stage's held-out metrics and the eval use), either in a Ray actor the
  driver starts (``reward_placement: actor``, one copy, batches
  go over the object store) or loaded in every training worker (``reward_placement: worker``).

With both a reward model and a ``reward_fn`` the score is their sum.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from stages.data.records import PromptExample
from stages.reward_scoring import RewardScorer


def programmatic_reward(spec: str) -> Callable[[list[PromptExample], list[str]], list[float]]:
    """The batch reward function named by ``reward_fn``: a verifier task name or ``module:function``."""
    if ":" in spec:
        module_name, _, function_name = spec.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward_fn {spec!r}: cannot import it ({err})") from err

        def call(prompts: list[PromptExample], completions: list[str]) -> list[float]:
            scores = list(function(prompts=prompts, completions=completions))
            if len(scores) != len(completions):
                raise ValueError(f"reward_fn {spec} returned {len(scores)} scores for {len(completions)} completions")
            return [float(s) for s in scores]

        return call
    from stages.tasks import get_task

    task = get_task(spec)

    def verify(prompts: list[PromptExample], completions: list[str]) -> list[float]:
        return [task.reward(p, c) for p, c in zip(prompts, completions)]

    return verify


def start_reward_actor(model_dir: str, num_cpus: float = 1, num_gpus: float = 0, env_vars: dict | None = None, *,
                       placement_group=None, bundle_index: int = 0, timeout_s: float | None = None):
    """The reward model in a Ray actor (driver side); ``actor.score.remote(conversations)``.

    With ``placement_group`` it runs in bundle ``bundle_index`` (the PPO stage reserves one for it
    beside the engines', so it never waits for resources unbounded); readiness is awaited at most
    ``timeout_s`` (default ``stages.resources.READY_TIMEOUT_S``), then an error names what it asked for.
    """
    import ray

    from stages.resources import READY_TIMEOUT_S, wait_ready

    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if env_vars:
        options["runtime_env"] = {"env_vars": env_vars}
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle_index)
    actor = ray.remote(RewardScorer).options(**options).remote(model_dir, num_threads=max(1, int(num_cpus)))
    try:
        wait_ready([actor.ping.remote()], timeout_s or READY_TIMEOUT_S,
                   f"the reward-model actor ({num_cpus:g} CPU, {num_gpus:g} GPU)")
    except BaseException:
        ray.kill(actor)
        raise
    return actor


class RewardSources:
    """Scores one batch of (prompt, completion) pairs with every configured source (worker side)."""

    def __init__(self, reward_fn: str | None = None, reward_model: Any = None) -> None:
        self.function = programmatic_reward(reward_fn) if reward_fn else None
        # A Ray actor handle, a RewardScorer, or a folder to load one from (placement "worker").
        self.model = RewardScorer(reward_model) if isinstance(reward_model, str) else reward_model
        if self.function is None and self.model is None:
            raise ValueError("no reward source: set reward_fn and/or reward")

    def __call__(self, prompts: list[PromptExample], completions: list[str]) -> tuple[list[float], dict]:
        parts: dict[str, list[float]] = {}
        if self.function is not None:
            parts["verifier"] = self.function(prompts, completions)
        if self.model is not None:
            conversations = [[m.to_dict() for m in p.prompt] + [{"role": "assistant", "content": c}]
                             for p, c in zip(prompts, completions)]
            if isinstance(self.model, RewardScorer):
                parts["reward_model"] = self.model.score(conversations)
            else:
                import ray

                parts["reward_model"] = ray.get(self.model.score.remote(conversations))
        total = [sum(values) for values in zip(*parts.values())]
        return total, parts
