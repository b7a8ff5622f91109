"""Verified weight sync (``rollout.verify_sync``): a sync that did not reach an engine stops the PPO loop.

The PPO worker runs standalone in this process (``stages.train_session``: world size 1) with in-process
``hf`` engines, so that one engine's update can be skipped on purpose: the loop is the stage's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.rollout.base import SyncInfo


def run_standalone(model_dir: Path, work: Path, peft: dict, iterations: int = 3, **rollout) -> list[dict]:
    """``train_ppo_worker`` for ``iterations`` iterations with one in-process hf engine; its metric records."""
    from stages.job import PPOJob, worker_arguments
    from stages.ppo.config import PPOConfig
    from stages.ppo.records import METRICS_FILE
    from stages.ppo.worker import train_ppo_worker
    from stages.rollout.hf_engine import HFEngine
    from stages.sources import load_records

    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.jsonl"
    records = load_records("builtin:addition/train", "prompt", limit=64).records
    prompts.write_text("".join(json.dumps(r.to_trl()) + "\n" for r in records))
    config = PPOConfig.model_validate({
        "kind": "ppo", "from": "sft", "prompts": "builtin:addition", "reward_fn": "addition", "peft": peft,
        "algorithm": {"advantage": "grpo"}, "train": {"batch_size": 16, "max_steps": iterations, "lr": 1e-3},
        "rollout": {"engine": "hf", "n": 2, "prompts_per_step": 8, "max_new_tokens": 4, **rollout}})
    job = PPOJob(stage="ppo", work_dir=str(work), model_dir=str(work / "model"), model_source=str(model_dir),
                 precision="fp32", threads=1, report_to="none", train_file=str(prompts), iterations=iterations,
                 critic_source=str(model_dir))
    train_ppo_worker(worker_arguments(job, config, engines=[HFEngine(model_dir, dtype="float32")]))
    return [json.loads(line) for line in (work / METRICS_FILE).read_text().splitlines()]


def skip_update_at_call(monkeypatch, call_number: int) -> None:
    """Make the hf engine's ``call_number``-th update a no-op that still reports success."""
    from stages.rollout.hf_engine import HFEngine

    real, calls = HFEngine.update_weights, {"n": 0}

    def update_weights(self, source):
        calls["n"] += 1
        if calls["n"] == call_number:
            return SyncInfo(method="skipped on purpose", seconds=0.0)
        return real(self, source)

    monkeypatch.setattr(HFEngine, "update_weights", update_weights)


@pytest.mark.parametrize("peft", [{"method": "full"}, {"method": "lora", "r": 8, "alpha": 32, "dropout": 0.0}],
                         ids=["full", "lora"])
def test_a_skipped_sync_stops_the_stage_naming_engine_step_and_difference(addition_sft, tmp_path, monkeypatch, peft):
    from stages.ppo.verify import SyncVerificationError

    skip_update_at_call(monkeypatch, 2)  # the sync after iteration 2
    with pytest.raises(SyncVerificationError) as caught:
        run_standalone(addition_sft, tmp_path, peft)
    message = str(caught.value)
    assert "weight sync at step 2 not verified" in message and "engine 0 (hf" in message, message
    if peft["method"] == "lora":  # the engine kept the adapter of step 1
        assert "still uses adapter 'rollout-1' after the step-2 update" in message, message
    else:
        assert "probe log-probs differ from the trainer's by" in message, message
    records = [json.loads(line) for line in (tmp_path / "ppo_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]  # the stage stopped at the bad sync


def test_verified_syncs_match_within_the_fp32_tolerance_and_warn_mode_goes_on(addition_sft, tmp_path, monkeypatch):
    from stages.ppo.verify import FP32_TOLERANCE

    records = run_standalone(addition_sft, tmp_path / "good", {"method": "full"})
    # Measured 2.4e-7..2.6e-6 (fp32 rounding); FP32_TOLERANCE is 1e-3.
    assert max(r["sync_probe_diff"] for r in records) < FP32_TOLERANCE / 100, records
    skip_update_at_call(monkeypatch, 2)
    records = run_standalone(addition_sft, tmp_path / "warn", {"method": "full"}, verify_sync="warn")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["sync_probe_diff"] > FP32_TOLERANCE  # the skipped update was seen, and logged
