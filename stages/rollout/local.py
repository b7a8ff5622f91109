"""Engines in this process behind the interface of :class:`stages.rollout.actors.RolloutGroup`.

A PPO worker started without Ray (a standalone run: debugging, the GPU check in ``benchmarks/gpu``)
is handed engine objects instead of actor handles; :func:`engine_group` wraps either kind.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from stages.rollout.base import Rollout, RolloutEngine, SamplingParams, SyncInfo, serving_report, split_ranges


class LocalEngines:
    """The same fan-out as ``RolloutGroup`` (contiguous chunks, shifted seeds), one engine after another."""

    def __init__(self, engines: Sequence[RolloutEngine]) -> None:
        if not engines:
            raise ValueError("LocalEngines needs at least one engine")
        self.workers = list(engines)

    def __len__(self) -> int:
        return len(self.workers)

    def info(self) -> list[dict]:
        return [{"engine": e.name} for e in self.workers]

    def generate(self, prompts: Sequence, params: SamplingParams, with_reference: bool = False) -> list[Rollout]:
        if with_reference:
            raise ValueError("reference_placement: engine needs engine actors (RolloutWorker holds the reference), "
                             "not engines in the trainer's process")
        out: list[Rollout] = []
        for engine, (a, b) in zip(self.workers, split_ranges(len(prompts), len(self.workers))):
            chunk = engine.generate(list(prompts[a:b]), params.with_seed_offset(a * params.n))
            for rollout in chunk:
                rollout.weights_version = engine.weights_version
            out += chunk
        return out

    def start_generate(self, prompts: Sequence, params: SamplingParams,
                       with_reference: bool = False) -> Callable[[], list[Rollout]]:
        results = self.generate(prompts, params, with_reference)  # in this thread: nothing runs beside the trainer
        return lambda: results

    def update_weights(self, source: Any, version: int | None = None) -> list[SyncInfo]:
        infos = []
        for engine in self.workers:
            infos.append(engine.update_weights(source))
            if version is not None:
                engine.weights_version = version
        return infos

    def serving(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[dict]:
        return [serving_report(e, e.weights_version, prompt_ids, response_ids) for e in self.workers]

    def start_serving(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Callable[[], list[dict]]:
        return lambda: self.serving(prompt_ids, response_ids)  # in this thread: nothing to overlap

    def prepare_weight_stream(self, backend: str = "gloo", timeout_s: float = 120.0) -> str | None:
        """Always why not: a broadcast needs the receiving engine running in parallel with the trainer, and
        these engines run in the trainer's own thread. The caller sends a state_dict instead, which an
        in-process engine copies without the object store."""
        return "engines in the trainer's process (LocalEngines) take the state_dict directly"

    def sleep(self) -> None:
        for engine in self.workers:
            engine.sleep()

    def wake(self) -> None:
        for engine in self.workers:
            engine.wake()

    def shutdown(self) -> None:
        for engine in self.workers:
            engine.close()
        self.workers = []


def engine_group(engines: Sequence):
    """``LocalEngines`` over engine objects, a Ray ``RolloutGroup`` over actor handles."""
    if all(isinstance(e, RolloutEngine) for e in engines):
        return LocalEngines(engines)
    from stages.rollout.actors import RolloutGroup

    return RolloutGroup(engines)
