"""Walk the DAG: fingerprint each stage, skip what is cached, run the rest on Ray, record manifests."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cluster import stage_connector
from pipeline.dag import BASE, DAG, build_dag
from pipeline.spec import PipelineSpec
from pipeline.store import Artifact, ArtifactStore, fingerprint, library_versions, now, rayalign_version, write_json
from stages.log import log
from stages.registry import stage_kind
from stages.resources import InsufficientResources, StageResources, stage_resources
from stages.stage import RunServices, StageContext, Stopwatch, data_sources


class RunError(RuntimeError):
    """A stage could not run (missing upstream, failed training); names the stage."""


@dataclass
class Plan:
    """What a run would do: each node's fingerprint and whether its artifact already exists."""

    dag: DAG
    fingerprints: dict[str, str] = field(default_factory=dict)
    cached: dict[str, Artifact | None] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)  # nodes this run executes (or takes from cache)


def stage_fingerprint(spec: PipelineSpec, node: str, upstream: dict[str, str]) -> str:
    """Hash of everything that determines a stage's output: config, upstream outputs, data, code version."""
    if node == BASE:
        from stages.pretrained import BUILTIN_BASES

        recipe = BUILTIN_BASES.get(spec.base.model.removeprefix("builtin:"))
        payload = {"base": spec.base.model_dump(), "recipe": recipe, "version": rayalign_version()}
        return fingerprint(payload)
    config = spec.stages[node]
    data = {name: data_fingerprint(spec.resolve_path(d.path)) for name, (d, _) in data_sources(config).items()}
    payload = {
        "config": config.model_dump(mode="json", by_alias=True),
        "upstream": upstream,
        "data": data,
        "version": rayalign_version(),
    }
    return fingerprint(payload)


def data_fingerprint(path: str) -> str:
    """Content hash of a data source; for builtin tasks, the task's version and parameters."""
    from stages.sources import fingerprint_source

    return fingerprint_source(path)


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
            artifact = Artifact.external(BASE, spec.resolve_path(spec.base.model))
            result.fingerprints[node], result.cached[node] = artifact.fingerprint, artifact
            continue
        upstream = {role: result.fingerprints[parent] for role, parent in dag.parents[node].items()}
        fp = stage_fingerprint(spec, node, upstream)
        result.fingerprints[node] = fp
        result.cached[node] = store.find(node, fp)
    return result


def run_pipeline(
    spec: PipelineSpec,
    *,
    only: list[str] | None = None,
    force: list[str] | None = None,
    inputs: dict[str, str] | None = None,
) -> dict[str, Artifact]:
    """Run the stages of a pipeline in dependency order; returns node -> artifact."""
    the_plan = plan(spec, only=only, inputs=inputs)
    store = ArtifactStore(spec.run_root())
    force = set(force or [])
    artifacts: dict[str, Artifact] = {}
    needed = the_plan.dag.upstream_closure(set(the_plan.selected))
    for node in the_plan.dag.order:
        if node not in needed:
            continue
        fp, cached = the_plan.fingerprints[node], the_plan.cached[node]
        if node != BASE and node not in (inputs or {}):
            # Fingerprint against the upstream artifacts actually used (--only may take older ones).
            upstream = {role: artifacts[p].fingerprint for role, p in the_plan.dag.parents[node].items()}
            fp = stage_fingerprint(spec, node, upstream)
            cached = store.find(node, fp)
        if node == BASE and not spec.base.model.startswith("builtin:") and node not in (inputs or {}):
            artifacts[node] = Artifact.external(BASE, spec.resolve_path(spec.base.model))
        elif node in (inputs or {}):
            log(f"{node}: using --input {cached.path}")
            artifacts[node] = cached
        elif cached is not None and node not in force:
            log(f"{node}: cached ({fp}) at {cached.path}")
            artifacts[node] = cached
        elif node in the_plan.selected or node == BASE:
            # The builtin base is rebuilt when absent: it is cheap and deterministic.
            artifacts[node] = run_stage(spec, the_plan.dag, node, fp, artifacts, store)
        else:
            artifacts[node] = _upstream_from_store(store, node, fp)
    return artifacts


def _upstream_from_store(store: ArtifactStore, node: str, fp: str) -> Artifact:
    """An upstream of an ``--only`` stage: the exact artifact, else the newest complete one."""
    artifact = store.find(node, fp)
    if artifact is not None:
        log(f"{node}: using stored artifact {fp}")
        return artifact
    artifact = store.latest(node)
    if artifact is not None:
        log(f"{node}: no artifact for the current config ({fp}); using the newest stored one, {artifact.fingerprint}")
        return artifact
    raise RunError(
        f"stage {node!r} is needed upstream but has no complete artifact in {store.stage_dir(node)}; "
        f"run it first, or pass --input {node}=PATH (an existing HF folder)"
    )


def run_services(spec: PipelineSpec, store: ArtifactStore, resources: StageResources | None = None) -> RunServices:
    """What a stage may use of the run: its settings, and the store's and Ray's services. With the
    stage's ``resources`` plan, connecting to Ray checks that the cluster can hold it (fail fast)."""

    def earlier_outputs(stage: str) -> list[Path]:
        folder = store.stage_dir(stage)
        found = [a for d in folder.iterdir() if not d.name.startswith(".") and (a := store.find(stage, d.name))] \
            if folder.is_dir() else []
        return [a.path for a in sorted(found, key=lambda a: a.manifest.get("finished", ""), reverse=True)]

    return RunServices(
        pipeline=spec.name,
        run_root=spec.run_root(),
        base=spec.base,
        tracking=spec.tracking,
        stage_kinds={name: config.kind for name, config in spec.stages.items()},
        resolve_path=spec.resolve_path,
        connect_ray=stage_connector(spec, resources),
        fingerprint=fingerprint,
        data_fingerprint=data_fingerprint,
        earlier_outputs=earlier_outputs,
    )


def run_stage(
    spec: PipelineSpec, dag: DAG, node: str, fp: str, artifacts: dict[str, Artifact], store: ArtifactStore
) -> Artifact:
    config = spec.stages.get(node, spec.base if node == BASE else None)
    kind = BASE if node == BASE else config.kind
    work_dir = store.partial_dir(node, fp)
    inputs = {role: artifacts[parent] for role, parent in dag.parents[node].items()}
    resources = stage_resources(config, node) if node != BASE else None
    ctx = StageContext(name=node, config=config, inputs=inputs, work_dir=work_dir, fingerprint=fp,
                       run=run_services(spec, store, resources))
    manifest = {
        "stage": node,
        "kind": kind,
        "fingerprint": fp,
        "status": "running",
        "inputs": {parent: artifacts[parent].fingerprint for parent in dag.parents[node].values()},
        "input_roles": dict(dag.parents[node]),
        "config": config.model_dump(mode="json", by_alias=True),
        "started": now(),
        "versions": library_versions(),
    }
    write_json(work_dir / "manifest.json", manifest)
    log(f"{node}: running {kind} stage ({fp}) in {work_dir}")
    watch = Stopwatch()
    try:
        result = stage_kind(kind).runner()(ctx)
    except Exception as err:
        write_json(work_dir / "manifest.json", {**manifest, "status": "failed", "error": repr(err),
                                                 "traceback": traceback.format_exc()})
        raise RunError(str(err) if isinstance(err, InsufficientResources) else f"stage {node!r} failed: {err}") \
            from err
    manifest.update(result.manifest)
    manifest.update(
        metrics=result.metrics,
        curves=result.curves,
        data=result.data,
        seconds=watch.seconds,
    )
    artifact = store.commit(node, fp, manifest)
    log(f"{node}: complete in {watch.seconds:.1f}s -> {artifact.path}")
    return artifact
