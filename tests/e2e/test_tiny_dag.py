"""The whole shipped tiny DAG, end to end, with few steps: proves the pieces fit.

base -> sft -> reward, dpo, ppo, grpo -> eval -> report, from `configs/tiny.yaml` itself
(with `--set`-style overrides that only shrink step counts and workers).
"""

from __future__ import annotations

import json

import pytest

from pipeline.report import build_report
from pipeline.runner import run_pipeline
from pipeline.spec import load_spec
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SHRINK = [
    "base.pretrain_steps=0",
    "tracking.backend=none",
    *(f"stages.{s}.scaling.num_workers=1" for s in ("sft", "reward", "dpo")),
    "stages.sft.train.max_steps=6", "stages.sft.data={path: \"builtin:addition\", limit: 512}",
    "stages.reward.train.max_steps=2", "stages.dpo.train.max_steps=2",
    *(f"stages.{s}.train.max_steps=1" for s in ("ppo", "grpo")),
    *(f"stages.{s}.rollout.prompts_per_step=4" for s in ("ppo", "grpo")),
    *(f"stages.{s}.eval_limit=8" for s in ("ppo", "grpo")),
    "stages.eval.max_prompts=16", "stages.eval.generation.kl_prompts=4",
    "stages.eval.generation.num_samples=2", "stages.eval.generation.concurrency=1",
    "stages.eval.sft_data.limit=8", "stages.eval.preference_data.limit=8",
]


def test_the_shipped_tiny_dag_runs_end_to_end(ray_cluster, tmp_path):
    spec = load_spec(REPO / "configs" / "tiny.yaml", [*SHRINK, f"storage={tmp_path}"])
    artifacts = run_pipeline(spec)
    assert set(artifacts) == {"base", "sft", "reward", "dpo", "ppo", "grpo", "eval"}
    for node, artifact in artifacts.items():
        assert artifact.manifest["status"] == "complete", node
    for node in ("sft", "dpo", "ppo", "grpo"):
        assert (artifacts[node].model_dir / "tokenizer.json").exists(), node

    evaluation = json.loads((artifacts["eval"].path / "metrics.json").read_text())
    assert evaluation, "the eval stage wrote no metrics"
    models = artifacts["eval"].manifest["metrics"]
    assert set(models) == {"base", "sft", "dpo", "ppo", "grpo"}
    for name, metrics in models.items():
        assert "addition" in json.dumps(metrics), name

    report = build_report(spec)
    html = report.read_text()
    assert report.name == "index.html" and "<img" in html
    for node in artifacts:
        assert node in html

    # A rerun is all cache hits.
    again = run_pipeline(spec)
    assert {n: a.fingerprint for n, a in again.items()} == {n: a.fingerprint for n, a in artifacts.items()}
    assert all(again[n].manifest["started"] == artifacts[n].manifest["started"] for n in artifacts)
