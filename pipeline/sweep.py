"""A sweep as a node of the DAG: Ray Tune over one training stage's settings; the best trial's model
is the stage's output (``stages.<name>.sweep``, see ``stages.sweep_config``).

The Ray Train V2 pattern (Ray's "Hyperparameter Tuning with Ray Tune" guide): a ``Tuner`` runs
:func:`run_trial` once per trial; each trial is an ordinary run of the stage with its overrides
(``pipeline.stage_run``): its artifact lands in the store under its own fingerprint, so a trial that
finished before is a cache hit. Inside a trial the stage's workers report the metric at every logging
step, a PPO/GRPO stage's at every iteration (``stages.tune_report``), which is what lets ASHA stop a
bad trial early; a stopped trial is recorded as ``stopped``, not failed.

The sweep node's fingerprint covers the stage config with its ``sweep:`` section (space, search,
seed, metric, scheduler), so a finished sweep is one cache hit, and a rerun launches no trial. An
interrupted sweep resumes with ``Tuner.restore`` from ``<stage>/.sweep-<fingerprint>/``. When it
completes, the best trial's files are hard-linked into the sweep's artifact (a copy where links
cannot be made), whose manifest lists every trial (overrides, metric curve, status, fingerprint)
and the best; downstream stages consume it like any other artifact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from pipeline.dag import DAG
from pipeline.report_figures import is_finite_number
from pipeline.spec import PipelineSpec, SpecError
from pipeline.stage_run import RunError, run_exclusively, stage_fingerprint
from pipeline.store import MANIFEST, Artifact, ArtifactStore
from stages.log import log
from stages.resources import ResourceGroup, StageResources, stage_resources
from stages.stage import StageContext, StageResult
from stages.sweep_config import SearchDimension, SweepConfig, checked_space, trial_config
from stages.tune_report import TUNE_METRIC_ENV

# Logical memory each trial's driver reserves instead of a CPU (it only waits on its Train workers).
TRIAL_MEMORY_BYTES = 256 * 1024**2
TRIAL_DRIVER = "sweep trial driver"  # a ResourceGroup role: the Tune trial that runs one stage run
SWEEP_PLOT = "sweep.png"
# What a trial's manifest says about the stage run, not about the model: not carried to the sweep's.
RUN_KEYS = {"stage", "fingerprint", "status", "inputs", "input_roles", "config", "fingerprint_parts", "started",
            "finished", "versions", "files", "seconds", "gate", "trust_remote_code", "metrics", "curves", "data",
            "kind"}


def resolve_sweep(spec: PipelineSpec, stage: str | None = None) -> tuple[str, dict[str, SearchDimension]]:
    """The stage to sweep (``--stage``, else the one stage with a ``sweep:``) and its checked space."""
    swept = [name for name, config in spec.stages.items() if getattr(config, "sweep", None) is not None]
    if stage is None:
        if len(swept) != 1:
            raise SpecError("no stage has a sweep: section (add stages.<name>.sweep)" if not swept else
                            f"several stages have a sweep ({', '.join(swept)}); pass --stage")
        stage = swept[0]
    if stage not in spec.stages:
        raise SpecError(f"--stage: {stage!r} is not a stage of this pipeline (stages: {', '.join(spec.stages)})")
    if stage not in swept:
        raise SpecError(f"stages.{stage} has no sweep: section"
                        + (f" (stages with one: {', '.join(swept)})" if swept else ""))
    return stage, checked_space(spec.stages[stage])


def trial_spec(spec: PipelineSpec, stage: str, overrides: dict[str, Any]) -> PipelineSpec:
    """The pipeline as one trial sees it: the stage's overrides applied (no sweep), storage made absolute."""
    copy = spec.model_copy(deep=True)
    if spec.storage_uri():
        copy.storage_cache = str(spec.storage_root())  # the object-store URI stays; its local mirror is made absolute
    else:
        copy.storage = str(spec.storage_root())
    copy.stages = {**spec.stages, stage: trial_config(spec.stages[stage], overrides)}
    return copy


def set_flags(stage: str, overrides: dict[str, Any]) -> list[str]:
    """``--set`` values that give a pipeline without the sweep the trial's config (and fingerprint)."""
    return [f"stages.{stage}.{key}={_yaml_scalar(value)}" for key, value in overrides.items()]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)  # shortest exact form; YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    return str(value)


def grid_points(space: dict[str, SearchDimension]) -> list[dict[str, Any]] | None:
    """Every trial's overrides when the space is all grids (what ``rayalign plan`` lists), else None."""
    import itertools

    if any(d.grid is None for d in space.values()):
        return None
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k].grid for k in keys))]


def param_space(space: dict[str, SearchDimension], search: str) -> dict[str, Any]:
    """The space as Tune's ``param_space``; a random search draws from a grid's values as a choice."""
    from ray import tune

    result = {}
    for key, dim in space.items():
        if dim.grid is not None:
            result[key] = tune.grid_search(list(dim.grid)) if search == "grid" else tune.choice(list(dim.grid))
        elif dim.choice is not None:
            result[key] = tune.choice(list(dim.choice))
        elif dim.uniform is not None:
            result[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            result[key] = tune.loguniform(*dim.loguniform)
        else:
            result[key] = tune.randint(*dim.randint)
    return result


def trial_count(sweep: SweepConfig) -> int:
    """How many trials the sweep launches: grid, every grid point ``num_samples`` times; random, ``num_samples``."""
    if sweep.search == "random":
        return sweep.num_samples
    points = math.prod(len(d.grid) for d in sweep.search_space.values() if d.grid is not None)
    return points * sweep.num_samples


def concurrent_resources(config, stage: str) -> StageResources:
    """What a stage asks Ray for at once (``stages.resources``): a swept stage runs up to
    ``max_concurrent_trials`` trials (never more than it has) side by side, each the whole stage
    (every group times that), and each trial's driver holds ``trial_cpus``. ``rayalign k8s`` sizes
    its worker pods from this."""
    plan = stage_resources(config, stage)
    sweep = getattr(config, "sweep", None)
    if sweep is None or not plan.uses_ray:
        return plan
    trials = min(sweep.max_concurrent_trials, trial_count(sweep))
    groups = tuple(replace(g, count=g.count * trials) for g in plan.groups)
    if sweep.trial_cpus:
        groups += (ResourceGroup(TRIAL_DRIVER, trials, sweep.trial_cpus, 0.0, memory=TRIAL_MEMORY_BYTES),)
    return StageResources(plan.stage, groups, plan.notes)


def describe_trials(spec: PipelineSpec, node: str, upstream: dict[str, str]) -> list[str]:
    """``rayalign plan``'s lines for a swept stage: the search, and each grid trial with its fingerprint
    and whether the store holds it (``upstream``: role -> fingerprint)."""
    sweep = spec.stages[node].sweep
    space = checked_space(spec.stages[node])
    points = grid_points(space) if sweep.search == "grid" else None
    count = f"{len(points) * sweep.num_samples} trials" if points is not None else f"{sweep.num_samples} draws"
    lines = [f"sweep: {count} ({sweep.search}, seed {sweep.seed}) of {', '.join(space)} -> {sweep.mode} "
             f"{sweep.metric}; scheduler {sweep.scheduler.name}"]
    store = ArtifactStore(spec.run_root())
    for overrides in points or []:
        fp = stage_fingerprint(trial_spec(spec, node, overrides), node, upstream)
        lines.append(f"  trial {fp}  {'cached' if store.find(node, fp) else 'to run':<7} {overrides}")
    return lines


# --------------------------------------------------------------------------- one trial (a Tune trainable)


def run_trial(params: dict, *, spec: PipelineSpec, node: str, dag: DAG, upstream: dict[str, Artifact],
              cwd: str) -> None:
    """One Tune trial: the stage with this trial's settings, through the store; reports its final metrics."""
    from ray import tune

    if os.path.isdir(cwd):  # Tune starts trials in their own folder; relative data paths need ours
        os.chdir(cwd)
    sweep = spec.stages[node].sweep
    os.environ[TUNE_METRIC_ENV] = f"{sweep.metric}:{sweep.step_metric() or sweep.metric}"
    the_spec = trial_spec(spec, node, {key: params[key] for key in sweep.search_space})
    fp = stage_fingerprint(the_spec, node, {role: upstream[p].fingerprint for role, p in dag.parents[node].items()})
    store = ArtifactStore(the_spec.run_root())
    artifact = store.find(node, fp)
    cached = artifact is not None
    if artifact is None:
        inputs = {parent: upstream[parent] for parent in dag.parents[node].values()}
        artifact = run_exclusively(the_spec, dag, node, fp, inputs, store, forced=False, wait=True)
    metrics = {k: v for k, v in artifact.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if sweep.metric not in metrics:
        raise RunError(f"stage {node!r} reported no {sweep.metric!r}; its metrics: {', '.join(sorted(metrics))}")
    tune.report({sweep.metric: metrics[sweep.metric], "step": metrics.get("global_step", 0),
                 "fingerprint": artifact.fingerprint, "artifact": str(artifact.path), "cached": cached})


# --------------------------------------------------------------------------- the sweep node


def sweep_runner(spec: PipelineSpec, dag: DAG, node: str, artifacts: dict[str, Artifact],
                 store: ArtifactStore) -> Callable[[StageContext], StageResult]:
    """How ``pipeline.stage_run`` runs a swept stage: the sweep, then the best trial promoted."""

    def run(ctx: StageContext) -> StageResult:
        upstream = {parent: artifacts[parent] for parent in dag.parents[node].values()}
        results = run_sweep(spec, dag, node, ctx, upstream, store)
        best_dir = Path(results["best"]["artifact"])
        best = json.loads((best_dir / MANIFEST).read_text())
        link_tree(best_dir, ctx.work_dir)
        plot_sweep(results, ctx.work_dir / SWEEP_PLOT)
        manifest = {k: v for k, v in best.items() if k not in RUN_KEYS}
        return StageResult(metrics=best.get("metrics", {}), curves=best.get("curves", {}),
                           data=best.get("data", {}), manifest={**manifest, "sweep": results})

    return run


def run_sweep(spec: PipelineSpec, dag: DAG, node: str, ctx: StageContext, upstream: dict[str, Artifact],
              store: ArtifactStore) -> dict:
    """Run (or resume) the sweep's Tune experiment; returns the trial table with the best trial."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    config = spec.stages[node]
    sweep = config.sweep
    space = checked_space(config)
    ctx.run.connect_ray()
    experiments = store.stage_dir(node) / f".sweep-{ctx.fingerprint}"  # outlives attempts: Tuner.restore
    name = "tune"
    trainable = tune.with_parameters(run_trial, spec=spec, node=node, dag=dag, upstream=upstream, cwd=os.getcwd())
    trainable = tune.with_resources(trainable, {"cpu": sweep.trial_cpus, "memory": TRIAL_MEMORY_BYTES})
    if tune.Tuner.can_restore(str(experiments / name)):
        log(f"{node}: resuming the sweep in {experiments / name} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(experiments / name), trainable, resume_errored=True)
    else:
        scheduler = None
        if sweep.scheduler.name == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # stop_last_trials=False: a trial past max_t reports runs on to its end. Tune's default stops it
            # there, and a stage stopped after its last step (a PPO trial reports every iteration, so max_t
            # can be its length) never commits the model it trained.
            scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=sweep.scheduler.grace_period,
                                      reduction_factor=sweep.scheduler.reduction_factor, max_t=sweep.scheduler.max_t,
                                      stop_last_trials=False)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space, sweep.search),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples, scheduler=scheduler,
                # The generator itself limits concurrency: Tune ignores max_concurrent_trials beside one.
                search_alg=BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials),
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(experiments), verbose=0),
        )
    log(f"{node}: sweep of {', '.join(space)} ({sweep.search}, seed {sweep.seed}) -> {sweep.metric} "
        f"({sweep.mode}), scheduler {sweep.scheduler.name}")
    results = results_table(spec, node, dag, upstream, space, tuner.fit())
    if results["best"] is None:
        raise RunError(f"sweep {node}: no trial finished; see {experiments / name}")
    for trial in results["trials"]:
        shown = f"{trial['value']:.4g}" if is_finite_number(trial.get("value")) else "–"
        log(f"{node}:   {trial['status']:<8} {sweep.metric}={shown:<8} {trial['overrides']}")
    log(f"{node}: best {sweep.metric}={results['best']['value']:.4g} with {results['best']['overrides']}")
    return results


def results_table(spec: PipelineSpec, node: str, dag: DAG, upstream: dict[str, Artifact],
                  space: dict[str, SearchDimension], grid) -> dict:
    """Tune's ResultGrid as the manifest's table: per trial its overrides, fingerprint, status (ok,
    stopped, error), the metric's curve as Tune saw it, and the metric from the trial's manifest."""
    sweep = spec.stages[node].sweep
    upstream_fps = {role: upstream[p].fingerprint for role, p in dag.parents[node].items()}
    trials = []
    for result in grid:
        overrides = {key: result.config[key] for key in space}
        reported = result.metrics or {}
        row: dict[str, Any] = {
            "trial": str(reported.get("trial_id") or Path(str(getattr(result, "path", "?"))).name),
            "overrides": overrides, "set": set_flags(node, overrides),
            "fingerprint": stage_fingerprint(trial_spec(spec, node, overrides), node, upstream_fps),
            "curve": _curve(result, sweep.metric),
        }
        if result.error is not None:
            row.update(status="error", error=str(result.error)[:2000])
        elif "artifact" in reported:  # the trial's own final report (Tune's "done" is set for stopped ones too)
            manifest = json.loads((Path(reported["artifact"]) / MANIFEST).read_text())
            row.update(status="ok", value=manifest["metrics"].get(sweep.metric), artifact=reported["artifact"],
                       cached=bool(reported.get("cached")), seconds=manifest.get("seconds"))
        else:  # the scheduler stopped it: its last reported value
            row.update(status="stopped", value=reported.get(sweep.metric))
        trials.append(row)
    trials.sort(key=lambda r: json.dumps(r["overrides"], sort_keys=True, default=str))
    finished = [t for t in trials if t["status"] == "ok" and is_finite_number(t.get("value"))]
    best = (min if sweep.mode == "min" else max)(finished, key=lambda t: t["value"]) if finished else None
    return {
        "metric": sweep.metric, "mode": sweep.mode, "search": sweep.search, "seed": sweep.seed,
        "scheduler": sweep.scheduler.model_dump(),
        "search_space": {k: v.model_dump(exclude_none=True) for k, v in space.items()},
        "trials": trials,
        "stopped_early": sum(t["status"] == "stopped" for t in trials),
        "best": best and {k: best[k] for k in ("trial", "overrides", "set", "value", "fingerprint", "artifact")},
    }


def _curve(result, metric: str) -> list[dict]:
    """The metric at each report the trial made (its logging steps, then the final value)."""
    frame = getattr(result, "metrics_dataframe", None)
    if frame is None or metric not in frame:
        return []
    steps = frame["step"] if "step" in frame else frame["training_iteration"]
    return [{"step": int(s), "value": float(v)} for s, v in zip(steps, frame[metric]) if is_finite_number(v)]


def link_tree(source: Path, target: Path) -> None:
    """The best trial's files in the sweep's artifact: hard links (no second copy of the weights),
    copies across filesystems. The trial's manifest stays with the trial."""
    for file in sorted(Path(source).rglob("*")):
        rel = file.relative_to(source)
        if not file.is_file() or rel.parts[0] == MANIFEST:
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.unlink()
        try:
            os.link(file, dest)
        except OSError:
            shutil.copy2(file, dest)


def plot_sweep(results: dict, path: Path) -> Path:
    """The metric against LoRA rank and against schedule, and every trial's curve (stopped ones dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in results["trials"] if is_finite_number(t.get("value"))]
    keys = [k for k in ("peft.r", "train.lr_schedule") if any(k in t["overrides"] for t in trials)]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * (len(keys) + 1), 3.8), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = sorted({str(t["overrides"].get(key)) for t in trials}, key=lambda v: (len(v), v))
        for trial in trials:
            x = values.index(str(trial["overrides"].get(key)))
            stopped = trial["status"] == "stopped"
            ax.scatter([x], [trial["value"]], marker="x" if stopped else "o", color="#9e9e9e" if stopped else "#1565c0")
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel(results["metric"])
        ax.grid(True, alpha=0.3)
    ax = axes[0][-1]
    best = (results.get("best") or {}).get("fingerprint")
    for trial in results["trials"]:
        if not trial["curve"]:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in trial["overrides"].items())
        style = "--" if trial["status"] == "stopped" else "-"
        ax.plot([p["step"] for p in trial["curve"]], [p["value"] for p in trial["curve"]], style,
                linewidth=2.5 if trial["fingerprint"] == best else 1.2,
                label=label + (" (stopped)" if trial["status"] == "stopped" else "") + (" ★" if trial["fingerprint"] == best else ""))
    ax.set_xlabel("step")
    ax.set_ylabel(results["metric"])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"sweep: {len(results['trials'])} trials, {results['stopped_early']} stopped early "
                 f"({results['mode']} {results['metric']} is best)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
