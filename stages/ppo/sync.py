"""Weight sync: the trained policy pushed to the rollout engines after every update."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from stages.ppo.distributed import barrier, dist_info, gathered_state_dict
from stages.ppo.policy import ActorCritic, causal_lm, is_peft


def save_policy(actor: ActorCritic, folder: Path, tokenizer=None) -> Path | None:
    """Write the policy as a plain HF folder (the adapter under LoRA, full weights otherwise); collective."""
    rank, _ = dist_info()
    policy = actor.policy
    if is_peft(policy):
        state = gathered_state_dict(policy, trainable_only=True)
        if rank == 0:
            policy.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    else:
        lm = causal_lm(policy)
        state = gathered_state_dict(lm)
        if rank == 0:
            lm.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    if rank == 0 and tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder if rank == 0 else None


def sync_weights(actor: ActorCritic, engines, work_dir: Path, step: int, mode: str = "auto") -> dict:
    """Push the current policy to every rollout engine; returns ``{"sync_seconds", "sync_method", ...}``.

    Collective (every rank calls it; rank 0 talks to the engines). ``engines`` is a
    ``RolloutGroup`` over all engines (rank 0) or None. LoRA: the adapter goes through a folder
    (``<work_dir>/sync/step-N``; each engine loads it under a fresh LoRA id). Full weights: a
    state_dict (``mode`` auto / state_dict) or a saved folder (``mode: folder``).
    """
    rank, _ = dist_info()
    started = time.perf_counter()
    sync_root = Path(work_dir) / "sync"
    infos = []
    if is_peft(actor.policy) or mode == "folder":
        folder = sync_root / f"step-{step}"
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        save_policy(actor, folder)
        if rank == 0:
            infos = engines.update_weights(str(folder))
            for old in sync_root.glob("step-*"):  # the engines have loaded it: older folders can go
                if old != folder and int(old.name.split("-")[1]) < step - 1:
                    shutil.rmtree(old, ignore_errors=True)
    else:
        state = gathered_state_dict(causal_lm(actor.policy))
        if rank == 0:
            infos = engines.update_weights(state)
    barrier()
    infos = infos if isinstance(infos, list) else [infos]  # a RolloutGroup, or one engine
    result = {"sync_seconds": time.perf_counter() - started}
    if infos:
        result["sync_method"] = infos[0].method
        result["engine_sync_seconds"] = max(i.seconds for i in infos)
    return result
