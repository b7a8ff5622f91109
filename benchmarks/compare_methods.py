"""Every adaptation method (``peft.method``) on the same SFT budget: trainable parameters, peak worker
memory, steps/s, wall time and held-out accuracy, in place of the course's "High/Low/Good" words
(``../shared/course/fine-tuning-and-adaptation.md``, its method table).

    .venv/bin/python benchmarks/compare_methods.py     # 5-10 min on 2 cores
    .venv/bin/python benchmarks/compare_methods.py --methods lora,full --steps 20 --heldout 100 --out x.json

Each method is one ``sft`` stage run by rayalign's own pipeline runner (``pipeline.runner.run_pipeline`` on a
spec built by :func:`method_spec`, as ``rayalign run`` would), so the numbers are what users get: one Ray
Train worker with 2 CPUs (2 torch threads, nice 0: see ``main``), no DeepSpeed, the built-in addition task, ``STEPS`` steps of
``BATCH`` conversations of at most 32 tokens, a cosine schedule with 5% warmup. Only the learning rate differs,
per method family (``METHODS``): methods that train few parameters from a zero or small start need larger
rates. The base is ``tiny-llama-4m`` (``stages.tiny_base.VARIANTS``; 4.2M parameters, 300 pretraining
steps; BitFit uses its ``-bias`` twin, which has biases in every projection), built once into the
git-ignored ``.cache/benchmarks``; ``--base tiny-llama`` runs the 0.5M base instead.

Per method:

* trainable parameters and their share of the total: the stage manifest's ``model_summary`` (the trainer's
  model: for prompt and prefix tuning the total includes the virtual tokens and their MLP; for QLoRA the
  total is the base's count plus the adapter's, as the manifest counts packed 4-bit bytes);
* peak RSS of the Ray Train worker process: measured here, because the training log does not record
  memory. A thread polls the driver's descendant processes every 0.1 s with psutil; for each Ray Train
  worker (``RayTrainWorker`` in its title) it resets the kernel's high-water mark when it first sees the
  process (``/proc/<pid>/clear_refs`` 5) and then reads ``VmHWM`` (the kernel's own peak RSS, so a spike
  between two polls still counts);
* steps/s: the trainer's ``train_steps_per_second`` (the training loop only); wall time: the stage's
  manifest ``seconds`` (data preparation, the Ray Train worker group, training, saving);
* held-out accuracy: greedy answers (8 new tokens) to the task's first ``--heldout`` test problems from the
  saved output loaded as a user would (transformers, peft, or ``stages.bottleneck_adapter``), graded by the
  task's verifier, with its 95% Wilson interval (``stages.tasks.grading``). The SFT data's demonstrator drops
  the carry 65% of the time (``configs/tiny.yaml``), so a perfect imitator scores about 0.35 on problems with
  a carry and 1.0 on the others: see ``ceiling`` in the JSON.

Writes ``benchmarks/results/compare_methods.json``, ``compare_methods.png`` next to it, and the run's report
``compare_methods.md`` (the budget, the table and the plot), and prints the table. The machine's load average at start and end is in the JSON (other jobs share the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = REPO / ".cache" / "benchmarks"
RESULTS = REPO / "benchmarks" / "results"
BASE_PRETRAIN_STEPS = 300
STEPS = 80
BATCH = 16
TASK = "addition"

# peft.method -> its stage settings: the peft section, the learning rate, and whether it needs the biased base.
# Rates: full fine-tuning at tiny.yaml's order of magnitude; the LoRA family at the usual 10x of full; the
# methods that train a few vectors (IA3 scales, biases, virtual tokens) higher still, as their papers do.
METHODS: dict[str, dict] = {
    "full": {"peft": {"method": "full"}, "lr": 1.0e-3},
    "lora": {"peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}, "lr": 3.0e-3},
    "qlora": {"peft": {"method": "qlora", "r": 16, "alpha": 32, "dropout": 0.0}, "lr": 3.0e-3},
    "dora": {"peft": {"method": "dora", "r": 16, "alpha": 32, "dropout": 0.0}, "lr": 3.0e-3},
    "ia3": {"peft": {"method": "ia3"}, "lr": 3.0e-2},
    "prompt_tuning": {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 16}, "lr": 3.0e-2},
    "prefix_tuning": {"peft": {"method": "prefix_tuning", "num_virtual_tokens": 16}, "lr": 1.0e-2},
    "bitfit": {"peft": {"method": "bitfit"}, "lr": 1.0e-2, "bias_base": True},
    "adapter": {"peft": {"method": "adapter", "adapter_size": 64}, "lr": 3.0e-3},
}
# The course's words for each method (its "Method Comparison" table; BitFit and DoRA are not in it).
COURSE = {
    "full": "100%, memory High, speed Slow, quality Best",
    "lora": "0.1-1%, memory Low, speed Fast, quality Good",
    "qlora": "0.1-1%, memory Very Low, speed Medium, quality Good",
    "dora": "(not in the table)",
    "ia3": "(not in the table)",
    "prompt_tuning": "<0.01%, memory Minimal, speed Very Fast, quality OK",
    "prefix_tuning": "<0.1%, memory Minimal, speed Fast, quality Good",
    "bitfit": "(not in the table)",
    "adapter": "1-5%, memory Low, speed Fast, quality Good",
}


# --------------------------------------------------------------------------- specs


def stage_config(method: str, steps: int = STEPS, batch: int = BATCH) -> dict:
    """The ``sft`` stage of ``method``: the shared budget plus the method's peft section and rate."""
    entry = METHODS[method]
    return {
        "kind": "sft",
        "from": "base",
        "data": {"path": f"builtin:{TASK}", "limit": steps * batch},  # one pass: every step sees new problems
        "peft": dict(entry["peft"]),
        "train": {"max_steps": steps, "lr": entry["lr"], "lr_schedule": "cosine", "warmup_ratio": 0.05,
                  "batch_size": batch, "max_length": 32, "logging_steps": max(1, steps // 10), "seed": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
    }


def base_name(method: str, base: str) -> str:
    return f"{base}-bias" if METHODS[method].get("bias_base") else base


def method_spec(method: str, storage: Path, base_dir: Path | str, steps: int = STEPS, batch: int = BATCH):
    """The pipeline spec of one method: the base folder and its ``sft`` stage (validated like a file)."""
    from pipeline.spec import parse_spec

    raw = {"name": f"compare-{method}", "storage": str(storage), "ray": {"num_cpus": 2},
           "base": {"model": str(base_dir)}, "tracking": {"backend": "none"},
           "stages": {"sft": stage_config(method, steps, batch)}}
    return parse_spec(raw, where=f"compare_methods[{method}]")


def built_base(name: str) -> tuple[Path, dict]:
    """The builtin base ``name`` built once into ``.cache/benchmarks`` (two torch threads), with its build info."""
    from stages.tiny_base import VARIANTS, build_tiny_base

    folder = CACHE / f"{name}-{BASE_PRETRAIN_STEPS}"
    if not (folder / "build_info.json").exists():
        build_tiny_base(folder, name=name, pretrain_steps=BASE_PRETRAIN_STEPS, seed=0, torch_threads=2,
                        **VARIANTS[name])
    return folder, json.loads((folder / "build_info.json").read_text())


# --------------------------------------------------------------------------- worker memory


class WorkerPeakRSS:
    """The peak RSS of each Ray Train worker process under this driver, while the ``with`` block runs."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak_hwm: dict[int, int] = {}  # pid -> max VmHWM seen (bytes), after the reset
        self.peak_sampled: dict[int, int] = {}  # pid -> max sampled RSS (bytes): a cross-check
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> WorkerPeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    if "RayTrainWorker" not in " ".join(proc.cmdline()):
                        continue
                    if proc.pid not in self.peak_hwm:
                        # Start the kernel's high-water mark here: the process may be a reused pool worker.
                        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                    rss = proc.memory_info().rss
                    hwm = _vm_hwm(proc.pid)
                except (psutil.Error, OSError):
                    continue
                self.peak_sampled[proc.pid] = max(self.peak_sampled.get(proc.pid, 0), rss)
                self.peak_hwm[proc.pid] = max(self.peak_hwm.get(proc.pid, 0), hwm or rss)
            self._stop.wait(self.interval)

    def result(self) -> dict:
        mib = 1024 * 1024
        return {"workers": len(self.peak_hwm),
                "peak_rss_mib": round(max(self.peak_hwm.values(), default=0) / mib, 1),
                "peak_rss_sampled_mib": round(max(self.peak_sampled.values(), default=0) / mib, 1)}


def _vm_hwm(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


# --------------------------------------------------------------------------- held-out accuracy


def load_output(model_dir: Path):
    """A stage's saved output as a user loads it: transformers, peft on its base, or the bottleneck loader."""
    from transformers import AutoModelForCausalLM

    from stages.models import adapter_base, model_type_of

    kind = model_type_of(model_dir)
    if kind == "full":
        return AutoModelForCausalLM.from_pretrained(model_dir)
    if kind == "bottleneck-adapter":
        from stages.bottleneck_adapter import load_adapted_model

        return load_adapted_model(model_dir)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_base(model_dir)), str(model_dir))


def heldout_accuracy(model_dir: Path, limit: int, max_new_tokens: int = 8, batch: int = 100) -> dict:
    """Greedy answers to the task's first ``limit`` test problems, graded by its verifier; 95% Wilson interval."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils.logging import disable_progress_bar

    from stages.chat_templates import conversation_ids
    from stages.tasks import get_task
    from stages.tasks.grading import grade, wilson_interval

    disable_progress_bar()  # one "Loading weights" bar per load otherwise
    task = get_task(TASK)
    prompts = task.load("prompt", "test", limit).records
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_output(model_dir).eval()
    pad = tokenizer.pad_token_id
    responses: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            ids = [conversation_ids(tokenizer, [m.to_dict() for m in p.prompt], add_generation_prompt=True)
                   for p in prompts[start:start + batch]]
            width = max(map(len, ids))  # left padding: every prompt ends where generation starts
            input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            responses += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    correct, categories = grade(task, prompts, responses)
    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n)
    return {"accuracy": round(k / n, 4), "correct": k, "n": n, "ci95": [round(low, 4), round(high, 4)],
            "examples": [{"prompt": prompts[i].prompt[-1].content, "response": responses[i]} for i in range(3)]}


def ceiling(limit: int) -> dict:
    """What the flawed demonstrator itself scores on the same problems: the accuracy a perfect imitator reaches."""
    from stages.tasks import get_task

    task = get_task(TASK)
    prompts = task.load("prompt", "test", limit).records
    demos = task.load("sft", "test", limit).records
    right = sum(bool(task.verify(p, d.messages[-1].content)) for p, d in zip(prompts, demos, strict=True))
    return {"demonstrator_accuracy": round(right / len(prompts), 4), "n": len(prompts)}


# --------------------------------------------------------------------------- one method


def run_method(method: str, storage: Path, base: str, steps: int, batch: int, heldout: int) -> dict:
    from pipeline.runner import run_pipeline

    base_dir, info = built_base(base_name(method, base))
    spec = method_spec(method, storage, base_dir, steps, batch)
    started = time.monotonic()
    with WorkerPeakRSS() as memory:
        artifact = run_pipeline(spec)["sft"]  # the base is a folder: nothing to build
    wall = time.monotonic() - started
    manifest, metrics = artifact.manifest, artifact.manifest["metrics"]
    summary = manifest["model_summary"]
    evaluated = time.monotonic()
    accuracy = heldout_accuracy(Path(artifact.model_dir), heldout)
    return {
        "method": method, "base": info["name"], "base_parameters": info["parameters"], "lr": METHODS[method]["lr"],
        "peft": METHODS[method]["peft"],
        "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
        "trainable_pct": trainable_pct(summary, info["parameters"]),
        **memory.result(),
        "steps": metrics["global_step"], "steps_per_s": round(metrics["train_steps_per_second"], 3),
        "train_runtime_s": round(metrics["train_runtime"], 1), "stage_s": round(manifest["seconds"], 1),
        "run_pipeline_s": round(wall, 1),
        "first_loss": round(metrics["first_loss"], 4), "final_loss": round(metrics["final_loss"], 4),
        "model_type": manifest["model_type"], "heldout": accuracy, "eval_s": round(time.monotonic() - evaluated, 1),
    }


def trainable_pct(summary: dict, base_parameters: int) -> float:
    """Trainable parameters as a share of the model's. Under QLoRA the manifest's total counts the 4-bit
    weights as stored (two per byte), so there the total is the base's parameters plus the adapter's."""
    total = summary["total_params"]
    if summary.get("linear4bit_modules"):
        total = base_parameters + summary["trainable_params"]
    return round(100 * summary["trainable_params"] / total, 4)


# --------------------------------------------------------------------------- report


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | trainable | % of total | peak RSS (MiB) | steps/s | stage wall (s) | loss first -> last "
             "| held-out accuracy [95% CI] | the course says |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped: {r['skipped']} | | | | | | | {COURSE[r['method']]} |")
            continue
        h = r["heldout"]
        lines.append(f"| {r['method']} | {fmt_params(r['trainable_params'])} | {r['trainable_pct']:.3g}% | "
                     f"{r['peak_rss_mib']:.0f} | {r['steps_per_s']:.2f} | {r['stage_s']:.0f} | "
                     f"{r['first_loss']:.2f} -> {r['final_loss']:.2f} | "
                     f"{h['accuracy']:.3f} [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}] | {COURSE[r['method']]} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "skipped" not in r]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.5))
    for r in rows:
        h, x = r["heldout"], max(r["trainable_pct"], 1e-4)
        err = [[h["accuracy"] - h["ci95"][0]], [h["ci95"][1] - h["accuracy"]]]
        axes[0].errorbar(x, h["accuracy"], yerr=err, fmt="o", capsize=3)
        axes[0].annotate(r["method"], (x, h["accuracy"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        axes[1].plot(x, r["final_loss"], "o")
        axes[1].annotate(r["method"], (x, r["final_loss"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    axes[0].set(xscale="log", xlabel="trainable parameters (% of total, log)", ylabel="held-out accuracy (95% CI)")
    # One pass over the data: every logged batch is unseen, so the last logged loss is a held-out loss too.
    axes[1].set(xscale="log", xlabel="trainable parameters (% of total, log)",
                ylabel="last logged training loss (unseen batches)")
    names = [r["method"] for r in rows]
    axes[2].barh(names, [r["peak_rss_mib"] for r in rows])
    axes[2].set(xlabel="peak RSS of the Ray Train worker (MiB)")
    axes[3].barh(names, [r["steps_per_s"] for r in rows])
    axes[3].set(xlabel="training steps/s")
    for ax in axes[2:]:
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, json_path: Path) -> Path:
    """The run's report, ``<out>.md`` beside the JSON: its budget, the table and the plot (``<out>.png``)."""
    budget, rows = result["budget"], result["methods"]
    report = json_path.with_suffix(".md")
    report.write_text("\n".join([
        f"# Adaptation methods compared: {budget['steps']} SFT steps x {budget['batch_size']} on "
        f"{', '.join(result['bases'])}",
        "",
        f"`{result['command']}`: {result['wall_s']} s, load average {result['loadavg_start'][0]} -> "
        f"{result['loadavg_end'][0]} on {result['machine']['cpus']} CPUs. Task `{budget['task']}`, max length "
        f"{budget['max_length']}, {budget['lr_schedule']}, {budget['workers']} Ray Train worker of "
        f"{budget['cpus_per_worker']} CPUs, learning rates {budget['lr']}. Held-out accuracy on "
        f"{budget['heldout_problems']} test problems; the demonstrator itself scores "
        f"{result['ceiling']['demonstrator_accuracy']}.",
        "",
        markdown_table(rows),
        "",
        f"![accuracy, loss, memory and speed per method]({json_path.with_suffix('.png').name})",
        ""]))
    return report


# --------------------------------------------------------------------------- main


def qlora_problem() -> str | None:
    """Why QLoRA cannot run here (None: bitsandbytes imports and quantizes a layer on this CPU)."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer.weight = layer.weight.to("cpu")
        layer(torch.randn(2, 64))
    except Exception as err:  # any failure means: record it and go on with the other methods
        return f"bitsandbytes 4-bit on this CPU failed: {type(err).__name__}: {err}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated peft methods")
    parser.add_argument("--base", default="tiny-llama-4m", choices=["tiny-llama-4m", "tiny-llama"])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--heldout", type=int, default=400, help="test problems graded per method")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare_methods.json")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")

    # Ray starts its workers at nice 15; on this shared machine other jobs' nice-0 processes then starved the
    # Ray Train worker (a trial run: 0.05 steps/s, 18 s a step). Nice 0 measures the method, not the scheduler.
    os.environ.setdefault("RAY_worker_niceness", "0")
    load_start, started = os.getloadavg(), time.monotonic()
    bases = {base_name(m, args.base) for m in methods}
    base_info = {}
    for name in sorted(bases):
        built = time.monotonic()
        folder, info = built_base(name)
        base_info[name] = {"parameters": info["parameters"], "pretrain_steps": info["pretrain_steps"],
                           "final_pretrain_loss": info["final_loss"], "folder": str(folder.relative_to(REPO)),
                           "build_s_this_run": round(time.monotonic() - built, 1)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="compare-methods-") as storage:
        for method in methods:
            if method == "qlora" and (problem := qlora_problem()):
                rows.append({"method": method, "skipped": problem})
                continue
            try:
                rows.append(run_method(method, Path(storage), args.base, args.steps, args.batch, args.heldout))
            except Exception as err:  # one method's failure is a row of the table, not the end of the run
                rows.append({"method": method, "skipped": f"failed: {type(err).__name__}: {str(err)[:300]}"})
                print(f"{method} failed: {err!r}", flush=True)
                continue
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "heldout"} | {
                "accuracy": rows[-1]["heldout"]["accuracy"]}), flush=True)
    import ray

    ray.shutdown()
    result = {
        "benchmark": "compare_methods",
        "command": " ".join(["benchmarks/compare_methods.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - started, 1),
        "budget": {"task": TASK, "steps": args.steps, "batch_size": args.batch, "max_length": 32,
                   "lr_schedule": "cosine, warmup 5%", "workers": 1, "cpus_per_worker": 2, "deepspeed": None,
                   "ray_worker_niceness": os.environ["RAY_worker_niceness"],
                   "lr": {m: METHODS[m]["lr"] for m in methods}, "heldout_problems": args.heldout},
        "bases": base_info,
        "ceiling": ceiling(args.heldout),
        "memory_measurement": "VmHWM of each Ray Train worker process (RayTrainWorker in its title), reset via "
                              "/proc/<pid>/clear_refs when first seen, polled every 0.1 s with psutil",
        "methods": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"),
         f"{args.steps} SFT steps x {args.batch} on {args.base} (2 CPUs); load {result['loadavg_start'][0]}"
         f"-{result['loadavg_end'][0]}")
    print(markdown_table(rows))
    print(f"wrote {args.out}, its plot and its report {write_report(result, args.out)} in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
