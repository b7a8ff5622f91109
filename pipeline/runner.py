"""Walk the DAG: fingerprint each stage, skip what is cached, run the rest on Ray, record manifests."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.dag import BASE, DAG, build_dag
from pipeline.gating import check_gate, gate_failure_message
from pipeline.spec import PipelineSpec
from pipeline.staleness import why_stale
from pipeline.stage_run import (RunError, data_fingerprint, fingerprint_parts, run_exclusively, run_services,
                                stage_fingerprint)
from pipeline.store import Artifact, ArtifactStore, fingerprint
from pipeline.sweep import sweep_runner
from stages.log import log

__all__ = ["GateFailed", "Plan", "RunError", "data_fingerprint", "fingerprint_parts", "plan", "run_pipeline",
           "run_services", "stage_fingerprint"]


class GateFailed(RunError):
    """A stage's gate failed: its artifact is stored, the stages downstream of it did not run."""

    def __init__(self, gated: dict[str, list[str]], blocked: dict[str, str], artifacts: dict[str, Artifact]):
        super().__init__(gate_failure_message(gated, blocked, artifacts))
        self.gated, self.blocked, self.artifacts = gated, blocked, artifacts


@dataclass
class Plan:
    """What a run would do: each node's fingerprint and whether its artifact already exists."""

    dag: DAG
    fingerprints: dict[str, str] = field(default_factory=dict)
    cached: dict[str, Artifact | None] = field(default_factory=dict)
    why_stale: dict[str, list[str]] = field(default_factory=dict)  # node -> what changed since it last ran
    selected: list[str] = field(default_factory=list)  # nodes this run executes (or takes from cache)


def plan(spec: PipelineSpec, only: list[str] | None = None, inputs: dict[str, str] | None = None) -> Plan:
    dag = build_dag(spec)
    store = ArtifactStore(spec.run_root())
    inputs = inputs or {}
    for stage in [*(only or []), *inputs]:
        if stage not in dag.order:
            raise RunError(f"{stage!r} is not a stage of this pipeline (stages: {', '.join(dag.order)})")
    result = Plan(dag=dag, selected=list(only) if only else [n for n in dag.order if n not in inputs])
    for node in dag.order:
        if node in inputs:
            artifact = Artifact.external(node, inputs[node])
            result.fingerprints[node], result.cached[node] = artifact.fingerprint, artifact
            continue
        if node == BASE and not spec.base.model.startswith("builtin:"):
            artifact = external_base(spec)
            result.fingerprints[node], result.cached[node] = artifact.fingerprint, artifact
            continue
        upstream = {role: result.fingerprints[parent] for role, parent in dag.parents[node].items()}
        parts = fingerprint_parts(spec, node, upstream)
        fp = fingerprint(parts)
        result.fingerprints[node] = fp
        result.cached[node] = store.find(node, fp)
        if result.cached[node] is None:
            result.why_stale[node] = why_stale(parts, store.latest(node))
    return result


def external_base(spec: PipelineSpec, resolve: bool = False) -> Artifact:
    """A hub id or local folder as the base node. With ``resolve`` and a ``base.revision``, the hub id is
    resolved here, once, to the local snapshot of that revision, and every stage loads that folder; on
    a cluster, HF_HOME must then be a path every node sees (``rayalign k8s`` puts it on the claim)."""
    location = spec.resolve_path(spec.base.model)
    artifact = Artifact.external(BASE, location, spec.base.revision)
    if resolve and spec.base.revision and not Path(location).is_dir():
        from huggingface_hub import snapshot_download

        try:
            snapshot = snapshot_download(location, revision=spec.base.revision)
        except Exception as err:  # noqa: BLE001 - offline and not cached, unknown revision, no access
            raise RunError(f"base.model {location!r} at base.revision {spec.base.revision!r} cannot be loaded: "
                           f"{type(err).__name__}: {err}") from err
        log(f"base: {location} at revision {spec.base.revision} -> {snapshot}")
        artifact.manifest.update(model_dir=snapshot, revision=spec.base.revision)
    return artifact


def run_pipeline(
    spec: PipelineSpec,
    *,
    only: list[str] | None = None,
    force: list[str] | None = None,
    inputs: dict[str, str] | None = None,
    wait: bool = True,
    allow_stale_upstream: bool = False,
    ignore_gates: bool = False,
) -> dict[str, Artifact]:
    """Run the stages of a pipeline in dependency order; returns node -> artifact.

    Up to ``spec.max_concurrent_stages`` stages whose upstream is ready run at once (each on its own driver
    thread, each waiting for its Ray resources); with 1, one at a time in the DAG's order. After a stage
    fails, no new stage starts: the running ones finish and are stored, then the first failure is raised.
    A stage another run is writing is waited for (or, with ``wait=False``, an error names that run).
    An ``--only`` stage's upstream must be stored for the current config, unless ``allow_stale_upstream``.
    A stage whose ``gate`` fails stops the stages downstream of it (the others still run), and the run
    ends with :class:`GateFailed`; ``ignore_gates`` logs the failure and goes on.
    """
    walk = _Walk(spec, plan(spec, only=only, inputs=inputs), inputs or {}, set(force or []), wait,
                 allow_stale_upstream, ignore_gates)
    walk.run()
    if walk.gated:
        raise GateFailed(walk.gated, walk.blocked, walk.artifacts)
    return walk.artifacts


class _Walk:
    """One run of :func:`run_pipeline`: what is settled (stored, taken, blocked), what runs, what waits."""

    def __init__(self, spec: PipelineSpec, the_plan: Plan, inputs: dict[str, str], force: set[str], wait: bool,
                 allow_stale_upstream: bool, ignore_gates: bool):
        self.spec, self.plan, self.inputs, self.force, self.wait = spec, the_plan, inputs, force, wait
        self.allow_stale_upstream, self.ignore_gates = allow_stale_upstream, ignore_gates
        self.store = ArtifactStore(spec.run_root())
        self.artifacts: dict[str, Artifact] = {}
        self.gated: dict[str, list[str]] = {}  # stage -> its failed gate checks
        self.blocked: dict[str, str] = {}  # stage not run -> the gated stage upstream of it
        needed = the_plan.dag.upstream_closure(set(the_plan.selected))
        self.waiting = [node for node in the_plan.dag.order if node in needed]

    def run(self) -> None:
        limit = self.spec.max_concurrent_stages
        if limit == 1:  # on this thread, so that Ray Train's Ctrl-C handler (main thread only) stops the stage
            while self.waiting:
                node = self.waiting.pop(0)
                self.settle(node, self.start(node)())
            return
        with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="rayalign-stage") as pool:
            try:
                self.run_concurrently(pool, limit)
            except KeyboardInterrupt:
                # Ray Train stops a run on Ctrl-C only from the main thread: end the stages' Ray work here.
                log("interrupted: stopping the running stages; a rerun resumes them from their checkpoints")
                pool.shutdown(wait=False, cancel_futures=True)
                import ray

                ray.shutdown()
                raise

    def run_concurrently(self, pool: ThreadPoolExecutor, limit: int) -> None:
        running: dict[Future, str] = {}
        failed: dict[str, Exception] = {}
        while True:
            while not failed and len(running) < limit and (node := self.next_ready()) is not None:
                self.waiting.remove(node)
                job = self.start(node)
                if job.run is None:  # stored, taken as input, or blocked: settled without running
                    self.settle(node, job.done)
                else:
                    running[pool.submit(job.run)] = node
            if not running:
                break
            done, _ = futures_wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                node = running.pop(future)
                try:
                    self.settle(node, future.result())
                except Exception as err:  # noqa: BLE001 - the first failure is raised once the others finish
                    failed[node] = err
                    if running:
                        log(f"{node}: failed; waiting for {', '.join(running.values())} to finish, starting "
                            f"nothing new")
        if failed:
            first = min(failed, key=self.plan.dag.order.index)
            if self.waiting:
                log(f"not started after {first!r} failed: {', '.join(self.waiting)}")
            raise failed[first]

    def next_ready(self) -> str | None:
        """The first waiting stage (in DAG order) whose upstream stages are all settled."""
        settled = set(self.artifacts) | set(self.blocked)
        for node in self.waiting:
            if set(self.plan.dag.parents[node].values()) <= settled:
                return node
        return None

    def start(self, node: str) -> "_Job":
        """What settles ``node``: an artifact at hand, nothing (a gate upstream failed), or a run to call."""
        dag, spec, store = self.plan.dag, self.spec, self.store
        stopped_by = next((p if p in self.gated else self.blocked[p] for p in dag.parents[node].values()
                           if p in self.gated or p in self.blocked), None)
        if stopped_by is not None:
            self.blocked[node] = stopped_by
            log(f"{node}: not run: the gate of {stopped_by!r} failed")
            return _Job()
        fp, cached = self.plan.fingerprints[node], self.plan.cached[node]
        if node != BASE and node not in self.inputs:
            # Fingerprint against the upstream artifacts actually used (--only may take older ones).
            upstream = {role: self.artifacts[p].fingerprint for role, p in dag.parents[node].items()}
            fp = stage_fingerprint(spec, node, upstream)
            cached = store.find(node, fp)
        if node == BASE and not spec.base.model.startswith("builtin:") and node not in self.inputs:
            return _Job(run=lambda: external_base(spec, resolve=True))
        if node in self.inputs:
            log(f"{node}: using --input {cached.path}")
            return _Job(done=cached)
        if cached is not None and node not in self.force:
            log(f"{node}: cached ({fp}) at {cached.path}")
            return _Job(done=cached)
        if node in self.plan.selected or node == BASE:
            # The builtin base is rebuilt when absent: it is cheap and deterministic.
            upstream = dict(self.artifacts)  # this stage's view, fixed while other stages settle
            return _Job(run=lambda: self.run_stage(node, fp, upstream))
        return _Job(done=_upstream_from_store(store, node, fp, self.allow_stale_upstream))

    def run_stage(self, node: str, fp: str, upstream: dict[str, Artifact]) -> Artifact:
        spec, dag = self.spec, self.plan.dag
        swept = getattr(spec.stages.get(node), "sweep", None) is not None
        run_fn = sweep_runner(spec, dag, node, upstream, self.store) if swept else None
        return run_exclusively(spec, dag, node, fp, upstream, self.store, forced=node in self.force, wait=self.wait,
                               run_fn=run_fn)

    def settle(self, node: str, artifact: Artifact | None) -> None:
        if artifact is None:  # blocked (recorded by start)
            return
        self.artifacts[node] = artifact
        if failures := check_gate(self.spec, node, artifact, self.store, self.ignore_gates):
            self.gated[node] = failures


@dataclass
class _Job:
    """How a stage settles: ``run()`` returns its artifact; without ``run``, ``done`` is it (None: blocked)."""

    done: Artifact | None = None
    run: Callable[[], Artifact] | None = None

    def __call__(self) -> Artifact | None:
        return self.done if self.run is None else self.run()


def _upstream_from_store(store: ArtifactStore, node: str, fp: str, allow_stale: bool) -> Artifact:
    """An upstream of an ``--only`` stage: the artifact of the current config, else (opted in) the newest."""
    artifact = store.find(node, fp)
    if artifact is not None:
        log(f"{node}: using stored artifact {fp}")
        return artifact
    candidates = store.complete(node)
    if candidates and allow_stale:
        log(f"{node}: no artifact for the current config ({fp}); --allow-stale-upstream: using the newest "
            f"stored one, {candidates[0].fingerprint}")
        return candidates[0]
    if candidates:
        listed = ", ".join(f"{a.fingerprint} (finished {a.manifest.get('finished', '?')})" for a in candidates[:5])
        raise RunError(
            f"stage {node!r} is needed upstream, and the store has no artifact for its current config ({fp}). "
            f"Stored: {listed}. Run it too (add it to --only), pass --allow-stale-upstream to use the newest, "
            f"or --input {node}=PATH"
        )
    raise RunError(
        f"stage {node!r} is needed upstream but has no complete artifact in {store.stage_dir(node)}; "
        f"run it first, or pass --input {node}=PATH (an existing HF folder)"
    )


