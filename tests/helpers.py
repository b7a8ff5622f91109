"""Small builders shared by tests (pipeline specs around the session's tiny base)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
from pathlib import Path

from pipeline.spec import PipelineSpec, parse_spec

TEST_SECRET = ("RAYALIGN_TEST_SECRET_TOKEN", f"dummy-secret-{os.getpid()}-7f3a9c")  # name, value
QUICK_TRAIN = {"max_steps": 4, "lr": 3.0e-3, "batch_size": 8, "max_length": 32, "logging_steps": 1}


def make_spec(storage: Path, base: Path | str, stages: dict, name: str = "t", **top) -> PipelineSpec:
    raw = {"name": name, "storage": str(storage), "base": {"model": str(base)}, "stages": copy.deepcopy(stages), **top}
    return parse_spec(raw)


def quick_sft(**overrides) -> dict:
    """A few-step SFT stage on the builtin addition task: 1 worker, no DeepSpeed."""
    stage = {"kind": "sft", "data": {"path": "builtin:addition", "limit": 256}, "peft": {"method": "lora", "r": 4},
             "train": dict(QUICK_TRAIN)}
    return with_overrides(stage, overrides)


def with_overrides(stage: dict, overrides: dict) -> dict:
    """A stage dict with ``overrides`` applied; nested sections are merged one level deep."""
    stage = copy.deepcopy(stage)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(stage.get(key), dict):
            stage[key] = {**stage[key], **value}
        else:
            stage[key] = value
    return stage


def kill_at_first_checkpoint(run: subprocess.Popen, stage_dir: Path, marker: str, timeout: float,
                             settle: float = 0.0) -> None:
    """SIGKILL ``run``'s process group once ``stage_dir`` holds a file matching ``marker`` (a glob), after
    ``settle`` more seconds; fails if the run ends first or nothing appears within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not list(stage_dir.glob(marker)):
        assert run.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    time.sleep(settle)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()


def reference_logprobs(model, P, R) -> list[list[float]]:
    """The model's own teacher-forced log-probs, one sequence at a time (no padding involved)."""
    import torch

    out = []
    with torch.no_grad():
        for p, r in zip(P, R):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            tok = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
            out.append(tok[len(p) - 1 : len(p) - 1 + len(r)].tolist())
    return out


def strict_schema(schema):
    """A JSON schema in which unknown fields are errors (the API server would prune them silently: a
    typo would be lost); for validating manifests against the KubeRay CRD schemas."""
    if isinstance(schema, dict):
        schema = {key: strict_schema(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict_schema(item) for item in schema]
    return schema
