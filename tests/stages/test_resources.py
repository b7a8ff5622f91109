"""The resource plan (stages/resources.py): its arithmetic from the configs, the fail-fast check, and
placement from the plan on the session's Ray instance (4 CPUs, 4 logical GPUs: tests/conftest.py)."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from stages.config import BaseConfig
from stages.evaluate.config import EvalConfig
from stages.ppo.config import PPOConfig
from stages.resources import (
    EVAL,
    REWARD,
    ROLLOUT,
    STAGE_ACTORS,
    TRAINING,
    InsufficientResources,
    PlacementTimeout,
    check_fits,
    peak,
    ready_placement_group,
    stage_resources,
)
from stages.sft import SFTConfig

NO_MEMORY = {"memory": 0}


def ppo(**sections) -> PPOConfig:
    raw = {"prompts": "builtin:addition", "reward_fn": "addition", "peft": {"method": "full"}, **sections}
    return PPOConfig.model_validate(raw)


def gpu_ppo_with_tp_and_reward_actor() -> PPOConfig:
    """2 GPU trainers, 2 vLLM engines of 2 GPUs each (TP 2, one GPU per rank by default), a reward model."""
    return ppo(scaling={"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4},
               rollout={"engine": "vllm", "num_engines": 2, "tensor_parallel_size": 2, "cpus_per_engine": 2},
               reward="rm", reward_placement="actor")


# --------------------------------------------------------------------------- the plan (pure)


def test_sft_on_gpus_and_on_cpus():
    gpu = stage_resources(SFTConfig.model_validate(
        {"data": "builtin:addition", "scaling": {"num_workers": 4, "use_gpu": True, "cpus_per_worker": 8}}), "sft")
    (workers,) = gpu.groups
    assert (workers.role, workers.count, workers.cpus, workers.gpus) == (TRAINING, 4, 8, 1.0)  # 0 means 1 GPU
    assert gpu.total == {"CPU": 32, "GPU": 4, **NO_MEMORY}
    assert gpu.bundles() == [{"CPU": 8, "GPU": 1.0}] * 4
    assert gpu.describe() == "sft: 32 CPU, 4 GPU in all\n  4 training workers x 8 CPU, 1 GPU"

    cpu = stage_resources(SFTConfig.model_validate({"data": "builtin:addition"}), "sft")
    assert cpu.total == {"CPU": 1, "GPU": 0, **NO_MEMORY} and cpu.bundles() == [{"CPU": 1}]
    # use_gpu off: gpus_per_worker is not asked for (as the launcher builds Ray Train's ScalingConfig).
    off = SFTConfig.model_validate({"data": "builtin:addition", "scaling": {"gpus_per_worker": 2}})
    assert stage_resources(off).total["GPU"] == 0


def test_ppo_with_tensor_parallel_engines_and_a_reward_actor():
    plan = stage_resources(gpu_ppo_with_tp_and_reward_actor(), "ppo")
    trainers, engines, reward = plan.groups
    assert [g.role for g in plan.groups] == [TRAINING, ROLLOUT, REWARD]
    assert (trainers.count, trainers.cpus, trainers.gpus) == (2, 4, 1.0)
    assert (engines.count, engines.cpus, engines.gpus, engines.ranks, engines.actor_gpus) == (2, 2, 2.0, 2, 0.0)
    assert (reward.count, reward.cpus, reward.gpus) == (1, 2, 1.0)  # one engine rank's GPU
    assert plan.total == {"CPU": 8 + 4 + 2, "GPU": 2 + 4 + 1, **NO_MEMORY}
    # The PPO driver's placement group: each engine's two rank bundles (rank 0 holds its CPUs), then the
    # reward actor's bundle at index 4.
    assert plan.bundles(STAGE_ACTORS) == [{"CPU": 2, "GPU": 1.0}, {"GPU": 1.0}, {"CPU": 2, "GPU": 1.0}, {"GPU": 1.0},
                                          {"CPU": 2, "GPU": 1.0}]
    assert plan.describe().splitlines() == [
        "ppo: 14 CPU, 7 GPU in all",
        "  2 training workers x 4 CPU, 1 GPU",
        "  2 rollout engines x 2 CPU, 2 GPU (TP 2)",
        "  1 reward-model actor x 2 CPU, 1 GPU",
    ]


def test_ppo_explicit_engine_gpus_split_over_ranks():
    plan = stage_resources(ppo(scaling={"use_gpu": True}, reward="rm",
                               rollout={"engine": "vllm", "tensor_parallel_size": 4, "gpus_per_engine": 2}))
    assert plan.group(ROLLOUT).bundles() == [{"CPU": 1, "GPU": 0.5}] + [{"GPU": 0.5}] * 3
    assert plan.group(REWARD).gpus == 0.5 and plan.total["GPU"] == 1 + 2 + 0.5


def test_cpu_ppo_defaults_are_as_before():
    plan = stage_resources(ppo(), "ppo")  # reward_fn only: no reward-model actor
    assert [g.role for g in plan.groups] == [TRAINING, ROLLOUT]
    assert plan.bundles(STAGE_ACTORS) == [{"CPU": 1}]  # one 1-CPU bundle per engine, no GPU
    assert plan.total == {"CPU": 2, "GPU": 0, **NO_MEMORY}
    # A reward model loaded in every training worker is no actor of its own.
    assert stage_resources(ppo(reward="rm", reward_placement="worker")).group(REWARD) is None
    reward = stage_resources(ppo(reward="rm")).group(REWARD)
    assert (reward.cpus, reward.gpus, reward.bundles()) == (1, 0.0, [{"CPU": 1}])


def test_colocated_engines_share_the_trainers_gpus():
    shared = stage_resources(ppo(scaling={"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5},
                                 rollout={"num_engines": 2, "colocate": True}))
    engines = shared.group(ROLLOUT)
    assert (engines.colocated, engines.cpus, engines.gpus, engines.bundles()) == (True, 0.0, 0.5, [])
    assert shared.total["GPU"] == 2 * 0.5 + 2 * 0.5 and shared.notes == ()
    assert shared.bundles(STAGE_ACTORS) == []
    assert "(colocated with the training workers)" in shared.describe()

    whole = stage_resources(ppo(scaling={"num_workers": 2, "use_gpu": True}, rollout={"num_engines": 2,
                                                                                       "colocate": True}))
    assert whole.total["GPU"] == 3  # what Ray is asked for: 2 x 1 + 2 x 0.5
    (note,) = whole.notes
    assert "one GPU cannot hold both" in note and "scaling.gpus_per_worker <= 0.5" in note

    on_cpu = stage_resources(ppo(rollout={"colocate": True}))  # today's colocate: no CPUs, no GPUs, no bundle
    assert on_cpu.group(ROLLOUT).total == {"CPU": 0, "GPU": 0, **NO_MEMORY} and on_cpu.bundles(STAGE_ACTORS) == []


def test_eval_actors_and_stages_without_ray():
    config = EvalConfig.model_validate({"models": ["sft"], "tasks": ["addition"],
                                        "generation": {"concurrency": 3, "cpus_per_actor": 2, "gpus_per_actor": 1}})
    plan = stage_resources(config, "eval")
    (actors,) = plan.groups
    assert (actors.role, actors.count) == (EVAL, 3) and plan.total == {"CPU": 6, "GPU": 3, **NO_MEMORY}
    # Models evaluated at once each have their pool: at most as many as there are models (here 3 with the reference).
    for at_once, count in [(2, 2), (5, 3)]:
        several = EvalConfig.model_validate({"models": ["sft", "dpo"], "reference": "base", "tasks": ["addition"],
                                             "generation": {"cpus_per_actor": 1, "max_concurrent_models": at_once}})
        assert stage_resources(several, "eval").groups[0].count == count
    base = stage_resources(BaseConfig(), "base")
    assert not base.uses_ray and base.total == {"CPU": 0, "GPU": 0, **NO_MEMORY} and base.bundles() == []
    assert peak([plan, base, stage_resources(gpu_ppo_with_tp_and_reward_actor())]) == {"CPU": 14, "GPU": 7,
                                                                                        **NO_MEMORY}


def test_tensor_parallelism_is_checked_where_it_is_configured():
    for rollout, words in [({"engine": "hf", "tensor_parallel_size": 2}, "needs engine vllm"),
                           ({"engine": "vllm", "tensor_parallel_size": 2, "colocate": True}, "colocate"),
                           ({"tensor_parallel_size": 2, "engine_kwargs": {"tensor_parallel_size": 4}}, "differs")]:
        with pytest.raises(ValidationError, match=words):
            ppo(scaling={"use_gpu": True}, rollout=rollout)
    with pytest.raises(ValidationError, match="set scaling.use_gpu"):
        ppo(rollout={"engine": "vllm", "tensor_parallel_size": 2})  # CPU training, no GPUs for the ranks


# --------------------------------------------------------------------------- fail fast


def test_check_fits_names_each_missing_resource():
    plan = stage_resources(gpu_ppo_with_tp_and_reward_actor(), "ppo")
    check_fits(plan, {"CPU": 14, "GPU": 7})  # exactly enough
    with pytest.raises(InsufficientResources) as err:
        check_fits(plan, {"CPU": 64.0, "GPU": 2.0, "memory": 1e12})
    assert str(err.value).startswith(
        "stage 'ppo' needs 7 GPU (2 training workers x 1 GPU, 2 rollout engines x 2 GPU (TP 2), "
        "1 reward-model actor x 1 GPU) but the Ray cluster has 2 GPU. ")
    with pytest.raises(InsufficientResources) as err:
        check_fits(plan, {"CPU": 4.0})  # a CPU-only cluster: both named
    message = str(err.value)
    assert ("needs 14 CPU (2 training workers x 4 CPU, 2 rollout engines x 2 CPU, 1 reward-model actor x 2 CPU) "
            "but the Ray cluster has 4 CPU; and 7 GPU (") in message
    assert "but the Ray cluster has 0 GPU" in message


# --------------------------------------------------------------------------- placement on Ray (logical GPUs)


def gpu_placement_ppo(num_workers: int = 2) -> PPOConfig:
    """2 trainers, 1 hf engine and a reward-model actor, one logical GPU each: 4 GPUs, 2 CPUs."""
    return ppo(scaling={"num_workers": num_workers, "use_gpu": True, "cpus_per_worker": 0.5},
               rollout={"engine": "hf", "cpus_per_engine": 0.5}, reward="rm", train={"precision": "fp32"})


def test_ppo_stage_places_engines_and_reward_actor_from_its_plan(ray_cluster, tiny_base, tmp_path):
    from pipeline.runner import run_services
    from pipeline.spec import parse_spec
    from pipeline.store import ArtifactStore
    from stages.ppo.rewards import start_reward_actor
    from stages.ppo.stage import RolloutEngines
    from stages.rollout import SamplingParams
    from stages.stage import StageContext

    ray = ray_cluster
    config = gpu_placement_ppo()
    plan = stage_resources(config, "ppo")
    assert plan.total["GPU"] == 4
    check_fits(plan, ray.cluster_resources())
    spec = parse_spec({"name": "placement", "storage": str(tmp_path), "stages": {"ppo": config.model_dump(by_alias=True)}})
    ctx = StageContext(name="ppo", config=spec.stages["ppo"], inputs={}, work_dir=tmp_path / "work", fingerprint="f",
                       run=run_services(spec, ArtifactStore(spec.run_root()), plan))
    # Ray Train's worker group reserves the trainers' GPUs; the stage's own group holds the rest.
    trainers = ready_placement_group(plan.group(TRAINING).bundles(), "trainers", timeout_s=30)
    engines, reward_actor = RolloutEngines(ctx, ctx.config, tiny_base), None
    try:
        engines.start()
        assert engines.placement_group.bundle_specs == [{"CPU": 0.5, "GPU": 1.0}, {"CPU": 0.5, "GPU": 1.0}]
        options = engines.reward_actor_options()
        assert options["placement_group"] is engines.placement_group and options["bundle_index"] == 1
        assert (options["num_cpus"], options["num_gpus"]) == (0.5, 1.0)
        # Every logical GPU is reserved now: outside its bundle the actor would wait out the timeout.
        reward_actor = start_reward_actor(str(tiny_base), **{**options, "timeout_s": 60})
        assert engines.engine_name == "hf" and len(engines.group.generate([[1, 2, 3]], SamplingParams(
            max_new_tokens=2, temperature=0.0))) == 1
    finally:
        if reward_actor is not None:
            ray.kill(reward_actor)
        engines.shutdown()
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(trainers)


def test_a_stage_needing_more_fails_at_once(ray_cluster, tmp_path):
    from pipeline.cluster import stage_connector
    from pipeline.spec import parse_spec

    config = gpu_placement_ppo(num_workers=4)
    spec = parse_spec({"name": "toobig", "storage": str(tmp_path), "stages": {"ppo": config.model_dump(by_alias=True)}})
    plan = stage_resources(spec.stages["ppo"], "ppo")
    started = time.monotonic()
    with pytest.raises(InsufficientResources, match=r"^stage 'ppo' needs 6 GPU \(4 training workers x 1 GPU, "
                                                    r"1 rollout engine x 1 GPU, 1 reward-model actor x 1 GPU\) "
                                                    r"but the Ray cluster has 4 GPU\. "):
        stage_connector(spec, plan)()
    assert time.monotonic() - started < 10
    # Bundles Ray cannot hold: a bounded wait, then an error naming them.
    with pytest.raises(PlacementTimeout, match=r"could not reserve 1 bundle\(s\), 5 GPU in all, within 1s"):
        ready_placement_group([{"GPU": 5}], "five GPUs", timeout_s=1)
