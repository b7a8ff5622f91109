"""A GRPO stage swept by Ray Tune: its trials report the sweep's metric to Tune at every iteration
(stages.ppo.worker.report), so ASHA stops a clearly bad trial after a few iterations.

Two trials, one at a time, of the cheapest RL config in the suite (tests/stages/ppo: GRPO with LoRA on
the hf engine, 16 prompts x 4 samples, from the session's SFT policy): a learning rate that keeps the
policy (the good one runs first) and one that wrecks it within an update. ASHA (grace 2 iterations,
halving) compares the bad trial at its first rung with what the good one reported there.
"""

from __future__ import annotations

import pytest

from pipeline.runner import run_pipeline
from pipeline.spec import SpecError, parse_spec
from tests.stages.ppo.test_ppo import ppo_stage, spec_raw

ITERATIONS, GRACE = 6, 2
GOOD_LR, BAD_LR = 1.0e-4, 1.0
SWEEP = {"search_space": {"train.lr": [GOOD_LR, BAD_LR]}, "metric": "final_reward_mean", "mode": "max",
         "scheduler": {"name": "asha", "grace_period": GRACE, "reduction_factor": 2}}


def grpo_stage(**overrides) -> dict:
    return ppo_stage(peft={"method": "lora", "r": 8, "alpha": 32}, algorithm={"advantage": "grpo"},
                     eval_limit=16, **overrides)


def test_a_ppo_sweep_follows_a_value_every_iteration_logs(tmp_path):
    with pytest.raises(SpecError, match=r"stages\.grpo\.sweep\.metric: asha follows 'value_loss' at every iteration, "
                                        r"and this ppo stage logs no such value"):
        parse_spec(spec_raw(tmp_path, {"grpo": grpo_stage(sweep={**SWEEP, "metric": "final_value_loss"})}))
    spec = parse_spec(spec_raw(tmp_path, {"grpo": grpo_stage(sweep={**SWEEP, "metric": "late_reward_mean"})}))
    assert spec.stages["grpo"].sweep.step_metric() == "reward_mean"


@pytest.mark.slow
def test_asha_stops_a_bad_grpo_trial_between_iterations(ray_cluster, tiny_base, addition_sft, tmp_path):
    # save_steps: checkpoint reports too (they carry the metric; Tune gets it without the checkpoint).
    stage = grpo_stage(train={"max_steps": ITERATIONS, "lr": GOOD_LR, "batch_size": 32, "logging_steps": 4,
                              "save_steps": 3}, sweep=SWEEP)
    spec = parse_spec(spec_raw(tmp_path, {"grpo": stage}))
    artifact = run_pipeline(spec, only=["grpo"], inputs={"base": str(tiny_base), "sft": str(addition_sft)})["grpo"]
    results = artifact.manifest["sweep"]
    trials = {t["overrides"]["train.lr"]: t for t in results["trials"]}
    print("\nGRPO sweep:", {lr: (t["status"], t.get("value"), [round(p["value"], 3) for p in t["curve"]])
                            for lr, t in trials.items()})
    good, bad = trials[GOOD_LR], trials[BAD_LR]
    # The good trial reported at every iteration (not only every logging_steps), then its final value.
    assert good["status"] == "ok" and [p["step"] for p in good["curve"]][:ITERATIONS] == list(range(1, ITERATIONS + 1))
    # ASHA stopped the bad one at its first rung: at least half the iterations were never run.
    assert bad["status"] == "stopped" and results["stopped_early"] == 1, bad
    assert bad["curve"][-1]["step"] <= ITERATIONS // 2, bad
    assert results["best"]["overrides"] == {"train.lr": GOOD_LR}
