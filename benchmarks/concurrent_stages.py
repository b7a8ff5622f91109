"""What ``max_concurrent_stages`` buys on this machine: the four stages after SFT of the shipped tiny DAG
(reward, DPO, PPO, GRPO) one at a time and two at a time, side by side in one process.

    .venv/bin/python benchmarks/concurrent_stages.py --out benchmarks/results/concurrent_stages.json

``configs/tiny.yaml`` shrunk as the tests shrink it (one worker per stage, the reward model on 400 steps,
PPO and GRPO on hf engines for 10 iterations; ``--quick`` shortens everything for a dry run). An SFT
policy is trained once (tiny.yaml's recipe on ``--sft-steps``) and passed to both runs as ``--input``; each
run has its own fresh store and its own Ray instance of ``ray.num_cpus`` 4 logical CPUs. Per run: the wall
time of the four stages, each stage's own seconds (its manifest) and start and end. Then the wall-time
ratio of 2 to 1, and whether the two runs' artifacts agree: every metric that is not a time or a rate,
and every fingerprint. Not part of the tests.
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

STAGES = ("reward", "dpo", "ppo", "grpo")
SHRINK = [
    "base.pretrain_steps=0",
    *(f"stages.{s}.scaling.num_workers=1" for s in ("reward", "dpo")),
    *(f"stages.{s}.train.batch_size=32" for s in ("reward", "dpo")),
    "stages.reward.train.max_steps=400", "stages.reward.gate=[]",
    *(f"stages.{s}.train.max_steps=10" for s in ("ppo", "grpo")),
    *(f"stages.{s}.rollout.engine=hf" for s in ("ppo", "grpo")),
]
QUICK = ["stages.reward.train.max_steps=40", "stages.dpo.train.max_steps=20",
         *(f"stages.{s}.train.max_steps=2" for s in ("ppo", "grpo"))]
TIMING = ("second", "runtime", "per_s", "_s")  # metric names that measure time, not what was learned


def spec_for(storage: Path, extra: list[str]):
    from pipeline.spec import load_spec

    return load_spec(REPO / "configs" / "tiny.yaml", [*SHRINK, f"storage={storage}", *extra])


def one_run(concurrency: int, storage: Path, sft: Path, extra: list[str]) -> dict:
    from pipeline.runner import run_pipeline

    spec = spec_for(storage, [*extra, f"max_concurrent_stages={concurrency}"])
    started = time.monotonic()
    artifacts = run_pipeline(spec, only=list(STAGES), inputs={"sft": str(sft)})
    wall = time.monotonic() - started
    manifests = {s: artifacts[s].manifest for s in STAGES}
    return {
        "max_concurrent_stages": concurrency, "wall_s": round(wall, 1),
        "sum_of_stages_s": round(sum(m["seconds"] for m in manifests.values()), 1),
        "stages": {s: {"seconds": round(m["seconds"], 1), "started": m["started"], "finished": m["finished"],
                       "fingerprint": m["fingerprint"]} for s, m in manifests.items()},
        "learned": {s: {k: v for k, v in sorted(m["metrics"].items())
                        if isinstance(v, (int, float)) and not any(t in k for t in TIMING)}
                    for s, m in manifests.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="a dry run: a few steps per stage")
    args = parser.parse_args()
    import ray

    from pipeline.runner import run_pipeline

    extra = [f"stages.sft.train.max_steps={args.sft_steps}", *(QUICK if args.quick else [])]
    with tempfile.TemporaryDirectory(prefix="concurrent-stages-") as tmp:
        sft = run_pipeline(spec_for(Path(tmp) / "sft", extra), only=["sft"])["sft"].path
        ray.shutdown()
        runs = []
        for concurrency in (1, 2):
            runs.append(one_run(concurrency, Path(tmp) / f"run-{concurrency}", sft, extra))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "learned"}), flush=True)
            ray.shutdown()  # a fresh instance for the next run
    one, two = runs
    result = {
        "benchmark": "concurrent_stages",
        "config": "configs/tiny.yaml, shrunk (benchmarks/concurrent_stages.py SHRINK" + (" + QUICK)" if args.quick else ")"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": [{k: v for k, v in r.items() if k != "learned"} for r in runs],
        "wall_ratio_2_over_1": round(two["wall_s"] / one["wall_s"], 3),
        "same_fingerprints": all(one["stages"][s]["fingerprint"] == two["stages"][s]["fingerprint"] for s in STAGES),
        "same_learned_metrics": one["learned"] == two["learned"],
        "learned": one["learned"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "learned"}, indent=2))
    return 0 if result["same_learned_metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
