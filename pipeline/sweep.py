"""Hyperparameter sweeps of one stage with Ray Tune: ``rayalign sweep CONFIG [--stage sft]``.

The Ray Train V2 pattern (Ray's "Hyperparameter Tuning with Ray Tune" guide): a ``Tuner`` runs
``train_driver_fn`` once per trial; each trial applies its overrides to the stage config and runs
the stage through the normal runner, whose launcher builds and fits the stage's ``TorchTrainer``.
So every trial is an ordinary stage run: its artifact lands in the store under its own
fingerprint, a rerun of the sweep finds every finished trial cached, and the best trial's
settings given to ``rayalign run --set ...`` reuse its artifact instead of training again.

A ``sweep:`` section in the pipeline file::

    sweep:
      stage: sft
      metric: final_loss            # any numeric metric of the stage's manifest
      mode: min
      search_space:
        peft.r: [8, 16]             # a list is a grid
        train.lr: {loguniform: [1.0e-5, 1.0e-3]}
        train.lr_schedule: {choice: [cosine, linear]}
      num_samples: 2                # samples per grid point
      max_concurrent_trials: 1      # each trial needs the stage's whole scaling section

Outputs, under ``<storage>/<name>/sweeps/<stage>/``: ``results.json`` (every trial's overrides,
metrics, fingerprint and artifact, and the best one with the ``--set`` flags that reuse it),
``results.png`` (the metric against lr, one line per LoRA rank) and ``tune/`` (Tune's own files).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.dag import build_dag
from pipeline.runner import RunError, log, plan, run_pipeline
from pipeline.spec import PipelineSpec, SearchDimension, SpecError, parse_stage
from stages.config import TrainingStageConfig
from pipeline.store import now, write_json

# Logical memory each trial's driver reserves instead of a CPU (it only waits on its Train workers).
TRIAL_MEMORY_BYTES = 256 * 1024**2


def sweep_dir(spec: PipelineSpec, stage: str) -> Path:
    return spec.run_root() / "sweeps" / stage


# --------------------------------------------------------------------------- the search space


def resolve_sweep(spec: PipelineSpec, stage: str | None = None) -> tuple[str, dict[str, SearchDimension]]:
    """The stage to sweep and its validated search space (key paths checked against the stage's config)."""
    stage = stage or spec.sweep.stage
    if not stage:
        raise SpecError("sweep: no stage to sweep; set sweep.stage or pass --stage")
    if stage not in spec.stages:
        raise SpecError(f"sweep.stage: {stage!r} is not a stage of this pipeline (stages: {', '.join(spec.stages)})")
    config = spec.stages[stage]
    if not isinstance(config, TrainingStageConfig):
        raise SpecError(f"sweep.stage: {stage!r} ({config.kind}) does not train; only training stages can be swept")
    space = dict(spec.sweep.search_space)
    if not space:
        lr = config.train.lr
        space = {"train.lr": SearchDimension(grid=[lr / 3, lr, lr * 3])}
    for key, dimension in list(space.items()):
        _check_key_path(type(config), key)
        if dimension.grid is not None or dimension.choice is not None:
            # Validate each value now, and keep it as the config reads it (YAML reads 1e-3 as a string).
            values = [_coerce(config, key, value, stage) for value in dimension.grid or dimension.choice]
            space[key] = SearchDimension(**{"grid" if dimension.grid is not None else "choice": values})
    _check_metric(spec.sweep.metric, config, stage)
    return stage, space


def _check_key_path(model: type[BaseModel], key: str) -> None:
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        field = fields.get(part)
        if field is None or part in ("kind", "from"):
            raise SpecError(f"sweep.search_space.{key}: {part!r} is not a sweepable key of "
                            f"{'.'.join(parts[:i]) or 'the stage'} (keys: {', '.join(sorted(fields))})")
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise SpecError(f"sweep.search_space.{key}: {part!r} is a value, not a section")
            model = annotation
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            raise SpecError(f"sweep.search_space.{key}: {part!r} is a section; sweep one of its keys")


def _coerce(config: TrainingStageConfig, key: str, value: Any, stage: str) -> Any:
    try:
        node: Any = _apply(config, {key: value}, stage)
    except SpecError as err:
        raise SpecError(f"sweep.search_space.{key}: value {value!r} is not valid: {err}") from None
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_metric(metric: str, config: TrainingStageConfig, stage: str) -> None:
    """Eval metrics need held-out data; catch that before any trial trains."""
    if "eval" in metric and config.data.eval_path is None and config.data.eval_fraction == 0:
        raise SpecError(f"sweep.metric: {metric!r} needs eval data, but stages.{stage}.data has neither "
                        f"eval_path nor eval_fraction (or sweep final_loss)")


def param_space(space: dict[str, SearchDimension]) -> dict[str, Any]:
    """Our search space as Tune's ``param_space`` (flat: stage key path -> Tune domain)."""
    from ray import tune

    result = {}
    for key, dim in space.items():
        if dim.grid is not None:
            result[key] = tune.grid_search(list(dim.grid))
        elif dim.choice is not None:
            result[key] = tune.choice(list(dim.choice))
        elif dim.uniform is not None:
            result[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            result[key] = tune.loguniform(*dim.loguniform)
        else:
            result[key] = tune.randint(*dim.randint)
    return result


def _apply(config: TrainingStageConfig, overrides: dict[str, Any], stage: str) -> TrainingStageConfig:
    """The stage config with ``key.path: value`` overrides, validated like a config read from YAML.

    Built from the keys the user set (``exclude_unset``), so a trial's config equals the config a
    pipeline file with the same values gives, and so has the same fingerprint.
    """
    raw = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if isinstance(node, str):  # the data: shorthand
                node = {"path": node}
        node[last] = value
    try:
        return parse_stage(stage, {**raw, "kind": config.kind})
    except ValidationError as err:
        raise SpecError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())) from None


def trial_spec(spec: PipelineSpec, stage: str, overrides: dict[str, Any]) -> PipelineSpec:
    """The pipeline as one trial sees it: the stage's overrides applied, storage made absolute."""
    copy = spec.model_copy(deep=True)
    copy.storage = str(spec.storage_root())
    copy.stages = {**spec.stages, stage: _apply(spec.stages[stage], overrides, stage)}
    return copy


def set_flags(stage: str, overrides: dict[str, Any]) -> list[str]:
    """``--set`` values that make ``rayalign run`` use (and find cached) a trial's artifact."""
    return [f"stages.{stage}.{key}={_yaml_scalar(value)}" for key, value in overrides.items()]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)  # shortest exact form; YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    return str(value)


# --------------------------------------------------------------------------- Tune


def train_driver_fn(config: dict, spec: PipelineSpec, stage: str, cwd: str) -> None:
    """One Tune trial: run the stage with this trial's settings and report its final metrics."""
    from ray import tune

    if os.path.isdir(cwd):  # Tune starts trials in their own folder; relative data paths need ours
        os.chdir(cwd)
    overrides = {key: config[key] for key in config}
    the_spec = trial_spec(spec, stage, overrides)
    cached = plan(the_spec, only=[stage]).cached[stage] is not None
    artifact = run_pipeline(the_spec, only=[stage])[stage]
    metrics = {k: v for k, v in artifact.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if spec.sweep.metric not in metrics:
        raise RunError(f"stage {stage!r} reported no {spec.sweep.metric!r}; its metrics: {', '.join(sorted(metrics))}")
    tune.report({**metrics, "fingerprint": artifact.fingerprint, "artifact": str(artifact.path), "cached": cached})


def run_sweep(spec: PipelineSpec, stage: str | None = None, *, num_samples: int | None = None,
              max_concurrent_trials: int | None = None) -> dict:
    """Run the sweep; returns (and writes) the results table. Upstream stages run first, once."""
    import ray
    from ray import tune

    from pipeline.cluster import ensure_ray

    stage, space = resolve_sweep(spec, stage)
    sweep = spec.sweep
    out = sweep_dir(spec, stage)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(spec)

    # Upstream stages run here, once, so that trials never race to build them.
    dag = build_dag(spec)
    run_pipeline(spec, only=[node for node in dag.order if node in dag.upstream_closure({stage}) - {stage}])

    trainable = tune.with_parameters(train_driver_fn, spec=spec, stage=stage, cwd=os.getcwd())
    trainable = tune.with_resources(trainable, {"cpu": sweep.trial_cpus, "memory": TRIAL_MEMORY_BYTES})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=num_samples or sweep.num_samples,
            max_concurrent_trials=max_concurrent_trials or sweep.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=f"{stage}-{now().replace(':', '').replace('-', '')[:15]}",
            storage_path=str(out / "tune"),
            verbose=1,
        ),
    )
    log(f"sweep {stage}: {', '.join(space)} -> {sweep.metric} ({sweep.mode}) on Ray {ray.__version__}")
    grid = tuner.fit()
    results = results_table(spec, stage, space, grid)
    write_json(out / "results.json", results)
    plot_results(results, out / "results.png")
    if results["best"] is None:
        raise RunError(f"sweep {stage}: every trial failed; see {out / 'results.json'}")
    best = results["best"]
    log(f"sweep {stage}: best {sweep.metric}={best['value']:.4g} with {best['overrides']} -> {best['artifact']}")
    log(f"sweep {stage}: reuse it with: rayalign run CONFIG " + " ".join(f"--set {s}" for s in best["set"]))
    return results


def results_table(spec: PipelineSpec, stage: str, space: dict[str, SearchDimension], grid) -> dict:
    """Tune's ResultGrid as a JSON-able table; metrics come from each trial's manifest in the store."""
    import json

    metric, mode = spec.sweep.metric, spec.sweep.mode
    trials = []
    for result in grid:
        overrides = {key: result.config[key] for key in space}
        row: dict[str, Any] = {"trial": _trial_id(result), "overrides": overrides, "set": set_flags(stage, overrides)}
        reported = result.metrics or {}
        if result.error is not None or "artifact" not in reported:
            row.update(status="error", error=str(result.error or "no result reported")[:2000])
        else:
            manifest = json.loads((Path(reported["artifact"]) / "manifest.json").read_text())
            row.update(status="ok", value=manifest["metrics"].get(metric), metrics=manifest["metrics"],
                       fingerprint=reported["fingerprint"], artifact=reported["artifact"],
                       cached=bool(reported.get("cached")), seconds=manifest.get("seconds"))
        trials.append(row)
    trials.sort(key=lambda r: r["trial"])
    finished = [t for t in trials if t["status"] == "ok" and _is_number(t.get("value"))]
    best = (min if mode == "min" else max)(finished, key=lambda t: t["value"]) if finished else None
    stage_config = spec.stages[stage]
    return {
        "pipeline": spec.name,
        "stage": stage,
        "metric": metric,
        "mode": mode,
        "search_space": {k: v.model_dump(exclude_none=True) for k, v in space.items()},
        "defaults": {"train.lr": stage_config.train.lr, "peft.r": stage_config.peft.r},
        "trials": trials,
        "best": best and {k: best[k] for k in ("trial", "overrides", "set", "value", "fingerprint", "artifact")},
        "plot": "results.png",
        "finished": now(),
    }


def _trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(getattr(result, "path", "") or "?").name)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_results(results: dict, path: Path) -> Path:
    """The metric against lr (log scale), one line per LoRA rank; the best trial starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defaults = results["defaults"]
    finished = [t for t in results["trials"] if t["status"] == "ok" and _is_number(t.get("value"))]
    by_rank: dict[Any, list[tuple[float, float]]] = {}
    for i, trial in enumerate(finished):
        lr = trial["overrides"].get("train.lr", defaults["train.lr"])
        rank = trial["overrides"].get("peft.r", defaults["peft.r"])
        by_rank.setdefault(rank, []).append((lr, trial["value"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for rank in sorted(by_rank, key=str):
        points = sorted(by_rank[rank])
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"r={rank}")
    best = results["best"]
    if best is not None:
        ax.plot([best["overrides"].get("train.lr", defaults["train.lr"])], [best["value"]], marker="*",
                markersize=16, color="gold", markeredgecolor="black", linestyle="none", label="best")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(results["metric"])
    ax.set_title(f"{results['pipeline']} / {results['stage']}: {len(finished)} trial(s), {results['mode']} is best")
    ax.grid(True, alpha=0.3)
    if by_rank:
        ax.legend(title="LoRA rank" if len(by_rank) > 1 else None)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
