"""rayalign's Ray jobs on a cluster: the job server client, stable submission ids, and
``rayalign jobs list|status|logs|stop``.

A submission id is ``rayalign-<pipeline>-<hash>``, the hash over the validated pipeline (which already
holds the ``--set`` overrides), the overrides as given and the command (run or sweep). The same pipeline
submitted twice gets the same id, so ``rayalign submit`` can tell that it is still running (refused) or
has already succeeded (recognised, not rerun; ``--resubmit`` runs it again). A failed or stopped one is
resubmitted under the same id. Everything goes through Ray's Job Submission SDK; ``--address`` defaults
to ``RAY_API_SERVER_ADDRESS``, then ``RAY_ADDRESS``, as Ray's own ``ray job`` does, and the SDK sends the
cluster's auth token (``RAY_AUTH_MODE=token``) itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import sys
import time
from datetime import datetime, timezone

from pipeline.spec import PipelineSpec

PIPELINE_KEY = "rayalign.pipeline"  # job metadata that marks a rayalign job
ACTIVE = {"PENDING", "RUNNING"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOG_TAIL_LINES = 40


class ClusterUnreachable(RuntimeError):
    """The job server did not answer: a one-line message for the terminal."""


class JobConflict(RuntimeError):
    """The same pipeline is already pending or running on the cluster."""


def job_server(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (or the environment's), or a one-line error."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterUnreachable("no cluster given: pass --address http://HEAD:8265 (the dashboard's port) or "
                                 "set RAY_API_SERVER_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except ConnectionError:
        raise ClusterUnreachable(f"cannot reach the Ray job server at {address}: nothing answers there; is the head "
                                 f"up, and is this its dashboard address (port 8265 by default)?") from None
    except Exception as err:  # noqa: BLE001 - auth, version and URL errors, each one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterUnreachable(f"cannot use the Ray job server at {address}: {first}") from None


def submission_id(spec: PipelineSpec, overrides: list[str], command: str = "run", only: list[str] | None = None) -> str:
    """Stable per (pipeline name, validated config, overrides, command, --only stages)."""
    identity = {"spec": spec.model_dump(mode="json"), "overrides": list(overrides), "command": command}
    if only:  # absent otherwise: the ids of whole-pipeline jobs stay what they were
        identity["only"] = list(only)
    content = json.dumps(identity, sort_keys=True, default=str)
    slug = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-") or "pipeline"
    return f"rayalign-{slug}-{hashlib.sha256(content.encode()).hexdigest()[:12]}"


def job_info(client, job_id: str):
    """The job's record, or None when the cluster has none under this id."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "does not exist" in str(err) or "404" in str(err):
            return None
        raise


def cluster_python(client) -> str | None:
    """The interpreter the head's Ray runs its workers on (the job's driver runs on the head), read from
    the head raylet's ``--python_worker_command``; None where the dashboard does not show it."""
    try:
        # The dashboard's node view is the only place the job server shows it (no public SDK call).
        nodes = client._do_request("GET", "/nodes?view=summary").json()["data"]["summary"]
    except Exception:  # noqa: BLE001 - an older or locked-down dashboard: fall back to PATH's python
        return None
    for node in nodes:
        if not node.get("raylet", {}).get("isHeadNode"):
            continue
        for arg in node.get("cmdline") or []:
            if arg.startswith("--python_worker_command="):
                words = shlex.split(arg.partition("=")[2])
                return words[0] if words else None
    return None


def failure_summary(client, job_id: str, status: str) -> list[str]:
    """What a failed job's submitter needs: the status, Ray's message, its log's tail, and a hint."""
    info = job_info(client, job_id)
    lines = [f"job {job_id} {status}" + (f": {info.message}" if info is not None and info.message else "")]
    try:
        logs = client.get_job_logs(job_id)
    except RuntimeError:
        logs = ""
    tail = logs.rstrip().splitlines()[-LOG_TAIL_LINES:]
    if tail:
        lines += [f"the last {len(tail)} lines of its log:", *(f"  | {line}" for line in tail)]
    if re.search(r"No module named '(torch|ray|pipeline|stages|transformers|trl)'", logs):
        entry = info.entrypoint.split()[0] if info is not None and info.entrypoint else "python"
        lines.append(f"hint: the job ran `{entry}`, which lacks the stack; pass --python with the cluster's "
                     f"interpreter, or ship the code (--code ship)")
    return lines


def follow_logs(client, job_id: str, out) -> None:
    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(stream())


def wait_for(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's terminal status (the log stream can end a moment before the status flips)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


# --------------------------------------------------------------------------- rayalign jobs ...


def list_jobs(client, out=None, include_all: bool = False) -> int:
    out = out or sys.stdout
    jobs = [j for j in client.list_jobs() if include_all or PIPELINE_KEY in (j.metadata or {})]
    jobs.sort(key=lambda j: j.start_time or 0)
    if not jobs:
        print("no rayalign jobs on this cluster", file=out)
        return 0
    print(f"{'SUBMISSION ID':<36} {'STATUS':<10} {'STARTED (UTC)':<20} {'DURATION':>9}  PIPELINE / CONFIG", file=out)
    for job in jobs:
        meta = job.metadata or {}
        print(f"{job.submission_id or job.job_id:<36} {str(job.status.value):<10} {_when(job.start_time):<20} "
              f"{_duration(job.start_time, job.end_time):>9}  {meta.get(PIPELINE_KEY, '-')} / "
              f"{meta.get('rayalign.config', '-')}", file=out)
    return 0


def show_status(client, job_id: str, out=None) -> int:
    """Exit 0 for a pending, running or succeeded job, 1 for a failed or stopped one."""
    out = out or sys.stdout
    info = _existing(client, job_id)
    status = str(info.status.value)
    print(f"{job_id}: {status}", file=out)
    meta = info.metadata or {}
    for label, value in (("pipeline", meta.get(PIPELINE_KEY)), ("config", meta.get("rayalign.config")),
                         ("entrypoint", info.entrypoint), ("started", _when(info.start_time)),
                         ("ended", _when(info.end_time) if info.end_time else None),
                         ("duration", _duration(info.start_time, info.end_time)), ("message", info.message)):
        if value:
            print(f"  {label}: {value}", file=out)
    return 1 if status in ("FAILED", "STOPPED") else 0


def show_logs(client, job_id: str, follow: bool = False, tail: int | None = None, out=None) -> int:
    out = out or sys.stdout
    _existing(client, job_id)
    if follow:
        try:
            follow_logs(client, job_id, out)
        except KeyboardInterrupt:
            print(f"\nstopped following; the job keeps running (rayalign jobs stop {job_id})", file=out)
        return 0
    logs = client.get_job_logs(job_id)
    if tail:
        logs = "\n".join(logs.rstrip().splitlines()[-tail:]) + "\n"
    out.write(logs)
    return 0


def stop_job(client, job_id: str, out=None, timeout_s: float = 60.0) -> int:
    out = out or sys.stdout
    info = _existing(client, job_id)
    if str(info.status.value) in TERMINAL:
        print(f"{job_id} has already ended: {info.status.value}", file=out)
        return 0
    client.stop_job(job_id)
    status = wait_for(client, job_id, timeout_s)
    print(f"{job_id}: {status}", file=out)
    return 0 if status in TERMINAL else 1


def _existing(client, job_id: str):
    info = job_info(client, job_id)
    if info is None:
        raise ValueError(f"no job {job_id!r} on this cluster (rayalign jobs list shows them)")
    return info


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    seconds = ((end_ms or time.time() * 1000) - start_ms) / 1000
    return f"{seconds:.0f}s" if seconds < 600 else f"{seconds / 60:.0f}m"
