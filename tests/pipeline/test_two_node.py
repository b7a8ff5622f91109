"""rayalign on a separately started two-node Ray cluster (``ray start --head`` + ``ray start --address``,
tests/ray_nodes.py), as a team that runs its own Ray would use it:

* a driver joins it through ``RAY_ADDRESS`` or ``ray.address`` (never starting its own instance), and
  ``ray://`` is refused with the way that works;
* ``rayalign submit --only`` runs four stages of the shrunk tiny pipeline (base, sft, grpo, eval) as a Ray
  job, its SFT stage on 2 Ray Train workers
  placed STRICT_SPREAD, so one on each node; the job's driver runs on the interpreter the head's Ray
  runs on, found by ``submit`` (``python`` on the nodes' PATH lacks the stack);
* the artifacts and the report exist, and their fingerprints equal those ``rayalign plan`` computes here;
* ``rayalign jobs list|status|logs|stop``, a stable submission id (a running pipeline is not submitted
  twice, a finished one is recognised), a failed job's exit code and log tail, an unreachable address.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.helpers import TEST_SECRET
from tests.ray_nodes import alive_nodes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
# configs/tiny.yaml with every stage shrunk to a step or two (the pipeline's shape is what is tested here;
# learning is tests/e2e's). SFT keeps its 2 workers, one per node.
SHRUNK = [
    "base.pretrain_steps=0", "tracking.backend=none",
    "stages.sft.train.max_steps=2", "stages.sft.data.limit=128", "stages.sft.train.save_steps=null",
    "stages.sft.scaling.placement_strategy=STRICT_SPREAD",
    "stages.reward.train.max_steps=2", "stages.reward.scaling.num_workers=1", "stages.reward.gate=[]",
    "stages.dpo.train.max_steps=2", "stages.dpo.data.limit=64", "stages.dpo.scaling.num_workers=1",
    *(f"stages.{s}.{key}" for s in ("ppo", "grpo") for key in (
        "train.max_steps=1", "rollout.prompts_per_step=8", "rollout.n=2", "rollout.engine=hf", "eval_limit=8")),
    # Two of the five models (each model's eval starts its own actor, ~10 s here).
    "stages.eval.models=[sft,grpo]",
    "stages.eval.max_prompts=8", "stages.eval.generation.kl_prompts=4", "stages.eval.generation.num_samples=1",
    "stages.eval.sft_data.limit=8", "stages.eval.preference_data.limit=8",
]
# The submitted job runs four of the seven stages (`submit --only`): reward, dpo and ppo would add three Ray
# Train jobs of fixed cost; the whole DAG runs in tests/e2e. Without the reward stage, eval scores no rewards.
NODES = ("base", "sft", "grpo", "eval")
ONLY = ["--only", ",".join(NODES)]

JOIN = """
import json, sys
import ray
from pipeline.cluster import ensure_ray
from pipeline.spec import parse_spec

ray_section = json.loads(sys.argv[2])
spec = parse_spec({"name": "join", "storage": sys.argv[1], "ray": ray_section,
                   "stages": {"sft": {"data": "builtin:addition"}}})
ensure_ray(spec)
nodes = [n for n in ray.nodes() if n["Alive"]]
print("RESULT", json.dumps({"gcs": ray.get_runtime_context().gcs_address, "cpus": ray.cluster_resources()["CPU"],
                            "nodes": len(nodes)}))
ray.shutdown()
"""


def join(tmp_path: Path, ray_section: dict, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-c", JOIN, str(tmp_path), json.dumps(ray_section)], cwd=REPO,
                          env={**environment, **env}, capture_output=True, text=True, timeout=180)


def result(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_a_driver_joins_through_ray_address_or_the_config_and_refuses_ray_client(two_node_cluster, tmp_path):
    head_port = two_node_cluster.gcs_address.rsplit(":", 1)[1]
    # num_cpus in the file sizes a private instance only; joining, it is not passed (Ray would refuse it).
    by_env = result(join(tmp_path, {"num_cpus": 3}, RAY_ADDRESS=two_node_cluster.gcs_address))
    by_config = result(join(tmp_path, {"num_cpus": 3, "address": two_node_cluster.gcs_address}))
    for joined in (by_env, by_config):
        assert joined["gcs"].endswith(f":{head_port}") and joined["nodes"] == 2 and joined["cpus"] == 4.0, joined

    refused = join(tmp_path, {}, RAY_ADDRESS=two_node_cluster.client_address)
    assert refused.returncode != 0
    assert (f"RAY_ADDRESS={two_node_cluster.client_address}: Ray Client (ray://) is not supported; submit the "
            f"pipeline as a Ray job instead (rayalign submit CONFIG --address http://HEAD:8265)") in refused.stderr


def test_unreachable_job_server_is_one_line(capsys):
    assert main(["jobs", "list", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rayalign: error: cannot reach the Ray job server at "
                                                   "http://127.0.0.1:9: nothing answers there"), err


def test_submit_the_tiny_pipeline_across_two_nodes(two_node_cluster, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    address = two_node_cluster.dashboard
    client = JobSubmissionClient(address)
    store = tmp_path / "store"
    overrides = [*SHRUNK, f"storage={store}"]
    sets = [arg for override in [*overrides, "stages.eval.reward=null"] for arg in ("--set", override)]
    secret_name, secret = TEST_SECRET  # in the nodes' environment (tests/conftest.py), passed by name

    # --no-wait, then the same pipeline again while it runs: refused, naming the running job.
    assert main(["submit", str(TINY), "--address", address, "--no-wait", "--env", secret_name, *sets, *ONLY]) == 0
    job_id = re.search(r"submitted (rayalign-tiny-[0-9a-f]{12}) to ", capsys.readouterr().out)[1]
    assert main(["submit", str(TINY), "--address", address, "--env", secret_name, *sets, *ONLY]) == 2
    assert f"rayalign: error: {job_id} (this pipeline, with these overrides) is already " in capsys.readouterr().err

    # Follow it to the end with `rayalign jobs logs -f`.
    started = time.monotonic()
    assert main(["jobs", "logs", job_id, "--follow", "--address", address]) == 0
    logs = capsys.readouterr().out
    seconds = time.monotonic() - started
    assert main(["jobs", "status", job_id, "--address", address]) == 0, logs[-3000:]
    status = capsys.readouterr().out
    assert status.startswith(f"{job_id}: SUCCEEDED") and "pipeline: tiny" in status, status
    # Its driver ran on the head's own interpreter, found by submit: `python` on the nodes' PATH lacks torch.
    entrypoint = client.get_job_info(job_id).entrypoint
    assert Path(entrypoint.split()[0]).parent == Path(sys.executable).parent, entrypoint
    assert "Connecting to existing Ray cluster at address: " in logs and "tiny: 4 node(s) ready" in logs, logs[-3000:]
    print(f"\ntwo-node submit of the shrunk tiny pipeline: {seconds:.0f}s")

    # Every node is stored and complete; SFT's two workers ran on the two nodes.
    manifests = {node: json.loads(next((store / "tiny" / node).glob("*/manifest.json")).read_text()) for node in NODES}
    assert all(m["status"] == "complete" for m in manifests.values())
    workers = manifests["sft"]["worker_nodes"]
    alive = {n["raylet"]["nodeId"] for n in alive_nodes(two_node_cluster)}
    assert len(workers) == 2 and set(workers) == alive, (workers, alive)
    assert (store / "tiny" / "report" / "index.html").is_file()

    # `rayalign plan` here computes the same fingerprints, and finds every stage the job ran cached.
    assert main(["plan", str(TINY), *sets]) == 0
    plan = capsys.readouterr().out
    for node, manifest in manifests.items():
        assert re.search(rf"^  {node}\s+\S+\s+{manifest['fingerprint']}\s+cached ", plan, re.M), (node, plan)

    # The same pipeline again: recognised as done, not submitted; listed with its status.
    assert main(["submit", str(TINY), "--address", address, "--env", secret_name, *sets, *ONLY]) == 0
    assert f"{job_id} already SUCCEEDED on {address}; not submitted again" in capsys.readouterr().out
    assert main(["jobs", "list", "--address", address]) == 0
    assert re.search(rf"^{job_id}\s+SUCCEEDED\s+", capsys.readouterr().out, re.M)

    # The secret went by reference: not in the job record, its logs, the store or the report.
    record = client.get_job_info(job_id)
    assert record.runtime_env["env_vars"][secret_name] == f"${{{secret_name}}}"
    written = [json.dumps(record.runtime_env), str(record.entrypoint), client.get_job_logs(job_id), logs]
    written += [p.read_text(errors="replace") for p in store.rglob("*") if p.is_file() and p.suffix in
                (".json", ".jsonl", ".html", ".md", ".txt", ".yaml", ".log")]
    assert not [text[:200] for text in written if secret in text], "the secret's value leaked"


def test_stop_a_job_and_a_failed_job_exits_with_its_log_tail(two_node_cluster, tmp_path, capsys):
    address = two_node_cluster.dashboard
    sets = [arg for override in [*SHRUNK, f"storage={tmp_path / 'store'}"] for arg in ("--set", override)]

    # A job on `python` from the nodes' PATH (no torch there): FAILED, exit 1, the log's tail and a hint.
    assert main(["submit", str(TINY), "--address", address, "--python", "python3", *sets]) == 1
    captured = capsys.readouterr()
    failed = re.search(r"submitted (rayalign-tiny-[0-9a-f]{12}) to ", captured.out)[1]
    assert f"rayalign: job {failed} FAILED" in captured.err, captured.err[-2000:]
    assert "the last " in captured.err and "No module named" in captured.err
    assert "hint: the job ran `python3`, which lacks the stack; pass --python" in captured.err
    assert main(["jobs", "status", failed, "--address", address]) == 1
    # Submitted again, a failed pipeline runs again under its id.
    assert main(["submit", str(TINY), "--address", address, "--python", "python3", "--no-wait", *sets]) == 0
    assert f"resubmitting {failed} (the earlier run FAILED)" in capsys.readouterr().out

    # Stop: a pipeline (another id: other overrides) stopped while it runs.
    assert main(["submit", str(TINY), "--address", address, "--no-wait", *sets,
                 "--set", "stages.sft.train.lr=1e-4"]) == 0
    running = re.search(r"submitted (rayalign-tiny-[0-9a-f]{12}) to ", capsys.readouterr().out)[1]
    assert running != failed
    assert main(["jobs", "stop", running, "--address", address]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{running}: STOPPED")
    assert main(["jobs", "logs", "rayalign-tiny-000000000000", "--address", address]) == 2
    assert "no job 'rayalign-tiny-000000000000' on this cluster" in capsys.readouterr().err
