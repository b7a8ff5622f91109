"""Leaving the laptop: Ray job building (the submission itself runs on a real two-node cluster in
tests/pipeline/test_two_node.py) and KubeRay manifests (validated offline against KubeRay's CRD schema from ../shared/kuberay)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.k8s import CONFIG_MOUNT, render_file  # CONFIG_MOUNT: the pipeline file's path inside the image
from pipeline.spec import SpecError
from pipeline.submit import build_job, describe
from tests.helpers import quick_sft, strict_schema

REPO = Path(__file__).resolve().parents[2]
RAYJOB_SCHEMA = REPO.parent / "shared" / "kuberay" / "schemas" / "rayjob-v1.json"
TINY_EXAMPLE_ARGS = {"storage_claim": "rayalign-runs"}  # k8s/rayjob-tiny.yaml's options (see its header)


# --------------------------------------------------------------------------- KubeRay manifests


@pytest.fixture(scope="module")
def rayjob_validator():
    """KubeRay v1.7.0's RayJob schema, strict: unknown fields are errors (as a typo would be)."""
    jsonschema = pytest.importorskip("jsonschema")
    if not RAYJOB_SCHEMA.exists():
        pytest.skip(f"KubeRay schemas not found at {RAYJOB_SCHEMA} (the project's ../shared/kuberay)")
    schema = json.loads(RAYJOB_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(strict_schema(schema))


def _check_rayjob(validator, rayjob: dict) -> None:
    errors = sorted(validator.iter_errors(rayjob), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
    # Rules the operator enforces (ray-operator/controllers/ray/utils/validation.go), not the schema.
    name = rayjob["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True  # required by ttlSecondsAfterFinished
    assert "clusterSelector" not in rayjob["spec"]


def _documents(text: str) -> tuple[dict, dict]:
    config_map, rayjob = list(yaml.safe_load_all(text))
    assert config_map["kind"] == "ConfigMap" and config_map["apiVersion"] == "v1"
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"] == "ray.io/v1"
    return config_map, rayjob


def _containers(rayjob: dict) -> tuple[dict, dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    return head, worker


def test_tiny_rayjob_validates_and_ships_the_config(rayjob_validator, monkeypatch):
    monkeypatch.chdir(REPO)
    text, warnings = render_file("configs/tiny.yaml", **TINY_EXAMPLE_ARGS)
    config_map, rayjob = _documents(text)
    _check_rayjob(rayjob_validator, rayjob)
    assert not warnings

    # The pipeline file travels in the ConfigMap, mounted into the head, where the driver runs.
    assert config_map["data"] == {"tiny.yaml": (REPO / "configs" / "tiny.yaml").read_text()}
    head, worker = _containers(rayjob)
    mounts = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}
    volumes = {v["name"]: v for v in rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert volumes["pipeline"]["configMap"]["name"] == config_map["metadata"]["name"]
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint.startswith(f"rayalign run {mounts['pipeline']}/tiny.yaml ")
    assert "--set ray.address=auto" in entrypoint and "--set storage=/mnt/rayalign/runs" in entrypoint

    # Sized from the pipeline: 2 Ray Train workers of 1 CPU each, no GPUs, plus 1 CPU of headroom a pod
    # (Ray schedules num-cpus; the container has more); the storage claim everywhere.
    spec = rayjob["spec"]
    assert spec["ttlSecondsAfterFinished"] == 3600 and spec["shutdownAfterJobFinishes"] is True
    assert (spec["submissionMode"], spec["activeDeadlineSeconds"], spec["backoffLimit"]) == ("K8sJobMode", 86400, 1)
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert group["rayStartParams"] == {"num-cpus": "1"}
    assert worker["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"] == {
        "dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"}
    assert mounts["storage"] == "/mnt/rayalign" and {m["name"] for m in worker["volumeMounts"]} >= {"storage"}
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"


def test_checked_in_example_equals_a_fresh_render(monkeypatch):
    monkeypatch.chdir(REPO)
    fresh, _ = render_file("configs/tiny.yaml", **TINY_EXAMPLE_ARGS)
    checked_in = (REPO / "k8s" / "rayjob-tiny.yaml").read_text()
    assert checked_in == fresh, (
        "k8s/rayjob-tiny.yaml is stale; regenerate it with:\n"
        "  .venv/bin/python -m pipeline.cli k8s configs/tiny.yaml --storage-claim rayalign-runs "
        "-o k8s/rayjob-tiny.yaml"
    )


def test_gpu_config_gets_gpu_workers_and_a_secret_token(rayjob_validator, monkeypatch):
    monkeypatch.chdir(REPO)
    text, warnings = render_file("configs/gpu-8b-qlora.yaml")
    config_map, rayjob = _documents(text)
    _check_rayjob(rayjob_validator, rayjob)
    assert not warnings
    sweep = _documents(render_file("configs/sweep.yaml", command="sweep")[0])[1]  # the config with a sweep
    _check_rayjob(rayjob_validator, sweep)
    assert sweep["spec"]["entrypoint"].startswith(f"rayalign sweep {CONFIG_MOUNT}/sweep.yaml ")
    head, worker = _containers(rayjob)
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 4
    assert worker["resources"]["limits"] == {"cpu": "9", "memory": "96Gi", "nvidia.com/gpu": "1"}  # 8 + headroom
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert rayjob["spec"]["entrypoint"].startswith(f"rayalign run {CONFIG_MOUNT}/gpu-8b-qlora.yaml ")
    assert rayjob["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "ml"
    token = next(e for e in worker["env"] if e["name"] == "HF_TOKEN")
    assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}


def test_k8s_command_options_override_the_spec(rayjob_validator, tmp_path, capsys):
    config = tmp_path / "frac.yaml"
    config.write_text(yaml.safe_dump({
        "name": "Frac_Pipeline.v2", "storage": "runs", "kubernetes": {"namespace": "from-spec"},
        "stages": {"sft": quick_sft(scaling={"num_workers": 3, "cpus_per_worker": 0.5, "use_gpu": True,
                                             "gpus_per_worker": 0.5}),
                   "dpo": {"from": "sft", "data": "data/pairs.jsonl", "scaling": {"cpus_per_worker": 0.25}}},
    }))
    out = tmp_path / "out" / "rayjob.yaml"
    assert main(["k8s", str(config), "--image", "me/rayalign:dev", "--namespace", "team",
                 "--service-account", "trainer", "-o", str(out), "--set", "stages.sft.train.max_steps=3"]) == 0
    warnings = capsys.readouterr().err
    assert "no storage claim" in warnings and "stages.dpo.data: 'data/pairs.jsonl' is relative" in warnings
    config_map, rayjob = _documents(out.read_text())
    _check_rayjob(rayjob_validator, rayjob)
    labels = {"app.kubernetes.io/name": "rayalign", "rayalign/pipeline": "frac-pipeline-v2"}
    assert rayjob["metadata"] == {"name": "rayalign-frac-pipeline-v2", "namespace": "team", "labels": labels}
    head, worker = _containers(rayjob)
    assert head["image"] == worker["image"] == "me/rayalign:dev"
    # Half a CPU per worker: Ray gets a whole one (ray start takes integers), the container one more.
    assert worker["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["template"]["spec"]["serviceAccountName"] == "trainer"
    assert "--set stages.sft.train.max_steps=3 --set ray.address=auto" in rayjob["spec"]["entrypoint"]
    assert "storage=" not in rayjob["spec"]["entrypoint"]


# SFT on 4 GPU workers; PPO with 2 trainers, 2 vLLM engines of TP 2 and a reward-model actor (7 GPUs,
# 14 CPUs at once: the peak); eval with 2 one-GPU actors.
GPU_PPO_PIPELINE = {
    "name": "gpu-ppo", "storage": "/mnt/rayalign/runs", "base": {"model": "org/model-8b"},
    "kubernetes": {"storage_claim": "shared", "worker_memory": "64Gi"},
    "stages": {
        "sft": quick_sft(scaling={"num_workers": 4, "use_gpu": True, "cpus_per_worker": 8}),
        "reward": {"from": "sft", "data": "builtin:addition", "scaling": {"num_workers": 2, "use_gpu": True}},
        "ppo": {"from": "sft", "prompts": "builtin:addition", "reward": "reward", "peft": {"method": "full"},
                "scaling": {"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4},
                "rollout": {"engine": "vllm", "num_engines": 2, "tensor_parallel_size": 2, "cpus_per_engine": 2}},
        "eval": {"models": ["sft", "ppo"], "tasks": ["addition"],
                 "generation": {"concurrency": 2, "cpus_per_actor": 4, "gpus_per_actor": 1}},
    },
}


@pytest.mark.parametrize("gpus_per_pod, replicas, cpus, gpus", [
    (None, 7, 8, "1"),  # one GPU a pod: 7 pods for PPO's 7 GPUs, each as big as the largest member (8 CPUs)
    (4, 2, 16, "4"),    # 4 GPUs a pod: ceil(7 / 4) pods; SFT's 32 CPUs (the CPU peak) spread over them
    (8, 1, 32, "8"),
])
def test_gpu_ppo_counts_every_engine_and_actor(rayjob_validator, tmp_path, gpus_per_pod, replicas, cpus, gpus):
    config = tmp_path / "gpu-ppo.yaml"
    config.write_text(yaml.safe_dump(GPU_PPO_PIPELINE))
    text, warnings = render_file(str(config), gpus_per_pod=gpus_per_pod)
    assert not warnings
    _, rayjob = _documents(text)
    _check_rayjob(rayjob_validator, rayjob)
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "gpu-workers"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == replicas
    _, worker = _containers(rayjob)
    assert group["rayStartParams"] == {"num-cpus": str(cpus)}  # what Ray schedules; the container has 1 more
    assert worker["resources"]["limits"] == worker["resources"]["requests"] == {
        "cpu": str(cpus + 1), "memory": "64Gi", "nvidia.com/gpu": gpus}
    if gpus_per_pod:
        assert f"--gpus-per-pod {gpus_per_pod}" in text.splitlines()[1]  # the header shows how it was rendered


def test_gpus_per_pod_from_the_spec_and_the_flag(tmp_path):
    raw = copy.deepcopy(GPU_PPO_PIPELINE)
    raw["kubernetes"]["gpus_per_pod"] = 4
    config = tmp_path / "gpu-ppo.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "rayjob.yaml"
    group_of = lambda: _documents(out.read_text())[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]  # noqa: E731
    assert main(["k8s", str(config), "-o", str(out)]) == 0
    assert group_of()["replicas"] == 2
    assert main(["k8s", str(config), "-o", str(out), "--gpus-per-pod", "8"]) == 0  # the flag wins
    assert group_of()["replicas"] == 1
    raw["stages"]["sft"]["scaling"]["gpus_per_worker"] = 2
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="gpus_per_pod 1 is less than one bundle's 2 GPUs"):
        render_file(str(config), gpus_per_pod=1)


def test_shipped_samples_pass_the_same_check(rayjob_validator):
    """The strict validator itself accepts KubeRay's own samples (so a failure above is ours)."""
    sample = REPO.parent / "shared" / "kuberay" / "samples" / "ray-job.shutdown.yaml"
    if not sample.exists():
        pytest.skip(f"{sample} not found")
    (rayjob,) = [d for d in yaml.safe_load_all(sample.read_text()) if d and d["kind"] == "RayJob"]
    _check_rayjob(rayjob_validator, rayjob)
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "cpu"] = 0.5
    broken["spec"]["shutdownAfterJobFinish"] = True
    assert len(list(rayjob_validator.iter_errors(broken))) == 2


# --------------------------------------------------------------------------- job submission


def _job_config(folder: Path, storage: Path, base: Path | str, **sft) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "name": "submitted", "storage": str(storage), "ray": {"num_cpus": 2}, "base": {"model": str(base)},
        "stages": {"sft": quick_sft(**sft)},
    }))
    return config


def test_job_runtime_env_and_entrypoint(tmp_path, monkeypatch):
    config = _job_config(tmp_path / "job", tmp_path / "store", tmp_path / "base")
    monkeypatch.setenv("MY_SECRET_TOKEN", "s3cr3t-value")
    job = build_job(config, ["stages.sft.train.lr=1e-3"], env=["MY_SECRET_TOKEN", "EXTRA=1"])
    assert "s3cr3t-value" not in json.dumps(job, default=str), "a secret is passed by reference, never by value"
    env = job["runtime_env"]
    # Outside the project: the config's folder is the working_dir and the code ships as py_modules.
    assert env["working_dir"] == str(tmp_path / "job")
    assert [Path(p).name for p in env["py_modules"]] == ["pipeline", "stages"]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["RAY_OVERRIDE_JOB_RUNTIME_ENV"] == "1"
    assert env["env_vars"]["MY_SECRET_TOKEN"] == "${MY_SECRET_TOKEN}" and env["env_vars"]["EXTRA"] == "1"
    assert job["entrypoint"] == ("python -m pipeline.cli run pipeline.yaml --set stages.sft.train.lr=1e-3 "
                                 "--set ray.address=auto")
    shown = "\n".join(describe(job))
    assert "MY_SECRET_TOKEN" in shown
    assert job["submission_id"].startswith("rayalign-submitted-")

    # Inside the project: the project is the working_dir (code included), the store is excluded.
    job = build_job(REPO / "configs" / "tiny.yaml", code="ship")
    assert job["runtime_env"]["working_dir"] == str(REPO) and "py_modules" not in job["runtime_env"]
    assert {".git", ".venv", "runs"} <= set(job["runtime_env"]["excludes"])
    assert " run configs/tiny.yaml --set ray.address=auto" in job["entrypoint"]
    # --only: the job runs those stages; its id differs from the whole pipeline's; an unknown stage or a
    # sweep job is refused before anything is submitted.
    only = build_job(REPO / "configs" / "tiny.yaml", code="ship", only=["sft", "grpo"])
    assert only["entrypoint"].endswith(" run configs/tiny.yaml --set ray.address=auto --only sft,grpo")
    assert only["submission_id"] != job["submission_id"]
    with pytest.raises(ValueError, match=r"--only gpro: not a stage of tiny.yaml \(stages: base, sft, "):
        build_job(REPO / "configs" / "tiny.yaml", only=["sft", "gpro"])
    with pytest.raises(ValueError, match="--only selects the stages of `rayalign run`"):
        build_job(REPO / "configs" / "sweep.yaml", command="sweep", only=["sft"])

    # --command sweep: the job runs `rayalign sweep`; a config without a sweep stage fails before submitting.
    job = build_job(REPO / "configs" / "sweep.yaml", command="sweep")
    assert " -m pipeline.cli sweep configs/sweep.yaml " in job["entrypoint"]
    with pytest.raises(SpecError, match=r"no stage has a sweep: section \(add stages.<name>.sweep\)"):
        build_job(config, command="sweep")
    with pytest.raises(ValueError, match="not inside the working_dir"):
        build_job(config, working_dir=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"--env HF_TOKEN=\.\.\.: a secret's value would be stored in the Ray job "
                                         r"record; pass it by reference, --env HF_TOKEN"):
        build_job(config, env=["HF_TOKEN=hf_abc"])


# `rayalign submit` against a real cluster (a separately started two-node one): tests/pipeline/test_two_node.py
