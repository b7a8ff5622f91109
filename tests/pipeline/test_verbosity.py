"""Quiet by default: library progress bars and notices are off unless ``-v``; rayalign's own lines stay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.cli import build_parser
from pipeline.cluster import QUIET_ENV

# What a stage's worker does on start: load a model and save one (transformers' two progress bars).
LOAD_AND_SAVE = """
import sys
from pipeline.cluster import set_verbosity
set_verbosity(sys.argv[1] == "verbose")
from stages.log import configure
configure()  # as every worker does first
import bitsandbytes  # warns on import, here, that an optional CPU kernel package is missing
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[2]).save_pretrained(sys.argv[3])
from stages.log import stage_log
stage_log("sft", "step 1/1 loss 0.5")
from stages.log import progress
stage_log("sft", f"step {progress(3, 8)}")
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_progress_bars_only_when_verbose(mode, tiny_base, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    result = subprocess.run([sys.executable, "-c", LOAD_AND_SAVE, mode, str(tiny_base), str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bars = [text for text in ("Loading weights", "Writing model shards") if text in result.stderr]
    assert bars == ([] if mode == "quiet" else ["Loading weights", "Writing model shards"]), result.stderr[-2000:]
    assert "[rayalign] sft: step 1/1 loss 0.5" in result.stderr
    assert "[rayalign] sft: step 3/8 [########------------] 38%" in result.stderr
    from bitsandbytes.functional import has_avx512bf16

    # bitsandbytes warns about its missing optional kernel only on CPUs with AVX512-BF16.
    warns = mode == "verbose" and has_avx512bf16()
    assert ("gemm_4bit_forward" in result.stderr) == warns, result.stderr[-2000:]


def test_verbose_flag_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["run", "x.yaml"]).verbose is False
    assert parser.parse_args(["-v", "run", "x.yaml"]).verbose is True
    assert parser.parse_args(["run", "x.yaml", "--verbose"]).verbose is True
