"""A learning curve on the built-in addition task: held-out accuracy of SFT against the number of training
examples, next to the in-context rows (0 and 4 solved exemplars in the prompt, no training) of the
course's method table (``../shared/course/fine-tuning-and-adaptation.md``).

    .venv/bin/python benchmarks/learning_curve.py --out benchmarks/results/learning_curve.json
    .venv/bin/python benchmarks/learning_curve.py --sizes 16 64 --steps 100 --prompts 100 --out lc.json

One pipeline, run with ``pipeline.runner.run_pipeline`` in a fresh store: the builtin tiny base, one
full-parameter SFT stage per size n (``data: {path: builtin:addition, limit: n}``, the first n of the
task's demonstrations, the same step budget for every n, so small n means many epochs), an eval stage
of the base and every SFT model (``few_shot: 0``), and an eval stage of the base with ``few_shot: 4``
(4 exemplars per prompt from ``builtin:addition/train``, seeded). Every accuracy is on the same
held-out prompts (``builtin:addition/test``, greedy, the exact-sum verifier) with its Wilson 95% interval.

Caveat that shapes the numbers: the SFT demonstrations come from the task's flawed demonstrator (it drops
the carry 65% of the time), so SFT's ceiling is about 0.7 even with all 32k demonstrations (STACK.md:
61% after 1000 x 64); the few-shot exemplars are correct sums. Not part of the tests.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = (16, 64, 256, 1024)
SHOTS = (0, 4)


def pipeline_spec(storage: Path, sizes: list[int], steps: int, batch: int, lr: float, prompts: int,
                  pretrain_steps: int, shots: int) -> dict:
    sft = {f"sft_{n}": {"kind": "sft", "from": "base", "data": {"path": "builtin:addition", "limit": n},
                        "peft": {"method": "full"},
                        "train": {"max_steps": steps, "lr": lr, "lr_schedule": "cosine", "warmup_ratio": 0.02,
                                  "batch_size": batch, "max_length": 32, "logging_steps": max(1, steps // 4)},
                        "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
           for n in sizes}
    generation = {"engine": "hf", "max_new_tokens": 8, "temperature": 0.0, "num_samples": 0, "batch_size": 100}
    evals = {
        "eval_sft": {"kind": "eval", "models": ["base", *sft], "tasks": ["addition"], "max_prompts": prompts,
                     "num_examples": 0, "generation": generation},
        f"eval_{shots}shot": {"kind": "eval", "models": ["base"], "tasks": ["addition"], "max_prompts": prompts,
                              "few_shot": shots, "num_examples": 0, "generation": generation},
    }
    return {"name": "learning-curve", "storage": str(storage), "ray": {"num_cpus": 4},
            "base": {"model": "builtin:tiny-llama", "pretrain_steps": pretrain_steps},
            "tracking": {"backend": "none"}, "stages": {**sft, **evals}}


def row(method: str, n_train: int, shots: int, metrics: dict, seconds: float | None) -> dict:
    task = metrics["tasks"]["addition"]
    return {"method": method, "train_examples": n_train, "few_shot": shots, "accuracy": round(task["accuracy"], 4),
            "ci95": [round(x, 4) for x in task["ci"]], "n": task["n"],
            "carry": round(task["categories"]["carry"]["accuracy"], 4),
            "no_carry": round(task["categories"]["no_carry"]["accuracy"], 4),
            "train_seconds": None if seconds is None else round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--steps", type=int, default=300, help="SFT steps for every size (the same budget)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts per eval")
    parser.add_argument("--pretrain-steps", type=int, default=50)
    parser.add_argument("--shots", type=int, default=SHOTS[1], help="the in-context row's k (beside k = 0)")
    args = parser.parse_args()

    from pipeline.runner import run_pipeline
    from pipeline.spec import parse_spec

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as storage:
        raw = pipeline_spec(Path(storage), args.sizes, args.steps, args.batch, args.lr, args.prompts,
                            args.pretrain_steps, args.shots)
        artifacts = run_pipeline(parse_spec(raw))
        seconds = {name: a.manifest.get("seconds") for name, a in artifacts.items()}
        plain = artifacts["eval_sft"].metrics
        shot = artifacts[f"eval_{args.shots}shot"].metrics
    rows = [row("in-context", 0, 0, plain["base"], None), row("in-context", 0, args.shots, shot["base"], None)]
    rows += [row("sft (full)", n, 0, plain[f"sft_{n}"], seconds.get(f"sft_{n}")) for n in args.sizes]
    result = {
        "benchmark": "learning_curve",
        "task": "builtin:addition (held-out builtin:addition/test, greedy, exact sum)",
        "base": f"builtin:tiny-llama, pretrain_steps {args.pretrain_steps}",
        "sft": {"method": "full", "steps": args.steps, "batch_size": args.batch, "lr": args.lr,
                "data": "the first n of builtin:addition's demonstrations (flawed demonstrator: drops the carry "
                        "65% of the time)"},
        "few_shot": {"k": args.shots, "exemplars": "builtin:addition/train (correct sums), seed 0"},
        "rows": rows,
        "stage_seconds": {k: None if v is None else round(v, 1) for k, v in seconds.items()},
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
