"""Guards on the test suite itself: where a component's suite is meant to run, a broken component fails it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, REQUIRE_VLLM


def test_required_engine_suite_errors_instead_of_skipping():
    """With RAYALIGN_REQUIRE_VLLM=1 (`make test-vllm`, so CI), an unimportable vLLM ends pytest with an error
    naming the cause; without it, the same tests skip with a reason."""
    from stages.rollout import vllm_status

    if vllm_status()[0]:
        pytest.skip("vllm imports in this environment: the guard has nothing to catch here")
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "vllm",
               "tests/stages/rollout/test_rollout.py", "-k", "agree_greedy"]
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_VLLM}
    skipped = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout[-2000:]
    required = subprocess.run(command, cwd=REPO, env={**env, REQUIRE_VLLM: "1"}, capture_output=True, text=True,
                              timeout=300)
    output = required.stdout + required.stderr
    assert required.returncode == 3, output[-2000:]
    assert "RAYALIGN_REQUIRE_VLLM=1 but vLLM is not usable" in output and "import vllm failed" in output, output[-2000:]
    assert "skipped" not in required.stdout
