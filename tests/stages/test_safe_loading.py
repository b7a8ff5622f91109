"""No pickle in a training worker: DeepSpeed's resume still loads its ZeRO checkpoints, and a checkpoint
that carries code is refused without running it (in a subprocess: the switch is process-wide)."""

from __future__ import annotations

import subprocess
import sys

RESUME_THEN_REFUSE = r"""
import os, pickle, sys, torch, deepspeed
from stages.safe_loading import forbid_pickle_loads
from stages.worker import init_deepspeed_distributed

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
init_deepspeed_distributed(use_gpu=False)  # as the training workers start it
out = sys.argv[1]

def engine(stage):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]

for stage in (2, 3):
    trained = engine(stage)
    for _ in range(3):
        trained.backward(trained(torch.ones(2, 8)).sum())
        trained.step()
    trained.save_checkpoint(f"{out}/zero{stage}", tag="step3")
    expected = [p.detach().clone() for p in trained.module.parameters()] if stage == 2 else None
    forbid_pickle_loads()  # as every training worker does before it resumes
    resumed = engine(stage)
    path, _ = resumed.load_checkpoint(f"{out}/zero{stage}", tag="step3")
    assert path is not None, f"ZeRO-{stage}: nothing resumed"
    if expected is not None:
        assert all(torch.equal(a, b) for a, b in zip(expected, resumed.module.parameters()))
    os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    print(f"zero{stage} resumed", flush=True)

class Payload:
    def __reduce__(self):
        return (open, (f"{out}/payload-ran", "w"))

torch.save({"state": Payload()}, f"{out}/evil.pt")
forbid_pickle_loads()
try:
    torch.load(f"{out}/evil.pt", weights_only=False)  # what DeepSpeed's checkpoint engine asks for
except pickle.UnpicklingError as err:
    print("refused:", str(err).splitlines()[0])
assert not os.path.exists(f"{out}/payload-ran"), "the pickle's code ran"
"""


def test_zero_checkpoints_resume_weights_only_and_a_code_carrying_checkpoint_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-c", RESUME_THEN_REFUSE, str(tmp_path), "29561"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "zero2 resumed" in done.stdout and "zero3 resumed" in done.stdout
    assert "refused: Weights only load failed" in done.stdout
    # On CPU the workers' process group skips DeepSpeed's shared-memory all-reduce op (a 51 s JIT build).
    assert "built successfully" not in done.stdout, done.stdout
    assert not (tmp_path / "payload-ran").exists()
