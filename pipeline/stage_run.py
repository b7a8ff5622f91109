"""One stage in the store: its fingerprint (what its output depends on), and one run of it under its
lock, from attempt folder to committed artifact. ``pipeline.runner`` walks the DAG with these;
``pipeline.sweep`` runs a sweep's trials with them."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Callable

from pipeline.cluster import stage_connector
from pipeline.content_hash import code_fingerprint
from pipeline.dag import BASE, DAG
from pipeline.locks import StageLocked
from pipeline.spec import PipelineSpec
from pipeline.store import Artifact, ArtifactStore, StoreError, fingerprint, library_versions, now, write_json
from stages.log import log
from stages.registry import stage_kind
from stages.resources import InsufficientResources, StageResources, stage_resources
from stages.stage import RunServices, StageContext, StageResult, Stopwatch, data_sources


class RunError(RuntimeError):
    """A stage could not run (missing upstream, failed training); names the stage."""


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
        "config": config.model_dump(mode="json", by_alias=True, exclude={"gate"}),  # a gate decides what runs next
        "upstream": upstream,
        "data": data,
        "code": code_fingerprint(),
    }


def data_fingerprint(path: str) -> str:
    """Content hash of a data source; for builtin tasks, the task's version and parameters."""
    from stages.sources import fingerprint_source

    return fingerprint_source(path)


def run_exclusively(spec: PipelineSpec, dag: DAG, node: str, fp: str, artifacts: dict[str, Artifact],
                    store: ArtifactStore, *, forced: bool, wait: bool,
                    run_fn: Callable[[StageContext], StageResult] | None = None) -> Artifact:
    """Run a stage holding its lock, unless the run that held the lock before has finished it meanwhile."""
    try:
        with store.lock(node, fp, wait=wait) as lock:
            if lock.took_over:
                log(f"{node}: taking over from a run that died while writing this stage ({lock.took_over})")
            if not forced and (done := store.find(node, fp)) is not None:
                log(f"{node}: finished by another run meanwhile ({fp}) at {done.path}")
                return done
            return run_stage(spec, dag, node, fp, artifacts, store, run_fn)
    except StageLocked as err:
        raise RunError(f"{err}; rerun without --no-wait to wait for it") from None
    except OSError as err:  # the stage's own errors arrive as RunError: this is the store itself
        raise RunError(f"stage {node!r}: cannot write to the store {store.location}: {err}") from err


def run_services(spec: PipelineSpec, store: ArtifactStore, resources: StageResources | None = None) -> RunServices:
    """What a stage may use of the run: its settings, and the store's and Ray's services. With the
    stage's ``resources`` plan, connecting to Ray checks that the cluster can hold it (fail fast)."""

    def earlier_outputs(stage: str) -> list[Path]:
        if store.remote is not None:  # their mirrors: the files of those this host never fetched are absent
            return [a.path for a in store.complete(stage)]
        folder = store.stage_dir(stage)
        found = [a for d in folder.iterdir() if not d.name.startswith(".") and (a := store.find(stage, d.name))] \
            if folder.is_dir() else []
        return [a.path for a in sorted(found, key=lambda a: a.manifest.get("finished", ""), reverse=True)]

    return RunServices(
        pipeline=spec.name,
        run_root=spec.run_root(),
        storage_uri=spec.storage_uri(),
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
    spec: PipelineSpec, dag: DAG, node: str, fp: str, artifacts: dict[str, Artifact], store: ArtifactStore,
    run_fn: Callable[[StageContext], StageResult] | None = None,
) -> Artifact:
    """Run one stage in a fresh attempt folder and commit it; ``run_fn`` replaces the stage kind's own
    run (a sweep: its trials, then the best one promoted)."""
    config = spec.stages.get(node, spec.base if node == BASE else None)
    kind = BASE if node == BASE else config.kind
    try:  # an object store's inputs come down into the mirror, checked against their manifests
        inputs = {role: store.fetch(artifacts[parent]) for role, parent in dag.parents[node].items()}
    except StoreError as err:
        raise RunError(str(err)) from err
    work_dir = store.start_attempt(node, fp)
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
        result = (run_fn or stage_kind(kind).runner())(ctx)
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
