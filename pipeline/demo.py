"""``make demo``: run a pipeline file on a local Ray instance and print what it achieved.

    python -m pipeline.demo configs/tiny.yaml [-v] [KEY=VALUE ...]

Runs every stage (cached stages are skipped), then prints the held-out verifier accuracy of
every model in the DAG on the built-in task (the eval stage's table where there is one), each reward
model's held-out pairwise accuracy, and where the artifacts are.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.cluster import set_verbosity


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    set_verbosity(verbose)  # before transformers is imported or Ray starts
    from pipeline.runner import GateFailed, run_pipeline
    from pipeline.spec import load_spec

    config = argv[0] if argv else "configs/tiny.yaml"
    spec = load_spec(config, argv[1:])
    started = time.monotonic()
    try:
        artifacts = run_pipeline(spec)
    except GateFailed as gate:
        print(f"\ndemo stopped by a gate: {gate}")
        return 3
    elapsed = time.monotonic() - started
    print(f"\n{spec.name}: pipeline finished in {elapsed:.0f}s; artifacts under {spec.run_root()}")
    for node, artifact in artifacts.items():
        print(f"  {node:<10} {artifact.manifest.get('kind', '?'):<8} {artifact.path}")
    for node, artifact in artifacts.items():
        if artifact.manifest.get("rollout_engine"):  # which engine generated the RL stage's rollouts
            verified = "sync_probe_diff" in (artifact.manifest.get("curves") or {})
            print(f"  {node}: rollouts on {artifact.manifest['rollout_engine']} engines "
                  f"(weight sync: {artifact.manifest.get('sync_method')}, "
                  f"{'verified every iteration' if verified else 'not verified'})")
    eval_tables = [a for a in artifacts.values() if a.manifest.get("kind") == "eval"]
    if eval_tables:
        for artifact in eval_tables:
            print_eval_table(artifact)
    else:
        print_task_accuracy(spec, artifacts)
    print_reward_models(artifacts)
    from pipeline.report import build_report

    print(f"\nreport: {build_report(spec)}")
    return 0


def print_eval_table(artifact) -> None:
    from stages.evaluate.stage import format_table

    print()
    print(format_table(artifact))


def print_reward_models(artifacts) -> None:
    """Each reward model's held-out pairwise accuracy (from its manifest; chance is 50%)."""
    from stages.reward import describe_heldout

    for node, artifact in artifacts.items():
        metrics = artifact.manifest.get("metrics", {})
        if artifact.manifest.get("kind") == "reward" and "heldout_accuracy" in metrics:
            print(f"\nreward model {node}: {describe_heldout(metrics)}")


def print_task_accuracy(spec, artifacts) -> None:
    """Greedy held-out accuracy of each causal-LM model on the built-in task (no eval stage)."""
    from stages.task_accuracy import heldout_accuracy

    datasets = [d for s in spec.stages.values() if getattr(s, "data", None) is not None
                for d in (s.data if isinstance(s.data, list) else [s.data])]  # a mixture is a list
    task = next((d.path.removeprefix("builtin:").split("/")[0] for d in datasets if d.path.startswith("builtin:")),
                None)
    if task is None:
        return
    print(f"\nheld-out accuracy on builtin:{task}/test (greedy):")
    for node, artifact in artifacts.items():
        if artifact.manifest.get("kind") in ("reward", "eval"):
            continue
        result = heldout_accuracy(Path(artifact.model_dir), task)
        print(f"  {node:<10} {result['accuracy']:.1%}  ({result['correct']}/{result['total']}; "
              + ", ".join(f"{k} {v:.1%}" for k, v in result["by_category"].items()) + ")")


if __name__ == "__main__":
    sys.exit(main())
