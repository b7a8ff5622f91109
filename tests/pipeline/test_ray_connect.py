"""How a driver finds Ray (``pipeline.cluster.start_ray``), each in a fresh process of its own.

* no address and no ``RAY_ADDRESS``: a new private instance with the file's ``num_cpus`` and its
  dashboard on 127.0.0.1 only, even where a bootstrap file names another cluster (``ray start``
  leaves one behind);
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

CONNECT = """
import json, sys
import ray
from pipeline.cluster import ensure_ray
from pipeline.spec import parse_spec

spec = parse_spec({"name": "connect", "storage": sys.argv[1], "ray": {"num_cpus": 3},
                   "stages": {"sft": {"data": "builtin:addition"}}})
ensure_ray(spec)
context = ray.get_runtime_context()
print("RESULT", json.dumps({"cpus": ray.cluster_resources().get("CPU"), "gcs": context.gcs_address}))
ray.shutdown()
"""


def connect(tmp_path: Path, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", CONNECT, str(tmp_path)], cwd=REPO, env={**environment, **env},
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
        result = connect(tmp_path, RAY_TMPDIR=str(temp))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert result["cpus"] == 3.0, result  # its own instance, sized by the file (the session's has 4)
    assert result["gcs"] != ray.get_runtime_context().gcs_address
    assert result["dashboard"] == "http://127.0.0.1", result  # on the loopback only (Ray Train's State API)


def test_ray_address_joins_that_cluster_without_sizing_it(tmp_path, ray_cluster):
    import ray

    session = ray.get_runtime_context().gcs_address
    result = connect(tmp_path, RAY_ADDRESS=session)
    assert result["gcs"] == session and result["cpus"] == 4.0, result
