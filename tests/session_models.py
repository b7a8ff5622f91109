"""The in-process models many slow tests start from (tests/addition_models.py): the addition task's SFT
policy and the reward model PPO optimises. Each is kept in TEST_CACHE under a key of everything that
makes it (the code, torch's version, the recipe), so `make test`'s second session (vLLM) reuses them.

A session that needs them and finds none starts ``python -m tests.session_models`` in the background as
soon as collection ends (tests/conftest.py). Meanwhile the fast tests, which run first and leave one of
the two cores idle, go on; the fixtures wait for it and train in-process only if it failed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = Path(os.environ.get("RAYALIGN_TEST_CACHE", REPO / ".cache" / "tests"))
BASE_PRETRAIN_STEPS, BASE_SEED = 30, 0  # the session's tiny base (tests/conftest.py: tiny_base)
# The learned reward model PPO optimises (tests/stages/ppo/test_ppo.py): steps and lr.
RM_STEPS, RM_LR = 600, 5e-4

_background: subprocess.Popen | None = None


def _recipe_key(*parts: object) -> str:
    import torch

    from stages import tiny_base
    from tests import addition_models

    code = "".join(Path(m.__file__).read_text() for m in (addition_models, tiny_base))
    return hashlib.sha256("|".join(map(str, (code, torch.__version__, BASE_PRETRAIN_STEPS, BASE_SEED, *parts)))
                          .encode()).hexdigest()[:16]


def sft_path() -> Path:
    from tests.addition_models import SFT_BATCH, SFT_STEPS

    return TEST_CACHE / f"addition-sft-{_recipe_key(SFT_STEPS, SFT_BATCH)}" / "model"


def reward_model_path() -> Path:
    from tests.addition_models import SFT_BATCH, SFT_STEPS

    return TEST_CACHE / f"addition-rm-{_recipe_key(SFT_STEPS, SFT_BATCH, RM_STEPS, RM_LR)}" / "model"


def missing() -> bool:
    return not all((p / "config.json").is_file() for p in (sft_path(), reward_model_path()))


def _keep(cached: Path, train: Callable[[Path], Path]) -> Path:
    """``train(folder)`` into a staging folder, renamed into place (atomic: another session sees all of
    it or nothing; if another got there first, its copy is kept)."""
    if (cached / "config.json").is_file():
        return cached
    staging = cached.parent.with_name(f".{cached.parent.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    train(staging / "model")
    try:
        staging.rename(cached.parent)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return cached


def build_sft(base: Path) -> Path:
    from tests.addition_models import SFT_BATCH, SFT_STEPS, train_sft_in_process

    wait_for(sft_path())
    return _keep(sft_path(), lambda out: train_sft_in_process(base, out, SFT_STEPS, SFT_BATCH))


def build_reward_model(sft: Path) -> Path:
    from tests.addition_models import train_reward_model_in_process

    wait_for(reward_model_path())
    return _keep(reward_model_path(), lambda out: train_reward_model_in_process(sft, out, steps=RM_STEPS, lr=RM_LR))


def start_in_background() -> None:
    global _background
    if _background is None and missing():
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        log = TEST_CACHE / "background-build.log"
        with log.open("w") as out:
            _background = subprocess.Popen([sys.executable, "-m", "tests.session_models"], cwd=REPO,
                                           stdout=out, stderr=subprocess.STDOUT)


def wait_for(cached: Path) -> None:
    """Waits until the background build has put ``cached`` in place or ended; a failed build is reported
    (the caller then trains in-process)."""
    import time

    global _background
    while _background is not None and not (cached / "config.json").is_file():
        code = _background.poll()
        if code is None:
            time.sleep(1)
            continue
        _background = None
        if code != 0:
            log = TEST_CACHE / "background-build.log"
            print(f"the background build of the session's models failed (exit {code}); training in-process. "
                  f"Its log: {log}\n{log.read_text()[-2000:]}", file=sys.stderr)


def stop_background() -> None:
    """At the session's end: a build still running (the tests that needed it failed or were cut short) is
    stopped; what it left half-written is a staging folder, never a cache entry."""
    global _background
    if _background is not None and _background.poll() is None:
        _background.kill()
        _background.wait()
    _background = None


def main() -> None:
    import torch

    from stages.tiny_base import build_tiny_base

    # One core: the tests running meanwhile have the other (two threads here oversubscribed the machine:
    # the fast tests took 400 s instead of 200 s). The weights are the same bits as with two threads
    # (checked: equal sha256 of the SFT policy and the reward model).
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "model"
        build_tiny_base(base, pretrain_steps=BASE_PRETRAIN_STEPS, seed=BASE_SEED)
        sft = build_sft(base)
    build_reward_model(sft)


if __name__ == "__main__":
    main()
