"""Walk the DAG: fingerprint each stage, skip what is cached, run the rest on Ray, record manifests."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cluster import stage_connector
from pipeline.dag import BASE, DAG, build_dag
from pipeline.spec import PipelineSpec
from pipeline.content_hash import code_fingerprint
from pipeline.locks import StageLocked
from pipeline.staleness import why_stale
from pipeline.store import Artifact, ArtifactStore, StoreError, fingerprint, library_versions, now, write_json
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
    why_stale: dict[str, list[str]] = field(default_factory=dict)  # node -> what changed since it last ran
    selected: list[str] = field(default_factory=list)  # nodes this run executes (or takes from cache)


def stage_fingerprint(spec: PipelineSpec, node: str, upstream: dict[str, str]) -> str:
    """Hash of everything that determines a stage's output (:func:`fingerprint_parts`)."""
    return fingerprint(fingerprint_parts(spec, node, upstream))


def fingerprint_parts(spec: PipelineSpec, node: str, upstream: dict[str, str]) -> dict:
    """What a stage's output depends on: its config, its upstream artifacts, the content of its data
    (held-out files included) and the code that computes it. Recorded in the manifest, so that
    ``rayalign plan`` can say which of them changed."""
    if node == BASE:
        from stages.pretrained import BUILTIN_BASES

        recipe = BUILTIN_BASES.get(spec.base.model.removeprefix("builtin:"))
        return {"base": spec.base.model_dump(), "recipe": recipe, "code": code_fingerprint()}
    config = spec.stages[node]
    data = {}
    for name, (source, _) in data_sources(config).items():
        data[name] = data_fingerprint(spec.resolve_path(source.path))
        if source.eval_path:
            data[f"{name}.eval_path"] = data_fingerprint(spec.resolve_path(source.eval_path))
    return {
        "config": config.model_dump(mode="json", by_alias=True),
        "upstream": upstream,
        "data": data,
        "code": code_fingerprint(),
    }


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
) -> dict[str, Artifact]:
    """Run the stages of a pipeline in dependency order; returns node -> artifact.

    A stage another run is writing is waited for (or, with ``wait=False``, an error names that run).
    An ``--only`` stage's upstream must be stored for the current config, unless ``allow_stale_upstream``.
    """
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
            artifacts[node] = external_base(spec, resolve=True)
        elif node in (inputs or {}):
            log(f"{node}: using --input {cached.path}")
            artifacts[node] = cached
        elif cached is not None and node not in force:
            log(f"{node}: cached ({fp}) at {cached.path}")
            artifacts[node] = cached
        elif node in the_plan.selected or node == BASE:
            # The builtin base is rebuilt when absent: it is cheap and deterministic.
            artifacts[node] = run_exclusively(spec, the_plan.dag, node, fp, artifacts, store,
                                              forced=node in force, wait=wait)
        else:
            artifacts[node] = _upstream_from_store(store, node, fp, allow_stale_upstream)
    return artifacts


def run_exclusively(spec: PipelineSpec, dag: DAG, node: str, fp: str, artifacts: dict[str, Artifact],
                    store: ArtifactStore, *, forced: bool, wait: bool) -> Artifact:
    """Run a stage holding its lock, unless the run that held the lock before has finished it meanwhile."""
    try:
        with store.lock(node, fp, wait=wait) as lock:
            if lock.took_over:
                log(f"{node}: taking over from a run that died while writing this stage ({lock.took_over})")
            if not forced and (done := store.find(node, fp)) is not None:
                log(f"{node}: finished by another run meanwhile ({fp}) at {done.path}")
                return done
            return run_stage(spec, dag, node, fp, artifacts, store)
    except StageLocked as err:
        raise RunError(f"{err}; rerun without --no-wait to wait for it") from None
    except OSError as err:  # the stage's own errors arrive as RunError: this is the store itself
        raise RunError(f"stage {node!r}: cannot write to the store {store.root}: {err}") from err


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
    work_dir = store.start_attempt(node, fp)
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
        "fingerprint_parts": fingerprint_parts(spec, node, {r: artifacts[p].fingerprint
                                                            for r, p in dag.parents[node].items()}),
        "trust_remote_code": spec.base.trust_remote_code,
        "started": now(),
        "versions": library_versions(),
    }
    write_json(work_dir / "manifest.json", manifest)
    log(f"{node}: running {kind} stage ({fp}) in {work_dir}")
    watch = Stopwatch()
    try:
        result = stage_kind(kind).runner()(ctx)
    except Exception as err:
        try:
            write_json(work_dir / "manifest.json", {**manifest, "status": "failed", "error": repr(err),
                                                     "traceback": traceback.format_exc()})
        except OSError:
            pass  # a full or read-only store: the error below says so, and nothing is marked complete
        raise RunError(str(err) if isinstance(err, InsufficientResources) else f"stage {node!r} failed: {err}") \
            from err
    manifest.update(result.manifest)
    manifest.update(
        metrics=result.metrics,
        curves=result.curves,
        data=result.data,
        seconds=watch.seconds,
    )
    try:
        artifact = store.commit(node, fp, manifest, work_dir)
    except StoreError as err:
        if work_dir.is_dir():
            write_json(work_dir / "manifest.json", {**manifest, "status": "failed", "error": str(err)})
        raise RunError(str(err)) from err
    log(f"{node}: complete in {watch.seconds:.1f}s -> {artifact.path}")
    return artifact
