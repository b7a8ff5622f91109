"""The one place that connects to Ray: a local instance by default, or an existing cluster."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.spec import PipelineSpec
from stages.resources import StageResources, check_fits, missing_resources

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


# Unless --verbose: what a user would rather not read. Set in the driver before Ray starts, so every
# worker and actor inherits it (a cluster job gets it through the runtime env).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" in every actor
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
VERBOSE = "RAYALIGN_VERBOSE"

# A joined cluster's nodes may still be registering (a KubeRay job starts as its pods come up): the
# fail-fast check waits this long for them before it fails. A local instance is complete at start.
JOINED_CLUSTER_WAIT_S = 60.0


def set_verbosity(verbose: bool) -> None:
    """Quiet by default: rayalign's own progress lines and real warnings only; ``verbose`` shows everything.

    Call it before transformers is imported or Ray starts. The raw logs of every Ray process stay
    reachable from the run folder either way (``<run>/logs/ray``, see :func:`ensure_ray`).
    """
    if verbose:
        os.environ[VERBOSE] = "1"
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import warnings

    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


_RAY_STARTING = threading.Lock()  # stages running at once (max_concurrent_stages) connect at the same time


def ensure_ray(spec: PipelineSpec) -> None:
    """Start (or join) Ray once per process, and link its logs into the run folder."""
    import ray

    with _RAY_STARTING:
        if not ray.is_initialized():
            start_ray(spec)
        link_ray_logs(spec.run_root())


def cluster_address(spec: PipelineSpec) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (as Ray's own tools read it); None means
    a private local instance. Ray Client addresses are refused (ValueError, before anything runs)."""
    address = spec.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        source = "ray.address" if spec.ray.address else "RAY_ADDRESS"
        # The driver reads what the Ray Train workers write (training logs, checkpoints, the store) from the
        # same storage; over Ray Client it runs off the cluster, and Ray documents Client as unfit for Train/Tune.
        raise ValueError(f"{source}={address}: Ray Client (ray://) is not supported; submit the pipeline as a Ray "
                         f"job instead (rayalign submit CONFIG --address http://HEAD:8265), or run on a node of the "
                         f"cluster with ray.address: auto")
    return address


def start_ray(spec: PipelineSpec) -> None:
    import ray

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    # Ray's own start-up lines stay (where it started or which cluster it joined); its executor's don't.
    kwargs: dict = {"namespace": spec.ray.namespace, "log_to_driver": True}
    address = cluster_address(spec)
    if address:
        kwargs["address"] = address
        # Code and environment travel with the job when joining an existing cluster.
        passed = [*DRIVER_ENV, *(k for k in QUIET_ENV if k in os.environ)]
        kwargs["runtime_env"] = {"env_vars": {k: os.environ[k] for k in passed}}
    else:
        # address="local": always a new private instance, never a cluster that `ray start` left on this
        # machine (a plain ray.init() joins the one its bootstrap file names, and refuses num_cpus there).
        # The dashboard on the loopback only: Ray Train's PlacementGroupCleaner watches each run's
        # controller through the State API, which the dashboard serves. Without it, every Train run
        # logged "Failed to query Ray Train Controller actor state" every few seconds, and a sweep trial
        # that ASHA stopped kept its workers' CPUs, so the following trials never started.
        kwargs.update(address="local", num_cpus=spec.ray.num_cpus, num_gpus=spec.ray.num_gpus,
                      include_dashboard=True, dashboard_host="127.0.0.1")
        # Ray 2.60's gRPC servers listen on every interface, with no option for the loopback only. Its token
        # authentication, on by default for a new local instance unless RAY_AUTH_MODE says otherwise, makes
        # them refuse callers without the instance's token (tests/pipeline/test_ray_connect.py). Not set here:
        # Ray refreshes its in-process config only when it turns the mode on itself.
    ray.init(**kwargs)
    if not is_verbose():
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # the executor's per-dataset lines


def link_ray_logs(run_root: Path) -> None:
    """``<run>/logs/ray`` -> this Ray session's log folder (every worker's and actor's raw output)."""
    import ray

    # Private, but Ray's only handle on the session folder; a driver without a local node has none.
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return
    session_logs = Path(node.get_logs_dir_path())
    link = run_root / "logs" / "ray"
    if link.is_symlink() and link.resolve() == session_logs.resolve():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(session_logs, target_is_directory=True)


def stage_connector(spec: PipelineSpec, resources: StageResources | None) -> Callable[[], None]:
    """A stage's ``connect_ray``: start or join Ray, then, the first time, check that the stage's plan
    fits the cluster (only stages that connect, that is use Ray, are checked)."""
    checked: list[bool] = []

    def connect() -> None:
        ensure_ray(spec)
        if resources is not None and resources.uses_ray and spec.ray.check_resources and not checked:
            check_cluster_fits(resources, JOINED_CLUSTER_WAIT_S if cluster_address(spec) else 0.0)
            checked.append(True)

    return connect


def check_cluster_fits(resources: StageResources, wait_s: float = 0.0) -> None:
    """:func:`stages.resources.check_fits` against ``ray.cluster_resources()``, polled up to ``wait_s``."""
    import ray

    deadline = time.monotonic() + wait_s
    while missing_resources(resources, ray.cluster_resources()) and time.monotonic() < deadline:
        time.sleep(2.0)
    check_fits(resources, ray.cluster_resources())
