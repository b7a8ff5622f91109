"""Render a pipeline as a KubeRay ``RayJob``: ``rayalign k8s CONFIG [-o FILE]``.

    rayalign k8s configs/tiny.yaml --storage-claim rayalign-runs -o k8s/rayjob-tiny.yaml
    kubectl apply -f k8s/rayjob-tiny.yaml

Two documents come out: a ``ConfigMap`` holding the pipeline file (mounted into the head pod,
where KubeRay runs the job's driver) and a ``RayJob`` (``ray.io/v1``) whose entrypoint is
``rayalign run <that file> --set ray.address=auto``. KubeRay creates a Ray cluster for the job
and deletes it when the job ends (``shutdownAfterJobFinishes``); the RayJob itself goes
``ttlSecondsAfterFinished`` later.

The cluster is sized from the stages' resource plans (``stages.resources``, see
:func:`cluster_shape`): every training worker, rollout engine, reward-model actor and eval actor of
the largest stage fits, in pods of the largest member's CPUs and, with GPUs, ``nvidia.com/gpu``
limits of one member's GPUs or ``kubernetes.gpus_per_pod`` (``--gpus-per-pod``). The head runs
drivers only (``num-cpus: 0``).

``storage`` must be one filesystem shared by every pod (Ray Train writes checkpoints from the
workers, stages read their upstream artifacts from wherever they run): give a ReadWriteMany
PersistentVolumeClaim (NFS, CephFS, EFS, Filestore) as ``kubernetes.storage_claim`` or
``--storage-claim``; it is mounted at ``kubernetes.storage_mount`` on every pod and ``storage``
becomes ``<mount>/runs``. Options live in the pipeline's ``kubernetes:`` section (see
``pipeline.spec.KubernetesConfig``); the flags override them. See k8s/README.md.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.cluster import JOIN_CLUSTER
from pipeline.spec import KubernetesConfig, PipelineSpec, load_spec
from stages.resources import peak, stage_resources

CONFIG_MOUNT = "/home/ray/rayalign"
MAX_RAYJOB_NAME = 47  # KubeRay: RayJob names are DNS-1035 labels of at most 47 characters


@dataclass(frozen=True)
class ClusterShape:
    """The worker group of a pipeline's Ray cluster: ``replicas`` pods of ``cpus`` CPUs and ``gpus`` GPUs."""

    replicas: int
    cpus: float
    gpus: int = 0


def cluster_shape(spec: PipelineSpec, gpus_per_pod: int | None = None) -> ClusterShape:
    """Enough worker pods for the largest stage (every training worker, rollout engine, reward-model
    actor and eval actor it runs at once: ``stages.resources``), stages running one at a time.

    A pod holds the largest single member (its CPUs; its GPUs, or ``gpus_per_pod`` of them). CPU
    pipelines get pods of that size, as many as the peak CPUs need. GPU pipelines get
    ``ceil(peak GPUs / gpus_per_pod)`` pods, and, with ``gpus_per_pod`` given, the peak's CPUs spread
    over them (several members per pod, so NCCL between them can use the node's NVLink).
    """
    plans = [stage_resources(config, name) for name, config in spec.stages.items()]
    groups = [g for plan in plans for g in plan.groups]
    member_cpus = max((g.cpus for g in groups), default=0.0) or 1.0  # no Ray stage: one small worker
    most = peak(plans)
    if not most["GPU"]:
        return ClusterShape(replicas=max(1, math.ceil(most["CPU"] / member_cpus - 1e-9)), cpus=member_cpus)
    member_gpus = max(b.get("GPU", 0.0) for g in groups for b in g.member_bundles() or [{}])
    if gpus_per_pod is not None and gpus_per_pod < member_gpus:
        raise ValueError(f"gpus_per_pod {gpus_per_pod} is less than one bundle's {member_gpus:g} GPUs: "
                         f"a pod must hold it")
    per_pod = gpus_per_pod or max(1, math.ceil(member_gpus))
    replicas = math.ceil(most["GPU"] / per_pod - 1e-9)
    if gpus_per_pod is None:
        return ClusterShape(max(replicas, math.ceil(most["CPU"] / member_cpus - 1e-9)), member_cpus, per_pod)
    return ClusterShape(replicas, max(member_cpus, math.ceil(most["CPU"] / replicas - 1e-9)), per_pod)


def render(spec: PipelineSpec, config_text: str, config_file: str = "pipeline.yaml", *,
           overrides: list[str] | None = None, command: str = "run", **options) -> list[dict]:
    """The ConfigMap and the RayJob for a pipeline; ``options`` override ``spec.kubernetes`` fields.

    ``command`` is the rayalign subcommand the job runs: ``run`` or ``sweep``.
    """
    k8s = spec.kubernetes.model_copy(update={k: v for k, v in options.items() if v is not None})
    k8s = KubernetesConfig.model_validate(k8s.model_dump())
    name = rayjob_name(spec.name)
    config_map = f"{name}-config"
    entrypoint = ["rayalign", command, f"{CONFIG_MOUNT}/{config_file}"]
    for override in [*(overrides or []), JOIN_CLUSTER] + ([f"storage={k8s.storage_mount}/runs"]
                                                           if k8s.storage_claim else []):
        entrypoint += ["--set", override]
    shape = cluster_shape(spec, k8s.gpus_per_pod)
    env = pod_env(k8s)
    storage_mounts = [{"name": "storage", "mountPath": k8s.storage_mount}] if k8s.storage_claim else []
    storage_volumes = ([{"name": "storage", "persistentVolumeClaim": {"claimName": k8s.storage_claim}}]
                       if k8s.storage_claim else [])

    head = _head_container(k8s, env, storage_mounts)
    worker = _worker_container(k8s, env, storage_mounts, shape)
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": _labels(spec)},
        "spec": {
            "entrypoint": shlex.join(entrypoint),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": k8s.ttl_seconds_after_finished,
            "rayClusterSpec": {
                "rayVersion": k8s.ray_version,
                "headGroupSpec": {
                    # The head runs the job's driver (and sweep trial drivers); training goes to workers.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {"spec": _pod_spec(k8s, [head], [
                        {"name": "pipeline", "configMap": {"name": config_map}}, *storage_volumes])},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu-workers" if shape.gpus else "cpu-workers",
                    "replicas": shape.replicas,
                    "minReplicas": shape.replicas,
                    "maxReplicas": shape.replicas,
                    "rayStartParams": {},
                    "template": {"spec": _pod_spec(k8s, [worker], [
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}}, *storage_volumes])},
                }],
            },
        },
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map, "namespace": k8s.namespace, "labels": _labels(spec)},
        "data": {config_file: config_text},
    }
    return [configmap, rayjob]


def _head_container(k8s: KubernetesConfig, env: list[dict], storage_mounts: list[dict]) -> dict:
    return {
        "name": "ray-head",
        "image": k8s.image,
        "env": env,
        "ports": [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}],
        "resources": _resources(k8s.head_cpu, k8s.head_memory),
        "volumeMounts": [{"name": "pipeline", "mountPath": CONFIG_MOUNT}, *storage_mounts],
    }


def _worker_container(k8s: KubernetesConfig, env: list[dict], storage_mounts: list[dict],
                      shape: ClusterShape) -> dict:
    limits = {"cpu": _quantity(shape.cpus), "memory": k8s.worker_memory}
    if shape.gpus:
        limits["nvidia.com/gpu"] = str(shape.gpus)
    return {
        "name": "ray-worker",
        "image": k8s.image,
        "env": env,
        "resources": {"limits": limits, "requests": dict(limits)},
        # torch.distributed (gloo, NCCL) and DeepSpeed need more /dev/shm than a container's 64 MiB.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *storage_mounts],
    }


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


def warnings(spec: PipelineSpec, k8s: KubernetesConfig) -> list[str]:
    """Things that render fine but would fail (or lose results) on a cluster."""
    found = []
    if not k8s.storage_claim:
        found.append(f"no storage claim: storage {spec.storage!r} is not shared by the pods; pass --storage-claim "
                     f"(a ReadWriteMany PVC) or set an absolute path every pod mounts")
    from stages.stage import data_sources

    for name, stage in spec.stages.items():
        for field_name, (data, _) in data_sources(stage).items():
            for path in (data.path, data.eval_path):
                if path and not path.startswith("builtin:") and not path.startswith("/"):
                    found.append(f"stages.{name}.{field_name}: {path!r} is relative and only the pipeline file is "
                                 f"shipped; put data on the storage volume and use an absolute path")
    base = spec.base.model
    if base.startswith((".", "/")) and not (k8s.storage_claim and base.startswith(k8s.storage_mount)):
        found.append(f"base.model {base!r} is a local folder; pods need it on shared storage or a hub id")
    return found


def rayjob_name(pipeline_name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", pipeline_name.lower()).strip("-")
    return f"rayalign-{slug}"[:MAX_RAYJOB_NAME].rstrip("-")


def to_yaml(documents: list[dict], header: list[str] | None = None) -> str:
    lines = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header or [])
    body = "---\n".join(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120) for doc in documents)
    return lines + body


def render_file(config: str, overrides: list[str] | None = None, command: str = "run",
                **options) -> tuple[str, list[str]]:
    """``rayalign k8s``: the manifests' text for a pipeline file, and the warnings."""
    spec = load_spec(config, overrides)
    if command == "sweep":
        from pipeline.sweep import resolve_sweep

        resolve_sweep(spec)  # a bad search space fails here, not in the cluster
    text = Path(config).read_text()
    documents = render(spec, text, Path(config).name, overrides=overrides, command=command, **options)
    k8s = spec.kubernetes.model_copy(update={k: v for k, v in options.items() if v is not None})
    shown = ["rayalign", "k8s", config, *[f"--set={o}" for o in overrides or []]]
    if command != "run":
        shown += ["--command", command]
    for key, value in options.items():
        if value is not None:
            shown += [f"--{key.replace('_', '-')}", str(value)]
    header = [
        f"KubeRay RayJob for the pipeline {spec.name!r}, rendered by rayalign (edit the pipeline, not this file):",
        f"  {shlex.join(shown)}",
        "Apply: kubectl apply -f THIS_FILE; follow: kubectl logs -f -l job-name=" + documents[1]["metadata"]["name"],
        "Needs the KubeRay operator (ray.io/v1; checked against v1.7.0's schema) and an image with rayalign",
        "installed (k8s/Dockerfile).",
    ]
    return to_yaml(documents, header), warnings(spec, k8s)


def _pod_spec(k8s: KubernetesConfig, containers: list[dict], volumes: list[dict]) -> dict:
    spec: dict = {}
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    spec["containers"] = containers
    spec["volumes"] = volumes
    return spec


def _resources(cpu: str, memory: str) -> dict:
    return {"limits": {"cpu": cpu, "memory": memory}, "requests": {"cpu": cpu, "memory": memory}}


def _quantity(cpus: float) -> str:
    """A CPU count as a Kubernetes quantity string (floats are rejected by the API server)."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{math.ceil(cpus * 1000)}m"


def _labels(spec: PipelineSpec) -> dict:
    return {"app.kubernetes.io/name": "rayalign", "rayalign/pipeline": rayjob_name(spec.name)[len("rayalign-"):]}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the pipeline file) as readable literal blocks; no YAML anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def main_k8s(config: str, overrides: list[str], output: str | None, command: str = "run", **options) -> int:
    text, found = render_file(config, overrides, command, **options)
    for warning in found:
        print(f"rayalign: warning: {warning}", file=sys.stderr)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
