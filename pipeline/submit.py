"""Run a pipeline on an existing Ray cluster as a Ray job: ``rayalign submit CONFIG --address URL``.

    rayalign submit configs/tiny.yaml --address http://HEAD:8265 [--set KEY=VALUE] [--no-wait] [--resubmit]

This uses Ray's Job Submission SDK (``ray.job_submission.JobSubmissionClient``, the dashboard's
HTTP port, 8265). The job's entrypoint is ``PYTHON -m pipeline.cli run CONFIG --set
ray.address=auto`` (the driver joins the cluster it runs on instead of starting a local Ray;
``--command sweep`` runs ``rayalign sweep`` instead). PYTHON is ``--python``, else the interpreter the
head's Ray runs on (read from the dashboard), else ``python`` from the cluster's PATH. The submission id
is stable (``pipeline.jobs.submission_id``): a pipeline that is still running is not submitted twice,
and one that succeeded is recognised instead of rerun. A job that fails ends ``submit`` with exit 1 and
its log's tail. The job's ``runtime_env`` carries:

* ``working_dir``: the project folder (the nearest folder above CONFIG holding ``pipeline/``
  and ``stages/``; or ``--working-dir``), uploaded as a zip that respects ``.gitignore`` and
  ``.rayignore`` (500 MiB at most), so code, configs and small data files travel together.
  CONFIG must lie inside it. When it holds no ``pipeline/`` and ``stages/`` packages, this
  checkout's are shipped as ``py_modules`` (``--code installed`` skips that when the cluster's
  image has rayalign installed).
* ``pip``: only with ``--pip REQ`` (repeatable). Normally the cluster image carries the stack
  (torch, transformers, TRL, DeepSpeed); installing it per job takes minutes.
* ``env_vars``: the driver environment of ``pipeline.cluster`` (HF_HUB_OFFLINE=1, ...), plus
  ``--env KEY=VALUE`` (a setting, stored in the job record) or ``--env KEY`` (a reference,
  ``${KEY}``, that Ray expands on the cluster from its own environment: the value never leaves the
  cluster, so it is in no job record, log or manifest). A secret-looking name (token, key, secret,
  password) with a value on the command line is refused. Only names are ever printed.
  Hub downloads: ``kubernetes: {hub_offline: false}`` in the file or ``--env HF_HUB_OFFLINE=0``.

``storage`` must be a path every node of the cluster sees (NFS, a mounted bucket): a relative
path would resolve inside the job's temporary working_dir copy and vanish with it; submit
warns, and ``--set storage=/shared/runs`` fixes it.

Joining a cluster from your own shell instead: ``ray.address: auto`` or ``HEAD:6379`` (on a machine
that is a node of the cluster) in the pipeline file, or ``RAY_ADDRESS``, makes ``rayalign run``
connect to that cluster; the driver then runs where you are, and stops when your shell does. Ray
Client (``ray://``) is refused: Ray Train does not run over it.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from pathlib import Path

from pipeline.cluster import JOIN_CLUSTER
from pipeline.jobs import (ACTIVE, JobConflict, cluster_python, failure_summary, follow_logs, job_info,
                           job_server, submission_id, wait_for)
from pipeline.spec import PipelineSpec, load_spec

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH", re.IGNORECASE)
WORKING_DIR_EXCLUDES = [".git", ".venv", ".venv-*", "**/__pycache__", "*.egg-info", ".pytest_cache", "runs"]
CODE_PACKAGES = ("pipeline", "stages")


def project_root(config: Path) -> Path:
    """The nearest folder above ``config`` holding the rayalign packages; else the config's folder."""
    for folder in config.resolve().parents:
        if all((folder / package / "__init__.py").exists() for package in CODE_PACKAGES):
            return folder
    return config.resolve().parent


def local_packages() -> list[str]:
    """This checkout's ``pipeline`` and ``stages`` package folders."""
    import pipeline

    root = Path(pipeline.__file__).resolve().parents[1]
    return [str(root / package) for package in CODE_PACKAGES]


def build_job(config: str | Path, overrides: list[str] | None = None, *, working_dir: str | Path | None = None,
              code: str = "ship", pip: list[str] | None = None, env: list[str] | None = None,
              python: str = "python", command: str = "run", only: list[str] | None = None) -> dict:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` (and the validated spec, under "spec").
    ``only``: the job runs ``rayalign run --only`` these stages (upstream results from the cluster's store)."""
    config = Path(config).resolve()
    overrides = list(overrides or [])
    spec = load_spec(config, overrides)  # a broken config fails here, not minutes later on the cluster
    if command == "sweep":
        from pipeline.sweep import resolve_sweep

        resolve_sweep(spec)
    if only:
        from pipeline.dag import build_dag

        if command != "run":
            raise ValueError(f"--only selects the stages of `rayalign run`, not of `rayalign {command}`")
        nodes = build_dag(spec).order
        if unknown := [stage for stage in only if stage not in nodes]:
            raise ValueError(f"--only {','.join(unknown)}: not a stage of {config.name} (stages: {', '.join(nodes)})")
    root = Path(working_dir).resolve() if working_dir else project_root(config)
    try:
        relative = config.relative_to(root)
    except ValueError:
        raise ValueError(f"{config} is not inside the working_dir {root}; pass --working-dir") from None
    runtime_env: dict = {"working_dir": str(root), "excludes": _excludes(spec, root)}
    if code == "ship" and not all((root / package / "__init__.py").exists() for package in CODE_PACKAGES):
        runtime_env["py_modules"] = local_packages()
    if pip:
        runtime_env["pip"] = list(pip)
    runtime_env["env_vars"] = job_env(env or [], hub_offline=spec.kubernetes.hub_offline)
    entrypoint = [python, "-m", "pipeline.cli", command, relative.as_posix()]
    for override in [*overrides, JOIN_CLUSTER]:
        entrypoint += ["--set", override]
    if only:
        entrypoint += ["--only", ",".join(only)]
    return {
        "entrypoint": shlex.join(entrypoint),
        "runtime_env": runtime_env,
        "submission_id": submission_id(spec, overrides, command, only),
        "metadata": {"rayalign.pipeline": spec.name, "rayalign.config": relative.as_posix()},
        "spec": spec,
    }


def job_env(pairs: list[str], hub_offline: bool = True) -> dict[str, str]:
    """The job's environment variables: the driver defaults plus ``--env`` pairs (which win).

    The hub is offline (``HF_HUB_OFFLINE=1``) unless the file says ``kubernetes: {hub_offline: false}``
    (the same switch ``rayalign k8s`` uses for its pods) or the command line passes
    ``--env HF_HUB_OFFLINE=0``; then the job may download hub models and datasets."""
    from pipeline.cluster import DRIVER_ENV

    env = dict(DRIVER_ENV)
    env["HF_HUB_OFFLINE"] = "1" if hub_offline else "0"
    # The driver's ray.init(runtime_env=...) in pipeline.cluster repeats some of these keys; without
    # this, Ray refuses to merge it with the job's runtime_env.
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env {key!r}: not an environment variable name")
        if sep and SECRET_NAME.search(key):
            raise ValueError(f"--env {key}=...: a secret's value would be stored in the Ray job record; pass it "
                             f"by reference, --env {key}, and set {key} in the cluster's environment "
                             f"(or a Kubernetes secret)")
        env[key] = value if sep else f"${{{key}}}"  # Ray expands ${KEY} from the cluster node's environment
    return env


def _excludes(spec: PipelineSpec, root: Path) -> list[str]:
    excludes = list(WORKING_DIR_EXCLUDES)
    try:  # a store inside the project would be uploaded with every job
        excludes.append("/" + spec.storage_root().relative_to(root).as_posix())
    except ValueError:
        pass
    return excludes


def storage_warning(spec: PipelineSpec) -> str | None:
    if os.path.isabs(os.path.expanduser(spec.storage)):
        return None
    return (f"storage {spec.storage!r} is relative: on the cluster it resolves inside the job's temporary "
            f"working_dir and is lost when the job ends; use --set storage=/a/path/every/node/sees")


def describe(job: dict) -> list[str]:
    """What is being submitted, for the terminal: env var names only, never their values."""
    env = job["runtime_env"]
    lines = [f"entrypoint: {job['entrypoint']}", f"working_dir: {env['working_dir']}"]
    if "py_modules" in env:
        lines.append(f"py_modules: {', '.join(env['py_modules'])}")
    if "pip" in env:
        lines.append(f"pip: {' '.join(env['pip'])}")
    lines.append(f"env_vars: {', '.join(sorted(env['env_vars']))}")
    return lines


def submit(config: str | Path, address: str | None, overrides: list[str] | None = None, *, wait: bool = True,
           resubmit: bool = False, out=None, python: str | None = None, **job_options) -> tuple[str, str | None]:
    """Submit the pipeline; with ``wait``, stream its logs and return (job id, final status).

    Raises JobConflict when the same pipeline is pending or running there; returns its status without
    submitting when it already succeeded (unless ``resubmit``)."""
    out = out or sys.stdout
    client = job_server(address)
    address = client.get_address()
    python = python or cluster_python(client)
    if python is None:
        python = "python"
        print("rayalign: warning: the cluster's dashboard does not show the interpreter its Ray runs on; the job "
              "runs `python` from the head's PATH (pass --python to choose)", file=sys.stderr)
    job = build_job(config, overrides, python=python, **job_options)
    spec = job.pop("spec")
    warning = storage_warning(spec)
    if warning:
        print(f"rayalign: warning: {warning}", file=sys.stderr)
    job_id = job["submission_id"]
    earlier = job_info(client, job_id)
    if earlier is not None:
        status = str(earlier.status.value)
        if status in ACTIVE:
            raise JobConflict(f"{job_id} (this pipeline, with these overrides) is already {status} on {address}; "
                              f"follow it with: rayalign jobs logs {job_id} --follow --address {address}")
        if status == "SUCCEEDED" and not resubmit:
            print(f"{job_id} already SUCCEEDED on {address}; not submitted again (its artifacts are in the "
                  f"cluster's store; --resubmit runs it again)", file=out)
            return job_id, status
        client.delete_job(job_id)  # the id is the pipeline's: its old record makes way for the new run
        print(f"resubmitting {job_id} (the earlier run {status})", file=out)
    job_id = submit_with_retry(client, job)
    print(f"submitted {job_id} to {address}", file=out)
    for line in describe(job):
        print(f"  {line}", file=out)
    out.flush()
    if not wait:
        print(f"follow it with: rayalign jobs logs {job_id} --follow --address {address}", file=out)
        return job_id, None
    try:
        follow_logs(client, job_id, out)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (rayalign jobs stop {job_id} --address {address})",
              file=out)
        return job_id, None
    status = wait_for(client, job_id)
    print(f"job {job_id}: {status}", file=out)
    if status != "SUCCEEDED":
        print("\n".join(f"rayalign: {line}" if i == 0 else line
                        for i, line in enumerate(failure_summary(client, job_id, status))), file=sys.stderr)
    return job_id, status


def submit_with_retry(client, job: dict, timeout_s: float = 120.0) -> str:
    """``submit_job``, retried while a freshly started head's job agent is not up yet (HTTP 500)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)
