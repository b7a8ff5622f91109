"""What running a sweep's trials side by side buys on this machine: the sweep's wall time against the
sum of its trials' own times, at ``max_concurrent_trials`` 1 and 2.

    .venv/bin/python benchmarks/sweep_concurrency.py --out benchmarks/results/sweep_concurrency.json

The sweep is ``configs/sweep.yaml``'s ``sft_swept`` (LoRA rank {4, 8, 16} x schedule {cosine, constant},
6 trials) with ``scheduler: none``, so that both runs train the same 6 trials to the end. Each run
has a fresh store (the base is built once per store: it is not counted) and one Ray instance of
``ray.num_cpus`` 4 logical CPUs on the machine's cores. Per run: the sweep node's seconds (from its
manifest: Tune start, every trial, the promotion), the sum of the trials' stage seconds (each trial's
own manifest), and their ratio; then the wall-time ratio of concurrency 2 to 1. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_run(concurrency: int, storage: Path) -> dict:
    from pipeline.runner import run_pipeline
    from pipeline.spec import load_spec

    spec = load_spec(REPO / "configs" / "sweep.yaml", [
        f"storage={storage}", "stages.sft_swept.sweep.scheduler.name=none",
        f"stages.sft_swept.sweep.max_concurrent_trials={concurrency}"])
    run_pipeline(spec, only=["base"])
    started = time.monotonic()
    sweep = run_pipeline(spec, only=["sft_swept"])["sft_swept"]
    wall = time.monotonic() - started
    trials = sweep.manifest["sweep"]["trials"]
    trial_seconds = [json.loads((Path(t["artifact"]) / "manifest.json").read_text())["seconds"] for t in trials]
    return {"max_concurrent_trials": concurrency, "trials": len(trials), "wall_s": round(wall, 1),
            "sweep_node_s": round(sweep.manifest["seconds"], 1), "sum_of_trials_s": round(sum(trial_seconds), 1),
            "trial_s": [round(s, 1) for s in trial_seconds],
            "wall_over_sum": round(wall / sum(trial_seconds), 3),
            "best": sweep.manifest["sweep"]["best"]["overrides"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import ray

    runs = []
    for concurrency in args.concurrency:
        with tempfile.TemporaryDirectory(prefix=f"sweep-bench-{concurrency}-") as storage:
            runs.append(one_run(concurrency, Path(storage)))
            print(json.dumps(runs[-1]), flush=True)
        ray.shutdown()  # a fresh instance for the next run
    by = {r["max_concurrent_trials"]: r for r in runs}
    result = {
        "benchmark": "sweep_concurrency", "config": "configs/sweep.yaml (sft_swept, scheduler none)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": runs,
        "wall_ratio_2_over_1": round(by[2]["wall_s"] / by[1]["wall_s"], 3) if {1, 2} <= set(by) else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
