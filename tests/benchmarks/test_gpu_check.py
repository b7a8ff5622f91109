"""The GPU check's dry run (CPU, tiny model) as the GPU machine would run it: without Ray, vLLM,
DeepSpeed, TRL or datasets (blocked from import here), through the standalone stage workers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

# What the GPU machine's image lacks; importing any of them in the script fails like it would there.
ABSENT_THERE = ("ray", "vllm", "deepspeed", "trl", "datasets", "pyarrow")
RUN_WITHOUT = """
import runpy, sys
for name in {absent!r}:
    sys.modules[name] = None
sys.argv = ["gpu_check.py", "--dry-run", "--out", sys.argv[1]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_gpu_check_dry_run_without_ray_or_trl(tmp_path):
    out = tmp_path / "gpu_check.json"
    code = RUN_WITHOUT.format(absent=ABSENT_THERE, script=str(REPO / "benchmarks" / "gpu" / "gpu_check.py"))
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    run = report["run"]
    assert report["dry_run"] is True and report["precision"] == "fp32"
    sft = report["sft_lora"]
    assert sft["tokens"] == (run["sft_steps"] - run["sft_warmup"]) * run["batch"] * run["seq_len"]
    assert sft["tokens_per_s"] > 0 and 0 < sft["final_loss"] < 20  # random tokens over a 512 vocabulary: ~ln 512
    ppo = report["ppo_iteration"]
    samples = run["prompts"] * run["n"]
    assert ppo["samples"] == samples
    assert 0 < ppo["rollout_tokens"] <= samples * run["max_new_tokens"]
    assert ppo["sync_method"] == "hf_peft_adapter"  # the LoRA adapter went to the engine through a folder
    for key in ("rollout_seconds", "experience_seconds", "training_seconds", "sync_seconds"):
        assert 0 < ppo[key] < ppo["wall_seconds"], key
