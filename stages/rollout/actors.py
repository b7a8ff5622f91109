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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import ray

from stages.rollout.base import (
    EngineRestarted,
    Rollout,
    RolloutEngine,
    SamplingParams,
    SyncInfo,
    create_engine,
    serving_report,
    split_ranges,
    resolve_engine_name,
    vllm_cpu_env_vars,
    vllm_status,
)


class RolloutWorker:
    """Holds one engine. Wrapped with ``ray.remote`` by :func:`create_rollout_engines`."""

    def __init__(self, engine: str, model_path: str, engine_kwargs: dict | None = None,
                 reference: bool = False) -> None:
        from stages.log import configure

        configure()  # before the engine imports its libraries (quiet mode quiets their import-time notices)
        # Ray sets OMP_NUM_THREADS from num_cpus; torch follows it for intra-op threads.
        self.engine_name = resolve_engine_name(engine, model_path)
        if self.engine_name == "vllm" and not vllm_status()[0]:
            raise RuntimeError(
                f"rollout engine 'vllm' asked for, but {vllm_status()[1]}. Without a GPU the vLLM CPU build "
                "lives in .venv-vllm (`make install-vllm`; `make demo` runs there); or set rollout.engine: hf")
        self.engine = create_engine(self.engine_name, model_path, **(engine_kwargs or {}))
        # The frozen starting model, never synced: it scores each rollout for the KL penalty here, on the
        # engine's device, so that the trainer skips that forward (PPOConfig.reference_placement: engine).
        self.reference = create_engine("hf", model_path, **(engine_kwargs or {})) if reference else None
        # Which trainer step's weights the engine holds: 0 = the starting model (also after a restart,
        # which re-runs this constructor). Set only once an update has been applied.
        self.weights_version = 0

    def info(self) -> dict:
        return {
            "engine": self.engine_name,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "python": sys.executable,
            "sleeps": type(self.engine).sleep is not RolloutEngine.sleep,  # False: sleep and wake are no-ops
        }

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str], params: SamplingParams) -> list[Rollout]:
        rollouts = self.engine.generate(prompts, params)
        for rollout in rollouts:  # a restart between two calls shows here: version 0
            rollout.weights_version = self.weights_version
        return rollouts

    def generate_with_reference(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Rollout]:
        """:meth:`generate`, each rollout with the reference's log-probs of its response (``ref_logprobs``)."""
        if self.reference is None:
            raise RuntimeError("generate_with_reference on an engine actor started without reference=True")
        rollouts = self.generate(prompts, params)
        temperature = 1.0 if params.greedy else params.temperature
        scores = self.reference.score([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                                      temperature=temperature)
        for rollout, ref in zip(rollouts, scores):
            rollout.ref_logprobs = ref
        return rollouts

    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        return self.engine.score(prompt_ids, response_ids)

    def update_weights(self, source: Any, version: int | None = None) -> SyncInfo:
        info = self.engine.update_weights(source)
        if version is not None:
            self.weights_version = version
        return info

    def serving(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> dict:
        """What this engine serves now: its weights version, adapter and log-probs of a fixed probe."""
        return serving_report(self.engine, self.weights_version, prompt_ids, response_ids, pid=os.getpid())

    def weight_group_size(self) -> int:
        return self.engine.weight_group_size()

    def join_weight_group(self, host: str, port: int, first_rank: int, world: int, backend: str,
                          timeout_s: float) -> int:
        return self.engine.join_weight_group(host, port, first_rank, world, backend, timeout_s)

    def receive_weights(self, metas: list, bucket_bytes: int, version: int | None = None) -> SyncInfo:
        info = self.engine.receive_weights(metas, bucket_bytes)
        if version is not None:
            self.weights_version = version
        return info

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
    max_restarts: int = 0,
    reference: bool = False,
) -> list:
    """Start ``num_engines`` :class:`RolloutWorker` actors.

    ``num_gpus``: per engine actor. With ``placement_group``, engine ``i`` goes to bundle
    ``bundle_offset + i * bundles_per_engine``; more than one bundle per engine is vLLM tensor
    parallelism: the actor takes no GPU itself (give ``num_gpus=0``) and its rank workers take the
    engine's bundles (``VLLM_RAY_BUNDLE_INDICES``). On machines without GPUs (``num_gpus == 0``, one
    bundle per engine) and for ``engine in ("vllm", "auto")`` the actors get the vLLM CPU env vars.
    ``ready=True`` waits until every engine has loaded (errors surface here), at most
    ``ready_timeout_s`` when given. ``max_restarts``: Ray restarts a dead engine actor this many times
    (on its starting model); its in-flight call fails and :class:`RolloutGroup` reports it as
    :class:`EngineRestarted`, so that the caller can send the current weights and retry.
    ``reference``: each actor also holds the starting model, frozen, as an hf model on its device, to
    score rollouts for the KL penalty (:meth:`RolloutGroup.generate` with ``with_reference``).
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
        options["max_restarts"] = max_restarts  # no task retries: a retried call would run on the old weights
        workers.append(remote_cls.options(**options).remote(engine, str(model_path), engine_kwargs, reference))
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


@dataclass
class WeightLink:
    """The trainer's end of a weight-stream group and the engine processes (pids) it was formed with."""

    pids: tuple[int, ...]
    group: Any  # stages.rollout.weight_stream.WeightGroup (imported lazily: torch)
    timeout_s: float


@dataclass
class PendingGenerate:
    """A generate call on the engines, submitted: calling it waits for the rollouts; ``refs`` (one per engine)
    let another process wait until the engines have served it (``ray.wait``) without fetching them."""

    refs: list
    wait: Callable[[], list]

    def __call__(self) -> list[Rollout]:
        return self.wait()


class RolloutGroup:
    """Driver-side fan-out over rollout actors; results come back in prompt order.

    Prompts are split into contiguous chunks, one per engine. Each chunk's seed is shifted by
    ``chunk_start * n`` so that on vLLM sample ``k`` of the whole call is drawn with ``seed + k``
    whatever the number of engines.
    """

    def __init__(self, workers: Sequence, restart_timeout_s: float = 600) -> None:
        if not workers:
            raise ValueError("RolloutGroup needs at least one worker")
        self.workers = list(workers)
        self.restart_timeout_s = restart_timeout_s
        self._sleeps: bool | None = None  # whether any engine's sleep does something (asked once)

    def __len__(self) -> int:
        return len(self.workers)

    def info(self) -> list[dict]:
        return ray.get([w.info.remote() for w in self.workers])

    def generate(self, prompts: Sequence, params: SamplingParams, with_reference: bool = False) -> list[Rollout]:
        """``with_reference``: each rollout also carries the reference's log-probs (engines started with
        ``reference=True``)."""
        return self.start_generate(prompts, params, with_reference)()

    def start_generate(self, prompts: Sequence, params: SamplingParams,
                       with_reference: bool = False) -> PendingGenerate:
        """:meth:`generate` begun now; the returned call waits for the rollouts (the trainer trains meanwhile:
        ``rollout.off_policy_steps``). An engine that died surfaces there, as :class:`EngineRestarted`."""
        ranges = split_ranges(len(prompts), len(self.workers))
        refs = [(w.generate_with_reference if with_reference else w.generate).remote(
                    list(prompts[a:b]), params.with_seed_offset(a * params.n))
                for w, (a, b) in zip(self.workers, ranges)]
        return PendingGenerate(refs, lambda: [r for chunk in self._gather(refs, "generate") for r in chunk])

    def score(self, prompt_ids: Sequence, response_ids: Sequence) -> list[list[float]]:
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        refs = [
            w.score.remote(list(prompt_ids[a:b]), list(response_ids[a:b]))
            for w, (a, b) in zip(self.workers, split_ranges(len(prompt_ids), len(self.workers)))
        ]
        return [s for chunk in self._gather(refs, "score") for s in chunk]

    def update_weights(self, source: Any, version: int | None = None) -> list[SyncInfo]:
        """The same source on every engine (a path, or a state_dict put in the object store once);
        ``version`` (the trainer's step) is what each engine reports as served once it has applied it."""
        if not isinstance(source, (str, os.PathLike)):
            source = ray.put(source)
        return self._gather([w.update_weights.remote(source, version) for w in self.workers], "update_weights")

    # -- streamed full weights (stages.rollout.weight_stream): no object store, ~one parameter in flight --

    _weight_link: WeightLink | None = None  # the group formed with the engines, kept between syncs

    def prepare_weight_stream(self, backend: str = "gloo", timeout_s: float = 120.0) -> str | None:
        """Form a weight-stream group with every engine's weight-holding processes, or keep the one formed
        before while the same engine processes are alive. Returns None when it is ready, else why not (the
        caller then sends a state_dict): an engine without support, a timeout, a dead actor."""
        try:
            pids = tuple(i["pid"] for i in self.info())  # a restarted actor has a new pid: its group is gone
            link = self._weight_link
            if link is not None and link.pids == pids and link.group.backend == backend:
                return None
            self.close_weight_stream()
            self._weight_link = self._form_weight_link(pids, backend, timeout_s)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure means: use the state_dict path this time
            self.close_weight_stream()
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def _form_weight_link(self, pids: tuple[int, ...], backend: str, timeout_s: float) -> WeightLink:
        from stages.rollout.weight_stream import join_weight_group, open_master_store

        sizes = ray.get([w.weight_group_size.remote() for w in self.workers], timeout=timeout_s)
        world = 1 + sum(sizes)
        host = ray.util.get_node_ip_address()  # this trainer process's node: the store's master
        store = open_master_store(host, world, timeout_s)
        first_ranks = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        joins = [w.join_weight_group.remote(host, store.port, first, world, backend, timeout_s)
                 for w, first in zip(self.workers, first_ranks)]
        group = join_weight_group(host, store.port, 0, world, backend, timeout_s, store=store)  # until all joined
        ray.get(joins, timeout=timeout_s)
        return WeightLink(pids=pids, group=group, timeout_s=timeout_s)

    def stream_weights(self, metas: Sequence[tuple[str, str, tuple[int, ...]]], tensors: Iterable[Any],
                       bucket_bytes: int, version: int | None = None) -> list[SyncInfo]:
        """Broadcast ``tensors`` (in ``metas`` order) to every engine over the group of
        :meth:`prepare_weight_stream`; each engine loads them as they arrive. A failure drops the group
        (the next sync forms a new one) and is raised; ``tensors`` may then be partly consumed."""
        from stages.rollout.weight_stream import send_tensors

        link = self._weight_link
        if link is None:
            raise RuntimeError("stream_weights before a successful prepare_weight_stream")
        refs = [w.receive_weights.remote(list(metas), bucket_bytes, version) for w in self.workers]
        try:
            broadcasts, nbytes = send_tensors(link.group, metas, tensors, bucket_bytes)
            infos = ray.get(refs, timeout=link.timeout_s)
        except Exception:
            self.close_weight_stream()
            raise
        for info in infos:
            info.details.update(broadcasts=broadcasts, bytes=nbytes)
        return infos

    def close_weight_stream(self) -> None:
        if self._weight_link is not None:
            self._weight_link.group.close()
            self._weight_link = None

    def serving(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[dict]:
        """Every engine's weights version, adapter and log-probs of one fixed probe (not split)."""
        return self.start_serving(prompt_ids, response_ids)()

    def start_serving(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Callable[[], list[dict]]:
        """:meth:`serving` begun now; the returned call waits for the reports (the trainer computes its own
        probe meanwhile)."""
        refs = [w.serving.remote(list(prompt_ids), list(response_ids)) for w in self.workers]
        return lambda: self._gather(refs, "serving")

    def _gather(self, refs: list, call: str) -> list:
        """``ray.get`` the engines' results; an engine actor that died is waited for (Ray restarts it on
        its starting model) and reported as :class:`EngineRestarted`, after every other call finished."""
        from ray.exceptions import RayActorError

        results, dead = [], []
        for index, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except RayActorError as exc:
                results.append(None)
                dead.append((index, exc))
        if not dead:
            return results
        for index, _ in dead:
            self._wait_restarted(index)
        index, exc = dead[0]
        raise EngineRestarted([i for i, _ in dead], call, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    def _wait_restarted(self, index: int) -> None:
        """Block until engine ``index`` answers again (while Ray restarts it, calls fail at once with
        ``ActorUnavailableError``); a clear error when it died for good or did not come back in time."""
        import time

        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                ray.get(self.workers[index].info.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorUnavailableError as exc:  # restarting: the constructor runs again
                if time.monotonic() > deadline:
                    raise self._not_back(index, exc) from exc
                time.sleep(1.0)
            except (ActorDiedError, GetTimeoutError) as exc:
                raise self._not_back(index, exc) from exc

    def _not_back(self, index: int, exc: Exception) -> RuntimeError:
        return RuntimeError(
            f"rollout engine {index} died and did not come back within {self.restart_timeout_s:.0f} s "
            f"(rollout.max_restarts may be used up): {type(exc).__name__}: {exc}")

    def sleep(self) -> None:
        if self._can_sleep():
            ray.get([w.sleep.remote() for w in self.workers])

    def wake(self) -> None:
        if self._can_sleep():
            ray.get([w.wake.remote() for w in self.workers])

    def _can_sleep(self) -> bool:
        """Skips two Ray round trips per iteration where sleep is a no-op (hf engines on CPU: colocate)."""
        if self._sleeps is None:
            self._sleeps = any(i.get("sleeps", True) for i in self.info())
        return self._sleeps

    def shutdown(self) -> None:
        """Close every engine and kill the actors."""
        try:
            ray.get([w.close.remote() for w in self.workers], timeout=60)
        except Exception:  # noqa: BLE001 - kill anyway
            pass
        for w in self.workers:
            ray.kill(w)
        self.workers = []
