"""How a driver finds Ray (``pipeline.cluster.start_ray``), each in a fresh process of its own.

* no address and no ``RAY_ADDRESS``: a new private instance with the file's ``num_cpus`` and its
  dashboard on 127.0.0.1 only, even where a bootstrap file names another cluster (``ray start``
  leaves one behind); its gRPC ports, which Ray binds to every interface, refuse callers without the
  instance's token (Ray's token authentication, on by default for a new local instance);
* ``RAY_ADDRESS``: join that cluster (here the test session's), without passing ``num_cpus``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Ray's gRPC servers listen on every interface: the probe calls the GCS and the raylet at the node's address,
# as another machine would, without the instance's token and with it (the control shows that only the token
# is missing).
CONNECT = """
import json, os, sys
from pathlib import Path

import ray
from pipeline.cluster import ensure_ray
from pipeline.spec import parse_spec


def grpc_answers(gcs_address):
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, node_manager_pb2, node_manager_pb2_grpc

    # Where Ray reads the token from, in its order.
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    token = os.environ.get("RAY_AUTH_TOKEN") or token_file.read_text().strip()
    node = ray.nodes()[0]
    raylet = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
    calls = {
        "gcs": lambda meta: gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(gcs_address))
        .GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=20, metadata=meta),
        "raylet": lambda meta: node_manager_pb2_grpc.NodeManagerServiceStub(grpc.insecure_channel(raylet))
        .GetNodeStats(node_manager_pb2.GetNodeStatsRequest(), timeout=20, metadata=meta),
    }
    answers = {"addresses": [gcs_address, raylet]}
    for name, call in calls.items():
        for label, meta in (("no_token", None), ("token", [("authorization", "Bearer " + token)])):
            try:
                call(meta)
                answers[f"{name}_{label}"] = "OK"
            except grpc.RpcError as error:
                answers[f"{name}_{label}"] = error.code().name
    return answers


spec = parse_spec({"name": "connect", "storage": sys.argv[1], "ray": {"num_cpus": 3},
                   "stages": {"sft": {"data": "builtin:addition"}}})
ensure_ray(spec)
context = ray.get_runtime_context()
print("RESULT", json.dumps({"cpus": ray.cluster_resources().get("CPU"), "gcs": context.gcs_address,
                            "grpc": grpc_answers(context.gcs_address) if sys.argv[2] == "probe" else None}))
ray.shutdown()
"""


def connect(tmp_path: Path, probe: str = "no", **env: str) -> dict:
    # The probe's driver gets no RAY_AUTH_MODE (the test session sets it): start_ray must ask for tokens itself.
    dropped = ("RAY_ADDRESS", "RAY_AUTH_MODE") if probe == "probe" else ("RAY_ADDRESS",)
    environment = {k: v for k, v in os.environ.items() if k not in dropped}
    done = subprocess.run([sys.executable, "-c", CONNECT, str(tmp_path), probe], cwd=REPO, env={**environment, **env},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    # Ray's start-up line names the dashboard's URL when it started one.
    url = re.search(r"View the dashboard at \S*?(http://[\d.]+):", done.stderr)
    return {**json.loads(line.removeprefix("RESULT ")), "dashboard": url[1] if url else None}


def test_no_address_starts_a_private_instance_despite_a_stale_bootstrap_file(tmp_path, ray_cluster):
    import ray

    # Ray's temp dir (RAY_TMPDIR) holds the bootstrap file a plain ray.init() would follow: name the test
    # session's cluster in it, as a `ray start` on this machine would.
    # A short path: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="ray-"))
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text(ray.get_runtime_context().gcs_address + "\n")
        result = connect(tmp_path, "probe", RAY_TMPDIR=str(temp))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert result["cpus"] == 3.0, result  # its own instance, sized by the file (the session's has 4)
    assert result["gcs"] != ray.get_runtime_context().gcs_address
    assert result["dashboard"] == "http://127.0.0.1", result  # on the loopback only (Ray Train's State API)
    # The gRPC ports, which Ray cannot bind to the loopback, refuse a caller without the instance's token.
    grpc_answers = result["grpc"]
    assert not any(a.startswith("127.") for a in grpc_answers["addresses"]), grpc_answers  # the node's address
    assert grpc_answers["gcs_no_token"] == grpc_answers["raylet_no_token"] == "UNAUTHENTICATED", grpc_answers
    assert grpc_answers["gcs_token"] == grpc_answers["raylet_token"] == "OK", grpc_answers


def test_ray_address_joins_that_cluster_without_sizing_it(tmp_path, ray_cluster):
    import ray

    session = ray.get_runtime_context().gcs_address
    result = connect(tmp_path, RAY_ADDRESS=session)
    assert result["gcs"] == session and result["cpus"] == 4.0, result
