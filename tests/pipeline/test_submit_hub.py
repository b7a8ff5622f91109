"""`rayalign submit` keeps the hub offline unless the file (kubernetes.hub_offline: false) or --env says otherwise."""

from pathlib import Path

from pipeline.submit import build_job, job_env

REPO = Path(__file__).resolve().parents[2]


def test_hub_downloads_follow_the_file_or_an_explicit_env():
    assert job_env([])["HF_HUB_OFFLINE"] == "1"
    assert job_env([], hub_offline=False)["HF_HUB_OFFLINE"] == "0"
    assert job_env(["HF_HUB_OFFLINE=0"])["HF_HUB_OFFLINE"] == "0"
    assert job_env(["HF_HUB_OFFLINE=1"], hub_offline=False)["HF_HUB_OFFLINE"] == "1"  # --env wins
    assert build_job(REPO / "configs" / "tiny.yaml")["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    gpu = build_job(REPO / "configs" / "gpu-8b-qlora.yaml")  # kubernetes.hub_offline: false
    assert gpu["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "0"
