"""The GPU check: rayalign's training code on one GPU, without Ray, in one call of under 10 minutes.

    python benchmarks/gpu/gpu_check.py                 # on a GPU machine -> benchmarks/results/gpu_check.json
    python benchmarks/gpu/gpu_check.py --dry-run       # the same steps on the CPU with a tiny model (make test)

It needs torch, transformers, peft and pydantic only (the GPU machine has no Ray, vLLM, DeepSpeed,
TRL or datasets): the stage code runs as a standalone worker (``stages.train_session``: world size 1).

* the model: a randomly initialised Llama-shaped model of ~1.2B parameters (Llama-3.2-1B's shape and
  128k vocabulary; no hub download) in bf16, written as a HF folder;
* SFT with LoRA (``stages.ppo.policy.load_policy``: the loader the training stages use; r 16 on every
  linear layer, gradient checkpointing, AdamW) on random token batches: tokens/s and MFU. FLOPs per
  token = 4N + 8 L s h (forward 2N, backward input gradients 2N -- the frozen weights get no weight
  gradient under LoRA -- plus attention); peak = H200 bf16 dense 790 TFLOP/s. TRL's SFTTrainer adds
  data plumbing around the same forward/backward;
* one PPO iteration: ``stages.ppo.worker.train_ppo_worker`` itself, standalone, with an ``hf`` rollout
  engine on the same GPU (``stages.rollout.local``): rollout tokens/s and the seconds of experience,
  update and LoRA sync, from the worker's own per-iteration metrics;
* peak GPU memory of each part.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

H200_BF16_PEAK_FLOPS = 790e12
# Llama-3.2-1B's shape (no hub: the weights are random, the cost is the same).
GPU_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
DRY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
GPU_RUN = dict(sft_steps=12, sft_warmup=3, batch=8, seq_len=1024, prompts=64, n=4, max_new_tokens=128)
DRY_RUN = dict(sft_steps=3, sft_warmup=1, batch=2, seq_len=32, prompts=4, n=2, max_new_tokens=8)


def build_model(out: Path, shape: dict, dtype: str) -> int:
    """A random Llama of ``shape`` with the character tokenizer (ids beyond it decode to nothing); its size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.tiny_base import build_char_tokenizer

    tokenizer = build_char_tokenizer(model_max_length=4096)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True, dtype=dtype,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def sft_lora(model_dir: Path, precision: str, shape: dict, run: dict) -> dict:
    """LoRA SFT steps on random tokens: tokens/s, MFU and peak memory."""
    import torch

    from stages.config import PeftConfig
    from stages.ppo.policy import load_policy
    from stages.train_session import device

    here = device()
    model = load_policy(str(model_dir), PeftConfig(method="lora", r=16, alpha=32), precision,
                        gradient_checkpointing=True).to(here)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak(here)
    generator = torch.Generator().manual_seed(0)
    started = None
    for step in range(run["sft_steps"]):
        if step == run["sft_warmup"]:
            synchronize(here)
            started = time.perf_counter()
        ids = torch.randint(0, shape["vocab_size"], (run["batch"], run["seq_len"]), generator=generator).to(here)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(here)
    seconds = time.perf_counter() - started
    tokens = (run["sft_steps"] - run["sft_warmup"]) * run["batch"] * run["seq_len"]
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 4 * n_params + 8 * shape["num_hidden_layers"] * run["seq_len"] * shape["hidden_size"]
    tokens_per_s = tokens / seconds
    out = {"tokens_per_s": tokens_per_s, "seconds": seconds, "tokens": tokens, "final_loss": float(loss.detach()),
           "flops_per_token": flops_per_token, "peak_memory_gib": peak_gib(here)}
    if here.type == "cuda":
        out["mfu"] = tokens_per_s * flops_per_token / H200_BF16_PEAK_FLOPS
    del model, optimizer
    return out


def ppo_iteration(model_dir: Path, precision: str, run: dict, work: Path) -> dict:
    """``train_ppo_worker`` standalone for one iteration with an hf engine in this process."""
    from stages.job import PPOJob, worker_arguments
    from stages.ppo.config import PPOConfig
    from stages.ppo.records import METRICS_FILE
    from stages.ppo.worker import train_ppo_worker
    from stages.rollout.hf_engine import HFEngine
    from stages.sources import load_records
    from stages.train_session import device

    here = device()
    use_gpu = here.type == "cuda"
    prompts = work / "prompts.jsonl"
    records = load_records("builtin:addition/train", "prompt", limit=run["prompts"]).records
    prompts.write_text("".join(json.dumps(r.to_trl()) + "\n" for r in records))
    config = PPOConfig.model_validate({
        "kind": "ppo", "from": "base", "prompts": "builtin:addition", "reward_fn": "addition",
        "peft": {"method": "lora", "r": 16, "alpha": 32}, "algorithm": {"advantage": "grpo"},
        "scaling": {"use_gpu": use_gpu}, "train": {"precision": precision, "batch_size": 16, "max_steps": 1},
        "rollout": {"engine": "hf", "n": run["n"], "prompts_per_step": run["prompts"],
                    "max_new_tokens": run["max_new_tokens"]}})
    job = PPOJob(stage="ppo", work_dir=str(work), model_dir=str(work / "model"), model_source=str(model_dir),
                 precision=precision, threads=4, report_to="none", train_file=str(prompts), iterations=1,
                 critic_source=str(model_dir))
    engine = HFEngine(model_dir, dtype={"bf16": "bfloat16", "fp32": "float32"}[precision], device=str(here))
    reset_peak(here)
    started = time.perf_counter()
    train_ppo_worker(worker_arguments(job, config, engines=[engine]))
    metrics = json.loads((work / METRICS_FILE).read_text().splitlines()[-1])
    keys = ("rollout_tokens", "rollout_tokens_per_s", "rollout_seconds", "experience_seconds", "training_seconds",
            "sync_seconds", "sync_method", "iteration_seconds", "training_tokens_per_s", "samples")
    return {**{k: metrics[k] for k in keys if k in metrics}, "wall_seconds": time.perf_counter() - started,
            "peak_memory_gib": peak_gib(here)}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps (what make test runs)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    import torch
    import transformers

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run, or on a GPU machine")
    shape, run = (DRY_SHAPE, DRY_RUN) if args.dry_run else (GPU_SHAPE, GPU_RUN)
    precision = "fp32" if args.dry_run else "bf16"
    result: dict = {"dry_run": args.dry_run, "precision": precision, "shape": shape, "run": run,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
                    "torch": torch.__version__, "transformers": transformers.__version__}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        result["parameters"] = build_model(model_dir, shape, {"bf16": "bfloat16", "fp32": "float32"}[precision])
        result["sft_lora"] = sft_lora(model_dir, precision, shape, run)
        print("sft_lora", json.dumps(result["sft_lora"]), flush=True)
        (Path(tmp) / "ppo").mkdir()
        result["ppo_iteration"] = ppo_iteration(model_dir, precision, run, Path(tmp) / "ppo")
        print("ppo_iteration", json.dumps(result["ppo_iteration"]), flush=True)
    result["total_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
