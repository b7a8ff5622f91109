"""PPO (full weights, its KL reference in the engine's actor) and GRPO (LoRA) with their rollouts on vLLM engines
in Ray actors (``make test-vllm``).

The verifier PPO and GRPO stages of ``test_ppo.py`` (``verifier_ppo_and_grpo``) with ``rollout.engine: vllm``: they must learn, and after
every sync the engine's log-probs of the verification probe match the trainer's within the fp32 tolerance
(``stages.ppo.verify``), full weights through vLLM's in-place reload, LoRA through a fresh ``LoRARequest``.
"""

from __future__ import annotations

import pytest

from pipeline.spec import parse_spec
from tests.stages.ppo.test_ppo import assert_learned, curve, spec_raw, verifier_ppo_and_grpo

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ITERATIONS = 10  # the 15-iteration run below had reward ~0.8 by iteration 8 (CI time: 40-minute budget)
# Measured on the 2-core machine over 15 iterations (train.seed 0, one run; 200 held-out prompts, from the
# session's SFT policy at 51.5%): PPO 91.5% (+0.400), GRPO 92.5% (+0.410); reward mean first vs last third
# +0.13 / +0.14, ~0.8 from iteration 8 on. The hf engine's three seeds gave +0.375..+0.45 (test_ppo.py), so
# the thresholds keep test_ppo.py's margins; 10 iterations passed them too.
PPO_REWARD_GAIN, PPO_HELDOUT_GAIN = 0.05, 0.2
GRPO_REWARD_GAIN, GRPO_HELDOUT_GAIN = 0.05, 0.2
# fp32 (stages.ppo.verify.FP32_TOLERANCE): measured max sync_probe_diff 1.0e-5 (PPO) / 8.6e-6 (GRPO) and
# max rollout_logprob_diff 7.9e-7 / 6.6e-7 over the 15 iterations.
SYNC_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vllm_runs(ray_cluster, tiny_base, addition_sft, tmp_path_factory):
    from pipeline.runner import run_pipeline

    stages = verifier_ppo_and_grpo({"engine": "vllm", "prompts_per_step": 64, "n": 4}, ITERATIONS, logging_steps=5)
    # PPO's KL reference scores the samples in the vLLM engine's actor (an hf copy beside vLLM, same process).
    stages["ppo"]["reference_placement"] = "engine"
    # One stage at a time: two at once saved nothing (fixture 209 s against 206 s; each vLLM CPU engine
    # keeps a core busy).
    spec = parse_spec(spec_raw(tmp_path_factory.mktemp("ppo-vllm"), stages, name="ppo-vllm"))
    return run_pipeline(spec, only=["ppo", "grpo"], inputs={"base": str(tiny_base), "sft": str(addition_sft)})


def assert_served_by_vllm(run, sync_method: str) -> None:
    assert run.manifest["rollout_engine"] == "vllm" and run.manifest["sync_method"] == sync_method, run.manifest
    probe = curve(run, "sync_probe_diff")
    assert len(probe) == ITERATIONS and max(probe) < SYNC_TOLERANCE, probe
    # the sampled tokens' log-probs agree too (engine at sampling time vs trainer before the update)
    assert max(curve(run, "rollout_logprob_diff")) < SYNC_TOLERANCE


def test_ppo_full_weights_on_vllm_learns_and_every_sync_is_verified(vllm_runs):
    ppo = vllm_runs["ppo"]
    print("ppo", {k: v for k, v in ppo.manifest["metrics"].items() if "heldout" in k})
    assert_served_by_vllm(ppo, "vllm_weight_stream_gloo")
    assert ppo.manifest["reference"] == "frozen copy in the engines' actors", ppo.manifest["reference"]
    # Before the first update the policy is the reference: the hf copy in the vLLM actor gives the trainer's
    # log-probs of the same tokens (measured KL 1e-7 at iteration 1, then 0.11-0.15).
    assert abs(curve(ppo, "kl")[0]) < 1e-4, curve(ppo, "kl")
    assert_learned(ppo, PPO_REWARD_GAIN, PPO_HELDOUT_GAIN)


def test_grpo_lora_on_vllm_learns_and_every_sync_is_verified(vllm_runs):
    grpo = vllm_runs["grpo"]
    print("grpo", {k: v for k, v in grpo.manifest["metrics"].items() if "heldout" in k})
    assert_served_by_vllm(grpo, "vllm_lora_request")
    assert_learned(grpo, GRPO_REWARD_GAIN, GRPO_HELDOUT_GAIN)
