"""Fingerprints that see what matters, and ``rayalign plan`` saying why a stage is stale (no training:
artifacts are committed by hand at the planned fingerprints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.content_hash import CACHE_ENV
from pipeline.runner import RunError, fingerprint_parts, plan, run_pipeline
from pipeline.store import ArtifactStore
from tests.helpers import make_spec, quick_sft
from tests.pipeline.test_store import write_model


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "sha256.json"))


@pytest.fixture
def setup(tmp_path):
    base = tmp_path / "base"
    write_model(base)
    data = tmp_path / "train.jsonl"
    held_out = tmp_path / "held_out.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    held_out.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n")
    stages = {"sft_a": quick_sft(data={"path": str(data), "eval_path": str(held_out)}),
              "sft_b": quick_sft(**{"from": "sft_a"})}
    return tmp_path, base, data, held_out, stages


def commit_everything(spec) -> dict[str, str]:
    """A complete artifact at every planned fingerprint, manifest as the runner writes it."""
    the_plan = plan(spec)
    store = ArtifactStore(spec.run_root())
    for node in spec.stages:
        fp = the_plan.fingerprints[node]
        upstream = {role: the_plan.fingerprints[p] for role, p in the_plan.dag.parents[node].items()}
        partial = store.start_attempt(node, fp)
        write_model(partial / "model")
        store.commit(node, fp, {"stage": node, "fingerprint": fp, "model_type": "full",
                                "fingerprint_parts": fingerprint_parts(spec, node, upstream)}, partial)
    return the_plan.fingerprints


def test_plan_says_why_each_stale_stage_is_stale(setup, monkeypatch, capsys):
    tmp_path, base, data, held_out, stages = setup
    spec = make_spec(tmp_path, base, stages)
    assert plan(spec).why_stale == {"sft_a": ["never run"], "sft_b": ["never run"]}
    commit_everything(spec)
    assert plan(spec).why_stale == {}

    stages["sft_a"]["train"]["lr"] = 1.0e-3
    reasons = plan(make_spec(tmp_path, base, stages)).why_stale
    assert reasons["sft_a"] == ["config: train.lr 0.003 -> 0.001"]
    assert reasons["sft_b"][0].startswith("upstream: from is now ")
    stages["sft_a"]["train"]["lr"] = 3.0e-3

    held_out.write_text(json.dumps({"prompt": "2+2=", "completion": "5"}) + "\n")  # the held-out file's content
    assert plan(make_spec(tmp_path, base, stages)).why_stale["sft_a"] == [
        "data: the content of data.eval_path changed"]

    write_model(base, 2.0)  # the base folder retrained in place: same names and sizes
    assert "upstream: from is now" in plan(make_spec(tmp_path, base, stages)).why_stale["sft_a"][0]
    write_model(base, 1.0)

    import pipeline.stage_run as stage_run

    monkeypatch.setattr(stage_run, "code_fingerprint", lambda: "edited")
    assert plan(make_spec(tmp_path, base, stages)).why_stale["sft_b"][-1] == \
        "code: the stages/ sources changed since it ran"

    config = tmp_path / "pipeline.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"name": "t", "storage": str(tmp_path), "base": {"model": str(base)},
                                      "stages": stages}))
    assert main(["plan", str(config)]) == 0
    assert "      stale: data: the content of data.eval_path changed" in capsys.readouterr().out


def test_only_with_a_stale_upstream_is_an_error_listing_the_candidates(setup):
    tmp_path, base, data, held_out, stages = setup
    old = commit_everything(make_spec(tmp_path, base, stages))
    stages["sft_a"]["train"]["lr"] = 1.0e-3
    with pytest.raises(RunError, match=rf"'sft_a' is needed upstream, .*Stored: {old['sft_a']} \(finished .*"
                                       r"--allow-stale-upstream"):
        run_pipeline(make_spec(tmp_path, base, stages), only=["sft_b"])
    # Opted in, the newest stored sft_a is used, and sft_b built on it is a cache hit (nothing trains).
    artifacts = run_pipeline(make_spec(tmp_path, base, stages), only=["sft_b"], allow_stale_upstream=True)
    assert artifacts["sft_a"].fingerprint == old["sft_a"] and artifacts["sft_b"].fingerprint == old["sft_b"]


RESOLVE_BASE = """
import json, sys
from pipeline.runner import run_pipeline
from pipeline.spec import parse_spec
from tests.helpers import quick_sft

spec = parse_spec({"name": "t", "storage": sys.argv[1], "base": {"model": "org/tiny", "revision": sys.argv[2]},
                   "stages": {"sft": quick_sft()}})
base = run_pipeline(spec, only=["base"])["base"]
print(json.dumps({"model_dir": str(base.model_dir), "fingerprint": base.fingerprint}))
"""


def test_base_revision_picks_the_snapshot_every_stage_loads(tiny_base, tmp_path):
    """A real (offline) hub cache holding two revisions of one repo: each revision resolves to its own
    snapshot folder, and the base node's model_dir (what every stage loads) is that folder."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--org--tiny"
    commits = {"v1": "1" * 40, "v2": "2" * 40}
    for tag, commit in commits.items():
        shutil.copytree(tiny_base, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / tag).write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    seen = {}
    for tag in commits:
        done = subprocess.run([sys.executable, "-c", RESOLVE_BASE, str(tmp_path / "store"), tag], env=env,
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
        assert done.returncode == 0, done.stderr[-2000:]
        seen[tag] = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["v1"]["model_dir"] == str(repo / "snapshots" / commits["v1"])
    assert seen["v2"]["model_dir"] == str(repo / "snapshots" / commits["v2"])
    assert seen["v1"]["fingerprint"] != seen["v2"]["fingerprint"]

    missing = subprocess.run([sys.executable, "-c", RESOLVE_BASE, str(tmp_path / "store"), "v3"], env=env,
                             capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert "base.model 'org/tiny' at base.revision 'v3' cannot be loaded" in missing.stderr
