"""Full-weight sync from the trainer to a rollout-engine actor: today's state_dict path vs the weight stream.

    .venv-vllm/bin/python benchmarks/weight_sync.py --out benchmarks/results/weight_sync.json   # hf + vllm
    .venv/bin/python benchmarks/weight_sync.py --engines hf --out /tmp/weight_sync.json          # hf only

Models: the builtin tiny base (540k parameters, tied embeddings) and a random-init Llama of ~95M
parameters (hidden 768, 12 layers, 12 heads, intermediate 1536, vocab 32000, tied embeddings, float32),
both built once into the git-ignored ``.cache/benchmarks``. Engines: ``hf`` and ``vllm`` (where
``import vllm`` works), one engine actor (1 CPU) at a time; this process is trainer rank 0 and calls
``stages.ppo.sync.push_full_weights`` with an ``ActorCritic`` over the model, as a PPO worker does:

* ``state_dict`` (today): gathered state_dict -> ``ray.put`` -> the actor -> (vLLM) a safetensors blob
  through ``collective_rpc`` -> ``reload_weights``;
* ``stream_per_tensor``: one broadcast per tensor over a gloo group of this process and the engine's
  weight-holding process (``stages.rollout.weight_stream``, ``rollout.sync_bucket_mb: 0``);
* ``stream``: the same group, consecutive tensors of one dtype sharing a broadcast of at most the default
  ``rollout.sync_bucket_mb``. The group is formed (timed apart as ``group_form_seconds``) once, before the
  timed syncs, and reused by all of them.

Each repeat runs the three paths (state_dict first). Per sync: wall seconds, and the peak RSS growth of the
trainer (this process) and of the process holding the engine's weights (hf: the actor; vllm: its
EngineCore child process): VmHWM after the sync minus VmRSS before it, with the high-water mark reset
(``/proc/<pid>/clear_refs``) just before. After the last sync of each path the engine's log-probs are
checked against the source model. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from stages.ppo.config import SYNC_BUCKET_MB  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# path -> (rollout.sync, rollout.sync_bucket_mb): the object store; one broadcast per tensor; the default buckets.
MODES = {"state_dict": ("state_dict", 0), "stream_per_tensor": ("stream", 0), "stream": ("stream", SYNC_BUCKET_MB)}
VLLM_KWARGS = {"max_model_len": 256, "seed": 0}


# --- models -------------------------------------------------------------------------------------


def build_models(cache: Path) -> dict[str, str]:
    from stages.tiny_base import build_tiny_base

    tiny = cache / "tiny-base"
    if not (tiny / "config.json").exists():
        build_tiny_base(tiny, pretrain_steps=30, seed=0)
    llama = cache / "llama-95m"
    if not (llama / "config.json").exists():
        build_llama_95m(llama, tokenizer_from=tiny)
    return {"tiny": str(tiny), "llama_95m": str(llama)}


def build_llama_95m(out: Path, tokenizer_from: Path) -> None:
    """Random init; the tiny base's tokenizer (ids < 32000) is enough for vLLM to start and score."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=1536, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_trainer(path: str):
    """What a PPO worker syncs from: an ActorCritic over the causal LM (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    from stages.ppo.policy import ActorCritic

    return ActorCritic(AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval())


def perturb(trainer, seed: int) -> None:
    """New weights for every sync (as after an update), so no path can get away with a stale copy."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainer.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))


# --- memory ---------------------------------------------------------------------------------------


def status_kib(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) for key in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0; same user)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def weight_process(actor_pid: int, engine: str) -> int:
    """The pid whose memory holds the engine's weights: the actor (hf) or vLLM's EngineCore child."""
    if engine != "vllm":
        return actor_pid
    import psutil

    children = psutil.Process(actor_pid).children(recursive=True)
    core = [c for c in children if "EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name()]
    return (core or sorted(children, key=lambda c: c.memory_info().rss))[-1].pid


# --- one engine -----------------------------------------------------------------------------------


def timed_sync(trainer, group, mode: str, step: int, pids: dict[str, int]) -> dict:
    from stages.ppo.sync import push_full_weights

    before = {}
    for role, pid in pids.items():
        reset_peak(pid)
        before[role] = status_kib(pid)["VmRSS"]
    started = time.perf_counter()
    sync, bucket_mb = MODES[mode]
    [info] = push_full_weights(trainer, group, step=step, mode=sync, bucket_mb=bucket_mb)
    seconds = time.perf_counter() - started
    record = {"method": info.method, "sync_seconds": round(seconds, 4), "engine_seconds": round(info.seconds, 4),
              "broadcasts": info.details.get("broadcasts")}
    for role, pid in pids.items():
        after = status_kib(pid)
        record[f"{role}_peak_rss_mib"] = round(after["VmHWM"] / 1024, 1)
        record[f"{role}_peak_growth_mib"] = round((after["VmHWM"] - before[role]) / 1024, 1)
    return record


def max_logprob_error(trainer, group, tokenizer) -> float:
    import torch

    P = [tokenizer("Q: 47+38=", add_special_tokens=True)["input_ids"]]
    R = [tokenizer(" A: 85", add_special_tokens=False)["input_ids"]]
    scored = group.score(P, R)[0]
    with torch.no_grad():
        ids = torch.tensor([P[0] + R[0]])
        logp = torch.log_softmax(trainer.policy(input_ids=ids).logits[0, :-1].float(), dim=-1)
        ref = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)[len(P[0]) - 1:].tolist()
    return max(abs(a - b) for a, b in zip(scored, ref))


def bench_engine(model_path: str, engine: str, repeats: int) -> dict:
    from transformers import AutoTokenizer

    from stages.rollout.actors import RolloutGroup, create_rollout_engines

    started = time.perf_counter()
    workers = create_rollout_engines(1, engine, model_path, num_cpus=1,
                                     engine_kwargs=VLLM_KWARGS if engine == "vllm" else None)
    group = RolloutGroup(workers)
    out: dict = {"engine_start_seconds": round(time.perf_counter() - started, 1)}
    try:
        actor_pid = group.info()[0]["pid"]
        pids = {"trainer": os.getpid(), "engine": weight_process(actor_pid, engine)}
        trainer = load_trainer(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        out["parameters"] = sum(p.numel() for p in trainer.parameters())
        form_started = time.perf_counter()
        why = group.prepare_weight_stream(backend="gloo")
        if why is not None:
            raise RuntimeError(f"no weight-stream group with the {engine} engine: {why}")
        out["group_form_seconds"] = round(time.perf_counter() - form_started, 3)
        step = 0
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:
                step += 1
                perturb(trainer, step)
                runs[mode].append(timed_sync(trainer, group, mode, step, pids))
                if len(runs[mode]) == repeats:
                    runs[mode][-1]["max_logprob_error"] = round(max_logprob_error(trainer, group, tokenizer), 8)
        out["runs"] = runs
        out["summary"] = summarize(runs)
    finally:
        group.shutdown()
    return out


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Median seconds and the largest peak growths per path; ratios today / stream."""
    summary: dict = {}
    for mode, records in runs.items():
        summary[mode] = {
            "method": records[-1]["method"],
            "broadcasts": records[-1].get("broadcasts"),
            "sync_seconds_median": round(statistics.median(r["sync_seconds"] for r in records), 4),
            "trainer_peak_growth_mib_max": max(r["trainer_peak_growth_mib"] for r in records),
            "engine_peak_growth_mib_max": max(r["engine_peak_growth_mib"] for r in records),
            "trainer_peak_rss_mib_max": max(r["trainer_peak_rss_mib"] for r in records),
            "engine_peak_rss_mib_max": max(r["engine_peak_rss_mib"] for r in records),
        }
    for slower in ("state_dict", "stream_per_tensor"):
        summary[f"ratio_{slower}_over_stream"] = {
            key: round(summary[slower][key] / summary["stream"][key], 2) if summary["stream"][key] else None
            for key in ("sync_seconds_median", "trainer_peak_growth_mib_max", "engine_peak_growth_mib_max")
        }
    return summary


# --- main -----------------------------------------------------------------------------------------


def engines_here(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    from stages.rollout import vllm_status

    ok, why = vllm_status()
    skipped = {} if ok or "vllm" not in wanted else {"vllm": why}
    return [e for e in wanted if e != "vllm" or ok], skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "weight_sync.json"))
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    parser.add_argument("--models", default="tiny,llama_95m", help="comma-separated: tiny, llama_95m")
    parser.add_argument("--repeats", type=int, default=3, help="syncs per path and engine (after the first stream)")
    args = parser.parse_args()

    import ray

    from pipeline.cluster import DRIVER_ENV

    cache = REPO / ".cache" / "benchmarks"  # git-ignored
    cache.mkdir(parents=True, exist_ok=True)
    models = build_models(cache)
    engines, skipped = engines_here(args.engines.split(","))
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                                "load_average_at_start": os.getloadavg()},
                    "settings": {"engines": engines, "models": args.models.split(","), "repeats": args.repeats,
                                 "engine_actor_cpus": 1, "dtype": "float32", "group_backend": "gloo"},
                    "skipped": skipped, "results": {}}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(DRIVER_ENV)})
    try:
        for model in args.models.split(","):
            for engine in engines:
                print(f"== {model} / {engine}", flush=True)
                record = bench_engine(models[model], engine, args.repeats)
                result["results"][f"{model}/{engine}"] = record
                print(json.dumps(record["summary"], indent=2), flush=True)
    finally:
        ray.shutdown()
    result["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
