"""PPO/GRPO throughput: rollout engines (hf vs vllm) and GRPO samples/s of rayalign vs TRL's GRPOTrainer.

    .venv/bin/python benchmarks/ppo_throughput.py                 # writes benchmarks/results/ppo_throughput.json
    .venv/bin/python benchmarks/ppo_throughput.py --model DIR --iterations 10 --prompts 16 --n 4

Part 1 -- rollout tokens/s of the ``hf`` and ``vllm`` engines on the same weights and the same sampling
workload (prompts x n samples, temperature 1). vLLM runs where ``import vllm`` works: in this
interpreter, else in ``.venv-vllm`` (this script re-runs itself there with ``--engines-only``; both
engines are then measured in that venv). Otherwise the reason it was skipped is recorded.

Part 2 -- GRPO, same tiny model, same generation settings (prompts x n completions of at most
``max_new_tokens``, temperature 1), full fine-tuning, one optimizer step per iteration over all
samples, KL coefficient ``beta`` (k3, in the loss) on both sides, dropout off, on the machine's 2 cores:
  * rayalign: the ``ppo`` stage with ``algorithm.advantage: grpo`` through the pipeline runner, in each
    rollout layout of ``LAYOUTS`` (one Ray Train worker; the engine in its process, or an hf engine
    actor sharing its cores, or an actor on a core of its own); samples/s from the wall time between
    iteration ends (median over the second half: rollout, scoring, experience, update, sync, verification
    and reporting all count), with that time split into its phases, and end to end (stage wall time,
    Ray start-up and the held-out scoring included);
  * TRL: ``GRPOTrainer`` in this process (HF ``generate``, no vLLM, 2 threads), run before and after
    rayalign's layouts; samples/s from the time between step ends (median over the second half) and from
    ``train_runtime``.
The ratio is rayalign / TRL (the mean of its two runs). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
PHASES = ("rollout", "scoring", "experience", "training", "sync", "verify")  # stages.ppo.records.PHASES


def addition_prompts(tokenizer, count: int) -> list[list[int]]:
    from stages.chat_templates import conversation_ids
    from stages.tasks import get_task

    records = get_task("addition").load("prompt", "train", count).records
    return [conversation_ids(tokenizer, [m.to_dict() for m in r.prompt], add_generation_prompt=True) for r in records]


def engine_throughput(model: str, engine: str, prompts: int, n: int, max_new_tokens: int, repeats: int = 2) -> dict:
    """Generated tokens / wall second for one engine (in this process), best of ``repeats`` after a warm-up."""
    from stages.rollout import SamplingParams, create_engine
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids = addition_prompts(tokenizer, prompts)
    started = time.perf_counter()
    eng = create_engine(engine, model)
    load_seconds = time.perf_counter() - started
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=0)
    eng.generate(ids[:2], params)  # warm-up
    runs = []
    for i in range(repeats):
        started = time.perf_counter()
        out = eng.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=i))
        seconds = time.perf_counter() - started
        tokens = sum(len(r.response_ids) for r in out)
        runs.append({"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1)})
    eng.close()
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {"engine": engine, "load_seconds": round(load_seconds, 2), "tokens_per_s": best["tokens_per_s"],
            "runs": runs, "python": repo_relative(sys.executable)}


def repo_relative(path: str) -> str:
    """A path as results should record it: relative to the repository when inside it (no machine paths)."""
    resolved = Path(path).absolute()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def engines_part(model: str, args) -> dict:
    from stages.rollout import vllm_status

    workload = {"prompts": args.prompts * 2, "n": args.n, "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0}
    out: dict = {"workload": workload, "model": repo_relative(model)}
    ok, why = vllm_status()
    out["hf"] = engine_throughput(model, "hf", workload["prompts"], args.n, args.max_new_tokens)
    if ok:
        out["vllm"] = engine_throughput(model, "vllm", workload["prompts"], args.n, args.max_new_tokens)
        out["vllm_venv"] = repo_relative(sys.executable)
        return out
    other = REPO / ".venv-vllm" / "bin" / "python"
    if args.engines_only or not other.exists():
        out["vllm"] = {"skipped": why + ("" if other.exists() else f"; no {other}")}
        return out
    # vLLM imports in the other venv: measure both engines there, on the same weights.
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        cmd = [str(other), __file__, "--engines-only", "--model", model, "--out", handle.name,
               "--prompts", str(args.prompts), "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            out["vllm"] = {"skipped": f"{other} run failed: {done.stderr[-1500:]}"}
            return out
        there = json.loads(Path(handle.name).read_text())["engines"]
    out["vllm"] = there["vllm"]
    out["hf_in_vllm_venv"] = there["hf"]
    out["vllm_over_hf"] = round(there["vllm"]["tokens_per_s"] / there["hf"]["tokens_per_s"], 2)
    return out


# Where the rollouts run: (what it is, the stage's rollout settings, the worker's CPUs, other stage settings),
# each on the same 2 cores.
LAYOUTS = {
    "trainer": ("the engine in the training worker's process (rollout.engine: trainer), 1 worker x 2 CPUs",
                {"engine": "trainer"}, 2, {}),
    "actor_colocated": ("an hf engine actor sharing the worker's 2 CPUs (rollout.colocate), 1 worker x 2 CPUs",
                        {"engine": "hf", "colocate": True}, 2, {}),
    "actor_separate": ("an hf engine actor on 1 CPU of its own, 1 worker x 1 CPU", {"engine": "hf"}, 1, {}),
    "actor_ahead": ("the same, generating one step ahead (rollout.off_policy_steps: 1, algorithm.tis_cap: 2)",
                    {"engine": "hf", "off_policy_steps": 1}, 1, {}),
    "actor_ahead_reference": ("the same, and the KL reference scoring in the engine's actor "
                              "(reference_placement: engine)",
                              {"engine": "hf", "off_policy_steps": 1}, 1, {"reference_placement": "engine"}),
}


def steady_part(values: list) -> list:
    """The second half of a run's iterations: a fresh Ray instance (its dashboard, the Train controller)
    still takes CPU for its first seconds, which slowed the first ~10 of 20 iterations on 2 cores."""
    return values[len(values) // 2:]


def grpo_stage(args, rollout: dict) -> dict:
    """The GRPO stage every rayalign layout runs (``rollout``: where its rollouts come from)."""
    return {"kind": "ppo", "from": "sft", "prompts": "builtin:addition", "reward_fn": "addition",
            "peft": {"method": "full"},
            "algorithm": {"advantage": "grpo", "kl_coef": args.beta, "kl_in": "loss", "kl_estimator": "k3",
                          # samples one update old get truncated importance weights (stages.rl.truncated_is_weights)
                          **({"tis_cap": 2.0} if rollout.get("off_policy_steps") else {})},
            "rollout": {"n": args.n, "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
                        "temperature": 1.0, **rollout},
            "train": {"max_steps": args.iterations, "lr": 1e-5, "batch_size": args.prompts * args.n,
                      "logging_steps": args.iterations, "lr_schedule": "constant"}}


def grpo_standalone(model: str, storage: Path, args) -> dict:
    """The same loop (``train_ppo_worker``, engine trainer) in this process, without Ray or Ray Train: what
    the loop costs apart from the Ray Train worker it normally runs in."""
    from stages.job import PPOJob, worker_arguments
    from stages.ppo.config import PPOConfig
    from stages.ppo.records import METRICS_FILE
    from stages.ppo.worker import train_ppo_worker
    from stages.sources import load_records

    storage.mkdir(parents=True, exist_ok=True)
    prompts = storage / "prompts.jsonl"
    records = load_records("builtin:addition/train", "prompt").records
    prompts.write_text("".join(json.dumps(r.to_trl()) + "\n" for r in records))
    config = PPOConfig.model_validate(grpo_stage(args, {"engine": "trainer"}))
    job = PPOJob(stage="grpo", work_dir=str(storage), model_dir=str(storage / "model"), model_source=model,
                 precision="fp32", threads=2, report_to="none", train_file=str(prompts), iterations=args.iterations,
                 critic_source=model)
    train_ppo_worker(worker_arguments(job, config, engines=[]))
    rows = [json.loads(line) for line in (storage / METRICS_FILE).read_text().splitlines()]
    steady = statistics.median(r["iteration_seconds"] for r in steady_part(rows))
    return {"layout": "train_ppo_worker in this process (no Ray), engine trainer, 2 threads",
            "iteration_seconds": [round(r["iteration_seconds"], 4) for r in rows],
            "samples_per_s_steady": round(args.prompts * args.n / steady, 2),
            "phase_seconds_median": {k: round(statistics.median(r[f"{k}_seconds"] for r in steady_part(rows)), 4)
                                     for k in PHASES}}


def grpo_rayalign(model: str, storage: Path, args, layout: str) -> dict:
    from pipeline.runner import run_pipeline
    from pipeline.spec import parse_spec

    _, rollout, cpus, settings = LAYOUTS[layout]
    stage = {**grpo_stage(args, rollout), "eval_limit": 1, "scaling": {"num_workers": 1, "cpus_per_worker": cpus},
             **settings}
    raw = {"name": f"bench-{int(time.time())}", "storage": str(storage), "tracking": {"backend": "none"},
           "ray": {"num_cpus": 4}, "stages": {"sft": {"data": "builtin:addition"}, "grpo": stage}}
    started = time.perf_counter()
    artifact = run_pipeline(parse_spec(raw), only=["grpo"], inputs={"base": model, "sft": model})["grpo"]
    wall = time.perf_counter() - started
    curves = artifact.manifest["curves"]
    iteration = [p["value"] for p in curves["iteration_seconds"]]
    samples = args.prompts * args.n
    steady = statistics.median(steady_part(iteration))
    phases = {k: round(statistics.median(p["value"] for p in steady_part(curves[f"{k}_seconds"])), 4) for k in PHASES}
    phases["other"] = round(max(0.0, steady - sum(phases.values())), 4)  # reporting, metric reduction, Python
    return {
        "layout": LAYOUTS[layout][0],
        "samples_per_iteration": samples,
        "iteration_seconds": [round(s, 4) for s in iteration],
        "samples_per_s_steady": round(samples / steady, 2),
        "samples_per_s_end_to_end": round(samples * args.iterations / wall, 2),
        "stage_wall_seconds": round(wall, 1),
        "rollout_tokens_per_s_median": round(statistics.median(p["value"] for p in curves["rollout_tokens_per_s"]), 1),
        "phase_seconds_median": phases,
        # how long generation took; more than the rollout phase (the wait) when it ran during the update
        "generate_seconds_median": round(statistics.median(p["value"] for p in steady_part(curves["generate_seconds"])), 4),
        "phase_share_of_iteration": {k: round(v / steady, 3) for k, v in phases.items()},
    }


def grpo_trl(model: str, out_dir: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from stages.tasks import get_task

    torch.set_num_threads(args.trl_threads)
    task = get_task("addition")
    records = task.load("prompt", "train", args.prompts * args.iterations).records
    dataset = Dataset.from_list([{"prompt": [m.to_dict() for m in r.prompt], "answer": r.answer} for r in records])
    by_text = {r.prompt[-1].content: r for r in records}

    def verifier(prompts, completions, **kwargs):
        return [task.reward(by_text[p[-1]["content"]], c[0]["content"]) for p, c in zip(prompts, completions)]

    class StepTimer(TrainerCallback):
        """Wall time between consecutive step ends (the first: from the first step's start), as rayalign's
        ``iteration_seconds``: data loading, generation, the update and logging all count."""

        def __init__(self):
            self.times, self.last = [], None

        def on_step_begin(self, a, state, control, **kw):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    config = GRPOConfig(
        output_dir=str(out_dir), max_steps=args.iterations, learning_rate=1e-5, lr_scheduler_type="constant",
        per_device_train_batch_size=args.prompts * args.n, num_generations=args.n,
        max_completion_length=args.max_new_tokens, temperature=1.0, beta=args.beta, num_iterations=1,
        use_cpu=True, bf16=False, gradient_checkpointing=False, disable_dropout=True, report_to=[],
        save_strategy="no", logging_steps=args.iterations, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        shuffle_dataset=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[verifier], args=config, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model), callbacks=[timer])
    result = trainer.train()
    samples = args.prompts * args.n
    steady = statistics.median(steady_part(timer.times))
    return {
        "samples_per_iteration": samples,
        "step_seconds": [round(s, 4) for s in timer.times],
        "samples_per_s_steady": round(samples / steady, 2),
        "samples_per_s_end_to_end": round(samples * args.iterations / result.metrics["train_runtime"], 2),
        "train_runtime": round(result.metrics["train_runtime"], 2),
        "resources": f"1 process, torch threads {args.trl_threads}, HF generate (use_vllm=False)",
    }


def grpo_part(model: str, args) -> dict:
    """TRL, each rayalign layout, TRL again (drift on a shared machine shows as the two TRL runs differing)."""
    out: dict = {"trl_runs": [], "rayalign": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out["trl_runs"].append(grpo_trl(model, Path(tmp) / "trl-1", args))
        for layout in args.layouts.split(","):
            if layout == "standalone":
                out["rayalign"][layout] = grpo_standalone(model, Path(tmp) / "standalone", args)
            else:
                out["rayalign"][layout] = grpo_rayalign(model, Path(tmp), args, layout)
        out["trl_runs"].append(grpo_trl(model, Path(tmp) / "trl-2", args))
    trl = {key: statistics.mean(r[key] for r in out["trl_runs"])
           for key in ("samples_per_s_steady", "samples_per_s_end_to_end")}
    out["trl_mean"] = {k: round(v, 2) for k, v in trl.items()}
    out["ratio_rayalign_over_trl_steady"] = {
        layout: round(r["samples_per_s_steady"] / trl["samples_per_s_steady"], 2) for layout, r in out["rayalign"].items()}
    out["ratio_rayalign_over_trl_end_to_end"] = {
        layout: round(r["samples_per_s_end_to_end"] / trl["samples_per_s_end_to_end"], 2)
        for layout, r in out["rayalign"].items() if "samples_per_s_end_to_end" in r}
    return out


def build_model(cache: Path) -> str:
    from stages.tiny_base import build_tiny_base

    model = cache / "tiny-base"
    if not (model / "config.json").exists():
        build_tiny_base(model, pretrain_steps=30, seed=0)
    return str(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF causal-LM folder (default: the builtin tiny base, built once)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ppo_throughput.json"))
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per iteration")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3, in the loss), both sides")
    parser.add_argument("--trl-threads", type=int, default=2)
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"rayalign's, of {', '.join(LAYOUTS)} and standalone (the loop without Ray)")
    parser.add_argument("--skip-engines", action="store_true", help="only part 2")
    parser.add_argument("--engines-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    cache = REPO / ".cache" / "benchmarks"  # git-ignored
    cache.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(cache)
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                                "load_average_at_start": os.getloadavg()},
                    "settings": {k: v for k, v in vars(args).items() if k not in ("out", "engines_only")}}
    if not args.skip_engines:
        result["engines"] = engines_part(model, args)
    if not args.engines_only:
        result["grpo"] = grpo_part(model, args)
        result["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result if not args.engines_only else result["engines"], indent=2))


if __name__ == "__main__":
    main()
