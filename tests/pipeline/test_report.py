"""The run report, looked at as a person would: rendered in headless Chromium from disk.

The "small finished run" is real: the tiny base, a 2-step LoRA SFT on Ray Train and an eval of
[base, sft] through Ray Data. Only the reward model is hand-made (a sequence-classification head on
the tiny base, committed to the store at the reward stage's fingerprint) to spare a second Ray Train
job, and the SFT artifact is dressed as a sweep's output by hand. Set RAYALIGN_REPORT_SCREENSHOT=path.png
to keep the screenshot.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import make_spec, quick_sft

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Debian ``chromium`` binary; installed with apt-get when missing and we are root."""
    path = shutil.which("chromium")
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        try:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "install", "-y", "chromium"], check=False, capture_output=True, timeout=900,
                           env=env)
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("headless Chromium is not available: `chromium` is not on PATH and `apt-get install -y chromium` "
                    "was not possible (not root, no apt-get, or no package source)")
    return path


def render(chromium: str, page, profile, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def _spec_raw(tmp_path, base) -> dict:
    return {"name": "tiny-report", "storage": str(tmp_path / "runs"), "base": {"model": str(base)}, "stages": {
        "sft": quick_sft(train={"max_steps": 2, "logging_steps": 1}),
        "reward": {"kind": "reward", "from": "sft", "data": {"path": "builtin:addition", "limit": 64}},
        "eval": {"kind": "eval", "models": ["base", "sft"], "reward": "reward", "tasks": ["addition"],
                 "sft_data": {"path": "builtin:addition/test", "limit": 8},
                 "preference_data": {"path": "builtin:addition/test", "limit": 8}, "max_prompts": 12,
                 "generation": {"engine": "hf", "max_new_tokens": 6, "num_samples": 2, "kl_prompts": 3}},
    }}


def commit_hand_made_reward(spec, base) -> None:
    """A reward artifact in the store at the planned fingerprint: a real sequence classifier (random head)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.runner import plan
    from pipeline.store import ArtifactStore, now

    the_plan = plan(spec)
    fp = the_plan.fingerprints["reward"]
    store = ArtifactStore(spec.run_root())
    partial = store.start_attempt("reward", fp)
    folder = partial / "model"
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    store.commit("reward", fp, {
        "stage": "reward", "kind": "reward", "fingerprint": fp, "inputs": {"sft": the_plan.fingerprints["sft"]},
        "started": now(), "seconds": 1.5, "model_type": "full",
        "metrics": {"heldout_accuracy": 0.625, "heldout_pairs": 8, "heldout_margin": 0.25,
                    "heldout_accuracy/carry": 0.75},
        "curves": {"loss": [{"step": s, "value": 0.7 - 0.05 * s} for s in range(1, 6)]},
    }, partial)


def write_sweep(sft) -> None:
    """The sft artifact dressed as a sweep's output: a trial table in its manifest, sweep.png beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.store import write_json

    trials = [{"trial": f"t{i}", "overrides": {"train.lr": lr}, "status": status, "value": v, "fingerprint": f"fp{i}",
               "curve": [{"step": 1, "value": v + 0.5}, {"step": 2, "value": v}]}
              for i, (lr, v, status) in enumerate([(1e-3, 2.1, "stopped"), (3e-3, 1.7, "ok")])]
    results = {"metric": "final_loss", "mode": "min", "search": "grid", "seed": 0, "scheduler": {"name": "asha"},
               "trials": trials, "stopped_early": 1,
               "best": {"trial": "t1", "overrides": {"train.lr": 3e-3}, "value": 1.7, "fingerprint": "fp1"}}
    write_json(sft.path / "manifest.json", {**sft.manifest, "sweep": results})
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1e-3, 3e-3], [2.1, 1.7], marker="o")
    fig.savefig(sft.path / "sweep.png")
    plt.close(fig)


@pytest.fixture(scope="module")
def finished_run(ray_cluster, tiny_base, tmp_path_factory):
    """A real tiny run (2-step SFT + eval) whose store the report reads; its YAML file for the CLI."""
    from pipeline.runner import run_pipeline

    tmp_path = tmp_path_factory.mktemp("report-run")
    raw = _spec_raw(tmp_path, tiny_base)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    spec = make_spec(tmp_path / "runs", tiny_base, raw["stages"], name=raw["name"])
    commit_hand_made_reward(spec, tiny_base)
    artifacts = run_pipeline(spec)
    write_sweep(artifacts["sft"])
    return spec, config, artifacts


@pytest.mark.slow
def test_report_renders_in_chromium(finished_run, chromium, tmp_path):
    from pipeline.cli import main

    spec, config, artifacts = finished_run
    assert main(["report", str(config)]) == 0  # `rayalign report CONFIG`: from the store, no training
    index = spec.run_root() / "report" / "index.html"
    assert index.exists() and (spec.run_root() / "report" / "report.md").exists()

    done = render(chromium, index, tmp_path / "profile", "--dump-dom")
    dom = done.stdout
    assert done.returncode == 0 and "<body" in dom, done.stderr[-2000:]
    status = json.loads(html.unescape(re.search(r'<pre id="image-status">(.*?)</pre>', dom, re.S).group(1)))
    alts = {s["alt"] for s in status}
    assert {"dag", "eval-accuracy-addition", "eval-win-rate", "curves-sft", "curves-reward", "sweep-sft"} <= alts
    assert all(s["loaded"] and s["width"] > 0 for s in status), status  # naturalWidth > 0 for every <img>
    assert 'data-images="ok"' in dom

    # The metrics table holds the manifest's numbers (unrounded in data-value, rounded in the text).
    metrics = artifacts["eval"].metrics
    cells = {(m, k): (float(v), text) for m, k, v, text in re.findall(
        r"data-model=\"([^\"]+)\" data-metric=\"([^\"]+)\" data-value=\"([^\"]+)\"><span class=\"value\">([^<]*)<", dom)}
    expected = {
        ("base", "tasks.addition"): metrics["base"]["tasks"]["addition"]["accuracy"],
        ("sft", "tasks.addition"): metrics["sft"]["tasks"]["addition"]["accuracy"],
        ("sft", "win_rate"): metrics["sft"]["win_rate"]["win_rate"],
        ("base", "kl"): metrics["base"]["kl"]["kl"],
        ("sft", "kl"): metrics["sft"]["kl"]["kl"],
        ("sft", "perplexity"): metrics["sft"]["perplexity"]["perplexity"],
        ("sft", "reward"): metrics["sft"]["reward"]["mean"],
        ("sft", "preference"): metrics["sft"]["preference"]["accuracy"],
    }
    for key, value in expected.items():
        assert cells[key][0] == value, key
        assert cells[key][1] == f"{value:.3f}", key
    # the reference (sft: the first sft stage among the models) against itself
    assert cells[("sft", "win_rate")][0] == 0.5 and cells[("sft", "kl")][0] == 0.0
    # every stage with its status and fingerprint
    for node in ("base", "sft", "reward", "eval"):
        row = re.search(rf"<tr data-stage=\"{node}\">(.*?)</tr>", dom, re.S).group(1)
        assert artifacts[node].fingerprint in row and ("complete" in row or "external" in row)
    # sample responses for the same prompts
    assert dom.count("<tr><td><pre>") >= 5
    # the reward model's held-out pairwise accuracy with its interval, and per category
    reward_cells = re.findall(r'<td data-reward-model="reward">([^<]*)</td>', dom)
    assert reward_cells == ["reward", "8", "0.625 [0.31, 0.86]", "0.750", "0.250"], reward_cells

    shot = tmp_path / "report.png"
    done = render(chromium, index, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400")
    assert shot.exists() and shot.read_bytes()[:4] == b"\x89PNG", done.stderr[-2000:]
    if os.environ.get("RAYALIGN_REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["RAYALIGN_REPORT_SCREENSHOT"])


def test_report_of_a_run_that_has_not_started(tmp_path):
    """Only the store is read: a pipeline with nothing run lists every stage as pending."""
    from pipeline.report import build_report

    spec = make_spec(tmp_path, "builtin:tiny-llama", {"sft": quick_sft(), "eval": {
        "kind": "eval", "models": ["base", "sft"], "tasks": ["addition"]}})
    index = build_report(spec)
    text = index.read_text()
    for node in ("base", "sft", "eval"):
        row = re.search(rf"<tr data-stage='{node}'>(.*?)</tr>", text, re.S).group(1)
        assert ">pending<" in row
    assert "Evaluation" not in text and "| eval | eval | models[0]=base, models[1]=sft | pending |" in (
        index.parent / "report.md").read_text()


def test_reward_models_table():
    from pipeline.report import Node, reward_section
    from stages.evaluate.metrics import wilson_interval

    def node(name, metrics):
        return Node(name, "reward", {"from": "sft"}, "f", "complete", manifest={"metrics": metrics})

    section = reward_section([
        node("rm_a", {"heldout_accuracy": 0.716, "heldout_pairs": 500, "heldout_margin": 0.408,
                      "heldout_accuracy/carry": 1.0, "heldout_accuracy/no_carry": 0.484}),
        node("rm_b", {"heldout_accuracy": 0.5, "heldout_pairs": 12, "heldout_margin": -0.01}),
        node("rm_untrained", {}),
    ])
    low, high = wilson_interval(358, 500)
    assert section["markdown"][:4] == [
        "| reward model | held-out pairs | pairwise accuracy | accuracy: carry | accuracy: no_carry | mean margin |",
        "|---|---|---|---|---|---|",
        f"| rm_a | 500 | 0.716 [{low:.2f}, {high:.2f}] | 1.000 | 0.484 | 0.408 |",
        "| rm_b | 12 | 0.500 [0.25, 0.75] | – | – | -0.010 |",
    ]
    assert reward_section([node("rm", {})]) is None


def test_reward_against_kl_curves_are_found_and_drawn():
    from pipeline.report_figures import plot_reward_kl, reward_kl_curves

    curve = [{"step": s, "value": 0.1 * s} for s in range(1, 8)]
    assert reward_kl_curves({"reward_mean": curve, "kl": curve, "kl_coef": curve}) == ("reward_mean", "kl")
    assert reward_kl_curves({"rewards/chosen": curve, "objective/kl": curve}) == ("rewards/chosen", "objective/kl")
    assert reward_kl_curves({"loss": curve, "kl_coef": curve, "reward_mean": curve}) is None
    assert plot_reward_kl("ppo", {"reward_mean": curve, "kl": curve}, "reward_mean", "kl")[:4] == b"\x89PNG"
