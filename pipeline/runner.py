"""Walk the DAG: fingerprint each stage, skip what is cached, run the rest on Ray, record manifests."""

from __future__ import annotations

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

    A stage another run is writing is waited for (or, with ``wait=False``, an error names that run).
    An ``--only`` stage's upstream must be stored for the current config, unless ``allow_stale_upstream``.
    A stage whose ``gate`` fails stops the stages downstream of it (the others still run), and the run
    ends with :class:`GateFailed`; ``ignore_gates`` logs the failure and goes on.
    """
    the_plan = plan(spec, only=only, inputs=inputs)
    store = ArtifactStore(spec.run_root())
    force = set(force or [])
    artifacts: dict[str, Artifact] = {}
    gated: dict[str, list[str]] = {}  # stage -> its failed gate checks
    blocked: dict[str, str] = {}  # stage not run -> the gated stage upstream of it
    needed = the_plan.dag.upstream_closure(set(the_plan.selected))
    for node in the_plan.dag.order:
        if node not in needed:
            continue
        stopped_by = next((p if p in gated else blocked[p] for p in the_plan.dag.parents[node].values()
                           if p in gated or p in blocked), None)
        if stopped_by is not None:
            blocked[node] = stopped_by
            log(f"{node}: not run: the gate of {stopped_by!r} failed")
            continue
        fp, cached = the_plan.fingerprints[node], the_plan.cached[node]
        if node != BASE and node not in (inputs or {}):
            # Fingerprint against the upstream artifacts actually used (--only may take older ones).
            upstream = {role: artifacts[p].fingerprint for role, p in the_plan.dag.parents[node].items()}
            fp = stage_fingerprint(spec, node, upstream)
            cached = store.find(node, fp)
        if node == BASE and not spec.base.model.startswith("builtin:") and node not in (inputs or {}):
            artifacts[node] = external_base(spec, resolve=True)
        elif node in (inputs or {}):
            log(f"{node}: using --input {cached.path}")
            artifacts[node] = cached
        elif cached is not None and node not in force:
            log(f"{node}: cached ({fp}) at {cached.path}")
            artifacts[node] = cached
        elif node in the_plan.selected or node == BASE:
            # The builtin base is rebuilt when absent: it is cheap and deterministic.
            swept = getattr(spec.stages.get(node), "sweep", None) is not None
            artifacts[node] = run_exclusively(spec, the_plan.dag, node, fp, artifacts, store,
                                              forced=node in force, wait=wait,
                                              run_fn=sweep_runner(spec, the_plan.dag, node, artifacts, store)
                                              if swept else None)
        else:
            artifacts[node] = _upstream_from_store(store, node, fp, allow_stale_upstream)
        if failures := check_gate(spec, node, artifacts[node], store, ignore_gates):
            gated[node] = failures
    if gated:
        raise GateFailed(gated, blocked, artifacts)
    return artifacts


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


