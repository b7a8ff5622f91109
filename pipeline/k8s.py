"""Render a pipeline as a KubeRay ``RayJob``: ``rayalign k8s CONFIG [-o FILE]``.

    rayalign k8s configs/tiny.yaml --storage-claim rayalign-runs -o k8s/rayjob-tiny.yaml
    kubectl apply -f k8s/rayjob-tiny.yaml

Two documents come out: a ``ConfigMap`` holding the pipeline file (mounted into the head pod,
where KubeRay runs the job's driver) and a ``RayJob`` (``ray.io/v1``) whose entrypoint is
``rayalign run <that file> --set ray.address=auto``. ``submissionMode`` is explicit (K8sJobMode: a
non-root submitter pod), the job may run ``activeDeadlineSeconds`` and is retried ``backoffLimit``
times. KubeRay creates a Ray cluster for the job and deletes it ``ttlSecondsAfterFinished`` after the
job ends (``shutdownAfterJobFinishes``). With ``--cluster-selector NAME`` the job runs on an existing
RayCluster instead (``clusterSelector``, no ``rayClusterSpec``; see :func:`render`).

The cluster is sized from the stages' resource plans (``stages.resources``, see
:func:`cluster_shape`): every training worker, rollout engine, reward-model actor and eval actor of
the largest stage fits (a swept stage's ``max_concurrent_trials`` trials side by side; with
``max_concurrent_stages``, the largest group of stages that may run at once), in pods
of the largest member's CPUs and, with GPUs, ``nvidia.com/gpu`` limits of one member's GPUs or
``kubernetes.gpus_per_pod`` (``--gpus-per-pod``); ``--workers`` asks for more pods. Each worker
container has ``kubernetes.cpu_headroom`` CPUs beyond those Ray schedules. The head runs drivers
only (``num-cpus: 0``, ``num-gpus: 0``). Pod templates: ``pipeline.k8s_manifests``.

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
from pathlib import Path

import yaml

from pipeline.cluster import DRIVER_ENV, JOIN_CLUSTER
from pipeline.k8s_manifests import CONFIG_MOUNT, ClusterShape, head_group, submitter_template, worker_group
from pipeline.spec import KubernetesConfig, PipelineSpec, load_spec
from pipeline.sweep import concurrent_resources, resolve_sweep
from pipeline.dag import build_dag, concurrent_peak

MAX_RAYJOB_NAME = 47  # KubeRay: RayJob names are DNS-1035 labels of at most 47 characters
CLUSTER_SELECTOR_KEY = "ray.io/cluster"  # KubeRay selects an existing RayCluster by this label (its name)


def cluster_shape(spec: PipelineSpec, gpus_per_pod: int | None = None, workers: int | None = None) -> ClusterShape:
    """Enough worker pods for the largest stage (every training worker, rollout engine, reward-model
    actor and eval actor it runs at once: ``stages.resources``; a swept stage, that times its
    ``max_concurrent_trials``: ``pipeline.sweep.concurrent_resources``); with ``max_concurrent_stages``
    above 1, for the largest group of stages that may run at once (``pipeline.dag.concurrent_peak``).

    A pod holds the largest single member (its CPUs; its GPUs, or ``gpus_per_pod`` of them). CPU
    pipelines get pods of that size, as many as the peak CPUs need. GPU pipelines get
    ``ceil(peak GPUs / gpus_per_pod)`` pods, and, with ``gpus_per_pod`` given, the peak's CPUs spread
    over them (several members per pod, so NCCL between them can use the node's NVLink). ``workers``
    asks for more pods than that (never fewer: the largest stage would not fit).
    """
    shape = _least_shape(spec, gpus_per_pod)
    if workers is None:
        return shape
    if workers < shape.replicas:
        raise ValueError(f"--workers {workers} is fewer than the {shape.replicas} worker pods of {shape.cpus:g} CPUs"
                         + (f" and {shape.gpus} GPUs" if shape.gpus else "") + " that the largest stage needs")
    return ClusterShape(workers, shape.cpus, shape.gpus)


def _least_shape(spec: PipelineSpec, gpus_per_pod: int | None) -> ClusterShape:
    by_stage = {name: concurrent_resources(config, name) for name, config in spec.stages.items()}
    groups = [g for plan in by_stage.values() for g in plan.groups]
    member_cpus = max((g.cpus for g in groups), default=0.0) or 1.0  # no Ray stage: one small worker
    most = concurrent_peak(build_dag(spec), by_stage, spec.max_concurrent_stages)
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

    ``command`` is the rayalign subcommand the job runs: ``run`` or ``sweep``. With
    ``cluster_selector`` the job runs on that existing RayCluster: the submitter pod mounts the
    ConfigMap and uploads it as the job's ``working_dir`` (``ray job submit`` packs a local folder),
    since the existing cluster's head does not mount it.
    """
    k8s = _options(spec, options)
    name = rayjob_name(spec.name)
    config_map = f"{name}-config"
    selector = k8s.cluster_selector
    if selector and k8s.submission_mode != "K8sJobMode":
        raise ValueError(f"cluster_selector needs submission_mode K8sJobMode, not {k8s.submission_mode}: its "
                         f"submitter pod uploads the pipeline file to the existing cluster")
    entrypoint = ["rayalign", command, config_file if selector else f"{CONFIG_MOUNT}/{config_file}"]
    for override in [*(overrides or []), JOIN_CLUSTER, *storage_overrides(spec, k8s)]:
        entrypoint += ["--set", override]
    job: dict = {"entrypoint": shlex.join(entrypoint), "submissionMode": k8s.submission_mode}
    if selector:  # the cluster outlives the job: no shutdown, so no TTL (which requires it)
        job["shutdownAfterJobFinishes"] = False
    else:
        job["shutdownAfterJobFinishes"] = True
        job["ttlSecondsAfterFinished"] = k8s.ttl_seconds_after_finished
    if k8s.active_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = k8s.active_deadline_seconds
    job["backoffLimit"] = k8s.backoff_limit
    if k8s.submission_mode == "K8sJobMode":
        job["submitterPodTemplate"] = submitter_template(k8s)
    if selector:
        job["clusterSelector"] = {CLUSTER_SELECTOR_KEY: selector}
        spec_of_submitter = job["submitterPodTemplate"]["spec"]
        spec_of_submitter["containers"][0]["volumeMounts"] = [{"name": "pipeline", "mountPath": CONFIG_MOUNT}]
        spec_of_submitter["volumes"] = [{"name": "pipeline", "configMap": {"name": config_map}}]
        job["runtimeEnvYAML"] = yaml.safe_dump(_selector_runtime_env(k8s), sort_keys=False)
    else:
        shape = cluster_shape(spec, k8s.gpus_per_pod, k8s.workers)
        job["rayClusterSpec"] = {"rayVersion": k8s.ray_version, "headGroupSpec": head_group(k8s, config_map),
                                 "workerGroupSpecs": [worker_group(k8s, shape)]}
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
              "metadata": {"name": name, "namespace": k8s.namespace, "labels": _labels(spec)}, "spec": job}
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map, "namespace": k8s.namespace, "labels": _labels(spec)},
        "data": {config_file: config_text},
    }
    return [configmap, rayjob]


def _options(spec: PipelineSpec, options: dict) -> KubernetesConfig:
    k8s = spec.kubernetes.model_copy(update={k: v for k, v in options.items() if v is not None})
    return KubernetesConfig.model_validate(k8s.model_dump())


def _selector_runtime_env(k8s: KubernetesConfig) -> dict:
    """The job's runtime env on an existing cluster: the mounted ConfigMap as working_dir (without the
    ``..data`` links Kubernetes puts next to its files) and the drivers' environment."""
    env = dict(DRIVER_ENV, HF_HUB_OFFLINE="1" if k8s.hub_offline else "0")
    return {"working_dir": CONFIG_MOUNT, "excludes": ["..*"], "env_vars": env}


def storage_overrides(spec: PipelineSpec, k8s: KubernetesConfig) -> list[str]:
    """Where the job's store lives on the claim: ``storage`` itself, or with an object-store ``storage``
    the store's working mirror (``storage_cache``), which every pod must share as well."""
    if not k8s.storage_claim:
        return []
    if spec.storage_uri() is not None:
        return [f"storage_cache={k8s.storage_mount}/cache"]
    return [f"storage={k8s.storage_mount}/runs"]


def warnings(spec: PipelineSpec, k8s: KubernetesConfig) -> list[str]:
    """Things that render fine but would fail (or lose results) on a cluster."""
    found = []
    remote = spec.storage_uri() is not None
    if not k8s.storage_claim and remote:
        # Ray Train's rank 0 saves the model into the store's local mirror on its own pod, and the job's
        # driver uploads it from the head: the mirror must be one folder for both.
        found.append(f"no storage claim: storage {spec.storage!r} is an object store, but its working mirror "
                     f"(storage_cache) must be shared by the pods; pass --storage-claim (a ReadWriteMany PVC, "
                     f"mounted as <mount>/cache)")
    elif not k8s.storage_claim:
        found.append(f"no storage claim: storage {spec.storage!r} is not shared by the pods; pass --storage-claim "
                     f"(a ReadWriteMany PVC) or set an absolute path every pod mounts")
    if remote and not k8s.storage_secret:
        found.append("no kubernetes.storage_secret: the pods read object-store credentials from their environment "
                     "only (an IAM role for the service account, workload identity); else name the Secret")
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
        resolve_sweep(spec)  # a bad search space fails here, not in the cluster
    text = Path(config).read_text()
    documents = render(spec, text, Path(config).name, overrides=overrides, command=command, **options)
    k8s = _options(spec, options)
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
        "installed (k8s/Dockerfile)." + (f" Runs on the existing RayCluster {k8s.cluster_selector!r}."
                                         if k8s.cluster_selector else ""),
    ]
    return to_yaml(documents, header), warnings(spec, k8s)


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
