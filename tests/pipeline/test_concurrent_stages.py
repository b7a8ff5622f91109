"""``max_concurrent_stages``: the runner's order of work when independent stages may run at once.

The stage runs themselves are replaced by timed stand-ins here (each one writes a real HF folder as its
artifact): what is under test is the runner's scheduling. The shipped tiny DAG runs its four stages after
SFT two at a time on real Ray Train jobs (tests/e2e/test_tiny_dag.py), with the same results as one at a time.
"""

from __future__ import annotations

import threading
import time

import pytest

from pipeline import runner
from pipeline.runner import RunError, plan
from pipeline.store import Artifact
from tests.helpers import make_spec, quick_sft

# sft -> (a, b, c) -> d: three independent stages after sft, one that needs them all.
STAGES = {"sft": quick_sft(), "a": quick_sft(**{"from": "sft"}), "b": quick_sft(**{"from": "sft"}),
          "c": quick_sft(**{"from": "sft"}), "d": quick_sft(**{"from": "c"})}
STAGE_SECONDS = 0.3


class TimedWalk(runner._Walk):
    """The runner's walk with each stage run replaced by a sleep that records when it ran, and on which thread."""

    fail: set[str] = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spans: dict[str, tuple[float, float, str]] = {}

    def run_stage(self, node: str, fp: str, upstream: dict[str, Artifact]) -> Artifact:
        begin = time.monotonic()
        # A failing stage fails early, while the one started beside it still runs: with equal sleeps the other
        # could finish first, and its freed slot start the next stage before the failure was seen.
        time.sleep(STAGE_SECONDS / 3 if node in self.fail else STAGE_SECONDS)
        self.spans[node] = (begin, time.monotonic(), threading.current_thread().name)
        if node in self.fail:
            raise RunError(f"stage {node!r} failed: on purpose")
        return upstream["base"]  # any complete artifact: the scheduling is what is checked


def walk(tmp_path, tiny_base, limit: int, fail: set[str] = frozenset()) -> TimedWalk:
    spec = make_spec(tmp_path, tiny_base, STAGES, max_concurrent_stages=limit)
    the_walk = TimedWalk(spec, plan(spec, inputs={"base": str(tiny_base)}), {"base": str(tiny_base)}, set(),
                         True, False, False)
    the_walk.fail = set(fail)
    return the_walk


def overlapping(spans: dict, first: str, second: str) -> bool:
    return spans[first][0] < spans[second][1] and spans[second][0] < spans[first][1]


def test_one_at_a_time_runs_in_dag_order_on_the_calling_thread(tmp_path, tiny_base):
    the_walk = walk(tmp_path, tiny_base, limit=1)
    the_walk.run()
    spans = the_walk.spans
    assert sorted(spans, key=lambda n: spans[n][0]) == ["sft", "a", "b", "c", "d"]
    assert {thread for _, _, thread in spans.values()} == {threading.current_thread().name}
    assert not any(overlapping(spans, x, y) for x in spans for y in spans if x < y)


def test_independent_stages_run_at_once_up_to_the_limit(tmp_path, tiny_base):
    the_walk = walk(tmp_path, tiny_base, limit=2)
    the_walk.run()
    spans = the_walk.spans
    assert set(the_walk.artifacts) == {"base", *STAGES}
    # sft first; then a and b at once (the first two ready, in file order); c when a slot frees; d after c.
    assert all(spans["sft"][1] <= spans[n][0] for n in "abc")
    assert overlapping(spans, "a", "b") and spans["c"][0] >= min(spans["a"][1], spans["b"][1])
    assert spans["d"][0] >= spans["c"][1]
    for moment in (s for s, _, _ in spans.values()):  # never more than two at a time
        assert sum(s <= moment < e for s, e, _ in spans.values()) <= 2
    assert len({thread for _, _, thread in spans.values()}) == 2


def test_a_failure_starts_nothing_new_lets_running_stages_finish_and_is_raised(tmp_path, tiny_base):
    the_walk = walk(tmp_path, tiny_base, limit=2, fail={"a"})
    with pytest.raises(RunError, match="stage 'a' failed: on purpose"):
        the_walk.run()
    # b was running beside a: it finished and is kept; c (waiting for a slot) and d never started.
    assert set(the_walk.spans) == {"sft", "a", "b"}
    assert "b" in the_walk.artifacts and "a" not in the_walk.artifacts
    assert the_walk.waiting == ["c", "d"]


def test_the_limit_is_validated(tmp_path, tiny_base):
    from pipeline.spec import SpecError

    with pytest.raises(SpecError, match="max_concurrent_stages"):
        make_spec(tmp_path, tiny_base, STAGES, max_concurrent_stages=0)


def test_independent_groups_are_the_stages_none_upstream_of_another(tmp_path, tiny_base):
    dag = plan(make_spec(tmp_path, tiny_base, STAGES)).dag
    stages = list(STAGES)
    assert dag.independent_groups(stages, 1) == [(s,) for s in stages]
    pairs = {g for g in dag.independent_groups(stages, 2) if len(g) == 2}
    assert pairs == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")}  # d is downstream of c only
    assert {g for g in dag.independent_groups(stages, 5) if len(g) > 2} == {("a", "b", "c"), ("a", "b", "d")}
    assert dag.independent_groups(stages, 5, limit=4) is None  # too many to list


# configs/tiny.yaml's stages ask for 2 CPUs each (sft, reward, dpo, ppo, grpo), eval 1 (`rayalign plan`).
@pytest.mark.parametrize("at_once, cpus", [(1, 2), (2, 4), (3, 6), (4, 8), (8, 8)])
def test_the_plan_and_the_kuberay_cluster_hold_the_stages_that_may_run_at_once(at_once, cpus, tmp_path, capsys):
    """reward, dpo, ppo and grpo may run together after sft: the peak is the largest group of up to N of them."""
    from pipeline.cli import main
    from pipeline.k8s import cluster_shape
    from pipeline.spec import load_spec
    from tests.tiny_dag import TINY

    sets = [f"max_concurrent_stages={at_once}", f"storage={tmp_path}"]
    assert cluster_shape(load_spec(TINY, sets)).replicas == cpus  # pods of one CPU, its largest member
    assert main(["plan", str(TINY), *(x for s in sets for x in ("--set", s))]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("peak (") and last.endswith(f": {cpus} CPU"), last
