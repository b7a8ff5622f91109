"""A real two-node Ray cluster on 127.0.0.1, started with ``ray start`` as an operator would start one.

The head has the dashboard and job server; the second node joins it with ``ray start --address`` and
carries a custom resource (``second_node``) so that a test can tell the nodes apart. Every port is
chosen free (the test session's own in-process Ray holds the defaults, 6379/8265/52365...), each node has
its own temp folder (short: Ray's socket paths must fit AF_UNIX's 107 bytes), and ``stop`` ends exactly
the processes these ``ray start`` calls left running, found by their temp folder and reaped with their
children, by pid. ``ray stop`` would end every Ray process on the machine, other sessions' included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class TwoNodeCluster:
    gcs_address: str  # 127.0.0.1:PORT: what RAY_ADDRESS / ray.address name
    dashboard: str  # http://127.0.0.1:PORT: the job server
    client_address: str  # ray://127.0.0.1:PORT: Ray Client
    temp_dirs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # what `ray start` ran with

    def pids(self) -> set[int]:
        """The processes this cluster's ``ray start`` calls left running, and all their children."""
        import psutil

        marks = [str(d) for d in self.temp_dirs]
        roots = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if any(mark in cmdline for mark in marks):
                roots.append(process)
        found = set()
        for process in roots:
            found.add(process.pid)
            try:
                found.update(child.pid for child in process.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return found

    def stop(self, timeout_s: float = 20.0) -> None:
        import psutil

        processes = []
        for pid in self.pids():
            try:
                processes.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for process in processes:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=timeout_s)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def start_two_node_cluster(cpus_per_node: int = 2, timeout_s: float = 120.0) -> TwoNodeCluster:
    """``ray start --head`` plus one ``ray start --address`` on 127.0.0.1; waits until both nodes are alive."""
    (gcs, dashboard, client, worker_min, *ports) = free_ports(4 + 2 * len(NODE_PORT_FLAGS))
    # Started as `.venv/bin/ray start` from a shell that has not activated the venv: `python` on the nodes'
    # PATH is not the cluster's interpreter (rayalign submit must find that one itself).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.pop("RAY_ADDRESS", None)
    # Ray 2.60 turns token authentication on for a head that finds a token (~/.ray/auth_token, which any local
    # ray.init() creates) but not for a node joining it, which is then refused: say "token" to both, as an
    # operator would, and make sure the token exists (its value is never printed).
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)
    temp_dirs = [Path(tempfile.mkdtemp(prefix="r2n", dir="/tmp")) for _ in range(2)]
    cluster = TwoNodeCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", f"ray://127.0.0.1:{client}",
                             temp_dirs, env)
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--num-gpus=0",
              "--disable-usage-stats", "--object-store-memory=200000000"]
    node_ports = [dict(zip(NODE_PORT_FLAGS, ports[i::2])) for i in range(2)]
    head = [RAY, "start", "--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dirs[0]}",
            # Disjoint worker port ranges: both nodes share the one IP.
            f"--min-worker-port={worker_min + 100}", f"--max-worker-port={worker_min + 199}",
            "--resources", json.dumps({"head_node": 1}), *common,
            *(f"{flag}={port}" for flag, port in node_ports[0].items())]
    second = [RAY, "start", f"--address={cluster.gcs_address}", f"--temp-dir={temp_dirs[1]}",
              f"--min-worker-port={worker_min + 200}", f"--max-worker-port={worker_min + 299}",
              "--resources", json.dumps({"second_node": 1}), *common,
              *(f"{flag}={port}" for flag, port in node_ports[1].items())]
    try:
        for command in (head, second):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command[:3])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        wait_for_nodes(cluster, 2, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for_nodes(cluster: TwoNodeCluster, count: int, timeout_s: float) -> None:
    """Until the job server answers and lists ``count`` alive nodes."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            alive = alive_nodes(cluster)
            if len(alive) >= count:
                return
            last = f"{len(alive)} alive"
        except (OSError, RuntimeError, ConnectionError) as err:
            last = err
        time.sleep(1)
    raise TimeoutError(f"the two-node cluster did not come up in {timeout_s:.0f}s ({last})")


def alive_nodes(cluster: TwoNodeCluster) -> list[dict]:
    """The dashboard's node summaries (through Ray's client: it sends the auth token)."""
    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    response = JobSubmissionClient(cluster.dashboard)._do_request("GET", "/nodes?view=summary")
    response.raise_for_status()
    nodes = response.json()["data"]["summary"]
    return [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]
