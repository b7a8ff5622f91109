"""The one place that connects to Ray: a local instance by default, or an existing cluster."""

from __future__ import annotations

import os

from pipeline.spec import PipelineSpec

# The override a job's entrypoint carries to run on the cluster it was submitted to (a Ray job or a
# KubeRay RayJob): it replaces any local-Ray settings of the file (ray.num_cpus).
JOIN_CLUSTER = "ray.address=auto"

# Set for every process this driver starts (local Ray workers inherit the driver's environment).
DRIVER_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else workers print pages of bytecode while datasets fingerprints
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def ensure_ray(spec: PipelineSpec) -> None:
    """Start (or join) Ray once per process; a second call is a no-op."""
    import ray

    if ray.is_initialized():
        return
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    kwargs: dict = {"namespace": spec.ray.namespace, "log_to_driver": True}
    if spec.ray.address:
        kwargs["address"] = spec.ray.address
        # Code and environment travel with the job when joining an existing cluster.
        kwargs["runtime_env"] = {"env_vars": {k: os.environ[k] for k in DRIVER_ENV}}
    else:
        kwargs.update(num_cpus=spec.ray.num_cpus, num_gpus=spec.ray.num_gpus)
    ray.init(**kwargs)
