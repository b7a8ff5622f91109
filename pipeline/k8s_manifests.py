"""The pod templates of a rendered KubeRay ``RayJob`` (``pipeline.k8s``): head, workers and submitter.

Every pod runs as the image's non-root user (``kubernetes.run_as_user``/``run_as_group``, the Ray image's
``ray``/``users``), every container without privilege escalation and with all capabilities dropped.
Worker containers get ``kubernetes.cpu_headroom`` CPUs more than Ray schedules on them (``num-cpus``):
room for the raylet, the object store and data loading next to the training workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.spec import KubernetesConfig

CONFIG_MOUNT = "/home/ray/rayalign"
SUBMITTER_RESOURCES = {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "256Mi"}}


@dataclass(frozen=True)
class ClusterShape:
    """The worker group of a pipeline's Ray cluster: ``replicas`` pods of ``cpus`` CPUs and ``gpus`` GPUs."""

    replicas: int
    cpus: float
    gpus: int = 0


def pod_security_context(k8s: KubernetesConfig) -> dict:
    return {"runAsNonRoot": True, "runAsUser": k8s.run_as_user, "runAsGroup": k8s.run_as_group,
            "fsGroup": k8s.run_as_group, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def pod_env(k8s: KubernetesConfig) -> list[dict]:
    """Every Ray process inherits these; a token comes from a Secret, never from the manifest."""
    from pipeline.cluster import DRIVER_ENV

    env = [{"name": key, "value": value} for key, value in DRIVER_ENV.items()]
    env = [{"name": "HF_HUB_OFFLINE", "value": "1" if k8s.hub_offline else "0"} if e["name"] == "HF_HUB_OFFLINE"
           else e for e in env]
    if k8s.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": k8s.hf_token_secret,
                                                                       "key": "HF_TOKEN"}}})
    if k8s.storage_claim:  # hub downloads and DeepSpeed's compiled ops: once per cluster, not per pod
        env.append({"name": "HF_HOME", "value": f"{k8s.storage_mount}/hf_home"})
        env.append({"name": "TORCH_EXTENSIONS_DIR", "value": f"{k8s.storage_mount}/torch_extensions"})
    return env


def env_from(k8s: KubernetesConfig) -> dict:
    """The object-store credentials Secret as environment variables (pyarrow reads AWS_* from there)."""
    return {"envFrom": [{"secretRef": {"name": k8s.storage_secret}}]} if k8s.storage_secret else {}


def storage(k8s: KubernetesConfig) -> tuple[list[dict], list[dict]]:
    """The claim's volume mounts and volumes (none without a claim)."""
    if not k8s.storage_claim:
        return [], []
    return ([{"name": "storage", "mountPath": k8s.storage_mount}],
            [{"name": "storage", "persistentVolumeClaim": {"claimName": k8s.storage_claim}}])


def head_group(k8s: KubernetesConfig, config_map: str) -> dict:
    """The head runs the job's driver (and sweep trial drivers) only: no CPUs or GPUs for Ray tasks."""
    mounts, volumes = storage(k8s)
    container = {
        "name": "ray-head",
        "image": k8s.image,
        "env": pod_env(k8s),
        **env_from(k8s),
        "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}],
        "resources": _resources(k8s.head_cpu, k8s.head_memory),
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "pipeline", "mountPath": CONFIG_MOUNT}, *mounts],
    }
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
        "template": {"spec": pod_spec(k8s, [container], [
            {"name": "pipeline", "configMap": {"name": config_map}}, *volumes])},
    }


def worker_group(k8s: KubernetesConfig, shape: ClusterShape) -> dict:
    """``shape.replicas`` fixed pods; Ray schedules ``ceil(shape.cpus)`` CPUs on each, the container has more."""
    mounts, volumes = storage(k8s)
    ray_cpus = math.ceil(shape.cpus - 1e-9)
    limits = {"cpu": quantity(ray_cpus + k8s.cpu_headroom), "memory": k8s.worker_memory}
    if shape.gpus:
        limits["nvidia.com/gpu"] = str(shape.gpus)
    container = {
        "name": "ray-worker",
        "image": k8s.image,
        "env": pod_env(k8s),
        **env_from(k8s),
        "resources": {"limits": limits, "requests": dict(limits)},
        "securityContext": container_security_context(),
        # torch.distributed (gloo, NCCL) and DeepSpeed need more /dev/shm than a container's 64 MiB.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *mounts],
    }
    return {
        "groupName": "gpu-workers" if shape.gpus else "cpu-workers",
        "replicas": shape.replicas,
        "minReplicas": shape.replicas,
        "maxReplicas": shape.replicas,
        "rayStartParams": {"num-cpus": str(ray_cpus)},  # GPUs: Ray reads the nvidia.com/gpu limit
        "template": {"spec": pod_spec(k8s, [container], [{"name": "dshm", "emptyDir": {"medium": "Memory"}},
                                                         *volumes])},
    }


def submitter_template(k8s: KubernetesConfig) -> dict:
    """K8sJobMode's submitter pod (``ray job submit``; the operator fills in the command), non-root like the rest."""
    container = {"name": "ray-job-submitter", "image": k8s.image, "resources": SUBMITTER_RESOURCES,
                 "securityContext": container_security_context()}
    spec = pod_spec(k8s, [container], [])
    del spec["volumes"]
    return {"spec": {"restartPolicy": "Never", **spec}}


def pod_spec(k8s: KubernetesConfig, containers: list[dict], volumes: list[dict]) -> dict:
    spec: dict = {}
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    spec["securityContext"] = pod_security_context(k8s)
    spec["containers"] = containers
    spec["volumes"] = volumes
    return spec


def _resources(cpu: str, memory: str) -> dict:
    return {"limits": {"cpu": cpu, "memory": memory}, "requests": {"cpu": cpu, "memory": memory}}


def quantity(cpus: float) -> str:
    """A CPU count as a Kubernetes quantity string (floats are rejected by the API server)."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"
