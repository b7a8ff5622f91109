"""Rollout engines inside Ray actors, and a driver-side group that splits work across them.

    import ray
    from stages.rollout import SamplingParams
    from stages.rollout.actors import RolloutGroup, create_rollout_engines

    workers = create_rollout_engines(2, "auto", "models/tiny-llama", num_cpus=1)
    group = RolloutGroup(workers)
    rollouts = group.generate(prompts, SamplingParams(max_new_tokens=32, n=4, seed=0))  # in order
    group.update_weights("runs/step-10/adapter")
    group.shutdown()

The engine (``"hf"``, ``"vllm"`` or ``"auto"``) is resolved *inside* the actor, so ``"auto"`` picks
vLLM only when ``import vllm`` works in the actor's environment. Actors that may run vLLM on a
machine without GPUs get the CPU build's env vars (``LD_PRELOAD=<venv>/lib/libiomp5.so`` when that
file exists, ``VLLM_CPU_KVCACHE_SPACE``) in their ``runtime_env``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import ray

from stages.rollout.base import (
    Rollout,
    SamplingParams,
    SyncInfo,
    create_engine,
    split_ranges,
    resolve_engine_name,
    vllm_cpu_env_vars,
)


class RolloutWorker:
    """Holds one engine. Wrapped with ``ray.remote`` by :func:`create_rollout_engines`."""

    def __init__(self, engine: str, model_path: str, engine_kwargs: dict | None = None) -> None:
        from stages.log import configure

        configure()  # before the engine imports its libraries (quiet mode quiets their import-time notices)
        # Ray sets OMP_NUM_THREADS from num_cpus; torch follows it for intra-op threads.
        self.engine_name = resolve_engine_name(engine)
        self.engine = create_engine(self.engine_name, model_path, **(engine_kwargs or {}))

    def info(self) -> dict:
        return {
            "engine": self.engine_name,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "python": sys.executable,
        }

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str], params: SamplingParams) -> list[Rollout]:
        return self.engine.generate(prompts, params)

    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        return self.engine.score(prompt_ids, response_ids)

    def update_weights(self, source: Any) -> SyncInfo:
        return self.engine.update_weights(source)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()


def rollout_placement_group(
    num_engines: int, num_cpus: float = 1, num_gpus: float = 0, strategy: str = "PACK", timeout_s: float = 120
):
    """A ready placement group with one bundle per engine (``{"CPU": num_cpus, "GPU": num_gpus}``); an
    error naming the bundles after ``timeout_s``. A stage places from its plan (``stages.resources``)."""
    from stages.resources import ready_placement_group

    bundle = {"CPU": num_cpus}
    if num_gpus:
        bundle["GPU"] = num_gpus
    return ready_placement_group([dict(bundle) for _ in range(num_engines)], f"{num_engines} rollout engine(s)",
                                 timeout_s=timeout_s, strategy=strategy)


def create_rollout_engines(
    num_engines: int,
    engine: str,
    model_path: str,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    placement_group=None,
    bundle_offset: int = 0,
    bundles_per_engine: int = 1,
    engine_kwargs: dict | None = None,
    env_vars: dict[str, str] | None = None,
    kv_cache_gib: int = 1,
    ready: bool = True,
    ready_timeout_s: float | None = None,
) -> list:
    """Start ``num_engines`` :class:`RolloutWorker` actors.

    ``num_gpus``: per engine actor. With ``placement_group``, engine ``i`` goes to bundle
    ``bundle_offset + i * bundles_per_engine``; more than one bundle per engine is vLLM tensor
    parallelism: the actor takes no GPU itself (give ``num_gpus=0``) and its rank workers take the
    engine's bundles (``VLLM_RAY_BUNDLE_INDICES``). On machines without GPUs (``num_gpus == 0``, one
    bundle per engine) and for ``engine in ("vllm", "auto")`` the actors get the vLLM CPU env vars.
    ``ready=True`` waits until every engine has loaded (errors surface here), at most
    ``ready_timeout_s`` when given.
    """
    if num_engines < 1:
        raise ValueError("num_engines must be >= 1")
    env = {}
    if engine in ("vllm", "auto") and not num_gpus and bundles_per_engine == 1:
        env.update(vllm_cpu_env_vars(kv_cache_gib=kv_cache_gib))
    env.update(env_vars or {})
    remote_cls = ray.remote(RolloutWorker)
    workers = []
    for i in range(num_engines):
        first = bundle_offset + i * bundles_per_engine
        options = _engine_options(num_cpus, num_gpus, env, placement_group, first, bundles_per_engine)
        workers.append(remote_cls.options(**options).remote(engine, str(model_path), engine_kwargs))
    if ready and ready_timeout_s is not None:
        from stages.resources import wait_ready

        wait_ready([w.info.remote() for w in workers], ready_timeout_s,
                   f"{num_engines} rollout engine(s) ({num_cpus:g} CPU, {num_gpus:g} GPU each)")
    elif ready:
        ray.get([w.info.remote() for w in workers])
    return workers


def _engine_options(num_cpus: float, num_gpus: float, env: dict[str, str], placement_group, first_bundle: int,
                    bundles: int) -> dict[str, Any]:
    """One engine actor's Ray options: its resources, env vars, and its bundle(s) of the placement group."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if bundles > 1:  # vLLM places its tensor-parallel workers on these bundles of the captured group
        env = {**env, "VLLM_RAY_BUNDLE_INDICES": ",".join(str(first_bundle + r) for r in range(bundles))}
    if env:
        options["runtime_env"] = {"env_vars": env}
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group,
            placement_group_bundle_index=first_bundle,
            placement_group_capture_child_tasks=True,
        )
    return options


class RolloutGroup:
    """Driver-side fan-out over rollout actors; results come back in prompt order.

    Prompts are split into contiguous chunks, one per engine. Each chunk's seed is shifted by
    ``chunk_start * n`` so that on vLLM sample ``k`` of the whole call is drawn with ``seed + k``
    whatever the number of engines.
    """

    def __init__(self, workers: Sequence) -> None:
        if not workers:
            raise ValueError("RolloutGroup needs at least one worker")
        self.workers = list(workers)

    def __len__(self) -> int:
        return len(self.workers)

    def info(self) -> list[dict]:
        return ray.get([w.info.remote() for w in self.workers])

    def generate(self, prompts: Sequence, params: SamplingParams) -> list[Rollout]:
        refs = [
            w.generate.remote(list(prompts[a:b]), params.with_seed_offset(a * params.n))
            for w, (a, b) in zip(self.workers, split_ranges(len(prompts), len(self.workers)))
        ]
        return [r for chunk in ray.get(refs) for r in chunk]

    def score(self, prompt_ids: Sequence, response_ids: Sequence) -> list[list[float]]:
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        refs = [
            w.score.remote(list(prompt_ids[a:b]), list(response_ids[a:b]))
            for w, (a, b) in zip(self.workers, split_ranges(len(prompt_ids), len(self.workers)))
        ]
        return [s for chunk in ray.get(refs) for s in chunk]

    def update_weights(self, source: Any) -> list[SyncInfo]:
        """The same source on every engine (a path, or a state_dict put in the object store once)."""
        if not isinstance(source, (str, os.PathLike)):
            source = ray.put(source)
        return ray.get([w.update_weights.remote(source) for w in self.workers])

    def sleep(self) -> None:
        ray.get([w.sleep.remote() for w in self.workers])

    def wake(self) -> None:
        ray.get([w.wake.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Close every engine and kill the actors."""
        try:
            ray.get([w.close.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001 - kill anyway
            pass
        for w in self.workers:
            ray.kill(w)
        self.workers = []
