"""The PPO worker's metrics tracker (``stages.ppo.tracking``): each backend whose package is installed
logs a few steps that are read back with that backend's own reader; ``stages.ppo.records.write_records``
writes through it. No Ray, no model."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from stages.job import PPOJob
from stages.ppo.tracking import NullTracker, open_tracker

# Two iterations' records as ``record`` makes them: numbers, the step, and one text entry.
RECORDS = [
    {"reward_mean": 0.25, "kl": 0.01, "entropy": 1.5, "rollout_tokens_per_s": 900.0, "sync_seconds": 0.02,
     "samples": 64, "step": 1, "sync_method": "state_dict"},
    {"reward_mean": 0.5, "kl": 0.02, "entropy": 1.25, "rollout_tokens_per_s": 1000.0, "sync_seconds": 0.03,
     "samples": 64, "step": 2, "sync_method": "state_dict"},
]


def ppo_job(tmp_path: Path, backend: str, **env: str) -> PPOJob:
    return PPOJob(stage="ppo", work_dir=str(tmp_path), model_dir=str(tmp_path / "model"), model_source=".",
                  precision="fp32", threads=1, report_to=backend, env=env, iterations=len(RECORDS),
                  critic_source=".")


def log_records(job: PPOJob, records: list[dict] = RECORDS, start_step: int = 0) -> None:
    tracker = open_tracker(job, start_step)
    for entry in records:
        tracker.log(entry, entry["step"])
    tracker.close()


def expected_curve(key: str) -> list[tuple[int, float]]:
    return [(entry["step"], float(entry[key])) for entry in RECORDS]


def assert_curve(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """Same steps, same values (TensorBoard keeps float32)."""
    assert [step for step, _ in actual] == [step for step, _ in expected]
    assert [value for _, value in actual] == pytest.approx([value for _, value in expected], rel=1e-6)


# --------------------------------------------------------------------------- tensorboard


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_numbers_under_ppo(tmp_path):
    log_records(ppo_job(tmp_path, "tensorboard", TENSORBOARD_LOGGING_DIR=str(tmp_path / "tb")))
    scalars = tensorboard_scalars(tmp_path / "tb")
    numeric = [k for k, v in RECORDS[0].items() if k != "step" and not isinstance(v, str)]
    assert sorted(scalars) == sorted(f"ppo/{k}" for k in numeric)  # no ppo/step, no ppo/sync_method
    assert_curve(scalars["ppo/reward_mean"], expected_curve("reward_mean"))


def test_tensorboard_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    """A run killed after step 2 and resumed from the step-1 checkpoint: its curve does not fork."""
    job = ppo_job(tmp_path, "tensorboard", TENSORBOARD_LOGGING_DIR=str(tmp_path / "tb"))
    log_records(job)
    log_records(job, [{**RECORDS[1], "reward_mean": 0.75}], start_step=1)
    assert_curve(tensorboard_scalars(tmp_path / "tb")["ppo/reward_mean"], [(1, 0.25), (2, 0.75)])


def test_tensorboard_without_a_log_dir_and_none_log_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert isinstance(open_tracker(ppo_job(tmp_path, "tensorboard"), 0), NullTracker)
    assert isinstance(open_tracker(ppo_job(tmp_path, "none"), 0), NullTracker)


# --------------------------------------------------------------------------- mlflow


def test_mlflow_run_holds_the_curves(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'rayalign[dev]' or 'rayalign[mlflow]')")
    from mlflow.tracking import MlflowClient

    # mlflow >= 3.7 refuses a file store unless told to; the launcher's default URI is one.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    log_records(ppo_job(tmp_path, "mlflow", MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="pipe",
                        MLFLOW_RUN_NAME="grpo"))
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("pipe").experiment_id])
    assert run.info.run_name == "grpo"
    assert "ppo/sync_method" not in run.data.metrics and "ppo/step" not in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "ppo/reward_mean")
    assert_curve([(m.step, m.value) for m in history], expected_curve("reward_mean"))


# --------------------------------------------------------------------------- wandb


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """step -> values, from an offline run's ``.wandb`` file: wandb's record protobufs in LevelDB-log framing
    (a 7-byte file header, then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = run_file.read_bytes(), 32 * 1024, 7
    pos, pending, history = header, b"", {}
    while pos + header <= len(data):
        if block - pos % block < header:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        pending += data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 4):  # full, or the last chunk of a record
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                history[record.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                    for i in items}
    return history


def test_wandb_offline_run_holds_the_curves(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'rayalign[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_records(ppo_job(tmp_path, "wandb", WANDB_PROJECT="pipe", WANDB_DIR=str(tmp_path / "wb"),
                        WANDB_NAME="grpo", WANDB_MODE="offline"))
    [run_file] = (tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert sorted(history) == [1, 2]
    assert_curve([(step, row["ppo/reward_mean"]) for step, row in sorted(history.items())],
                 expected_curve("reward_mean"))
    assert not any(key in row for row in history.values() for key in ("ppo/sync_method", "ppo/step"))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("backend", ["mlflow", "wandb"])
def test_missing_package_names_the_setting_and_the_extra(tmp_path, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # what an environment without the package imports
    with pytest.raises(ImportError, match=rf"tracking.backend is '{backend}'.*pip install 'rayalign\[{backend}\]'"):
        open_tracker(ppo_job(tmp_path, backend), 0)


# --------------------------------------------------------------------------- the worker


def test_worker_write_records_logs_through_the_tracker(tmp_path):
    """``write_records`` (rank 0's per-iteration record) on a PPORun holding only what it reads."""
    from stages.ppo.config import PPOConfig
    from stages.ppo.records import METRICS_FILE, write_records
    from stages.ppo.worker import PPORun

    config = PPOConfig.model_validate({"kind": "ppo", "from": "base", "prompts": "builtin:addition",
                                       "reward_fn": "addition", "train": {"max_steps": 2, "logging_steps": 1}})
    job = ppo_job(tmp_path, "tensorboard", TENSORBOARD_LOGGING_DIR=str(tmp_path / "tb"))
    run = PPORun(job=job, config=config, rank=0, world=1, tokenizer=None, actor=None, ref_model=None,
                 policy=None, critic=None, plan=None, engines=None, all_engines=None, rewards=None, kl_ctl=None,
                 writer=open_tracker(job, 0))
    for entry in RECORDS:
        write_records(run, entry["step"], entry)
    run.writer.close()
    assert_curve(tensorboard_scalars(tmp_path / "tb")["ppo/kl"], expected_curve("kl"))
    assert [json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == [1, 2]
