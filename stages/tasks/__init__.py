"""Built-in verifiable tasks: generators of SFT/preference/prompt/KTO data plus verifiers and rewards.

Usage::

    from stages.tasks import TASKS, get_task

    task = get_task("addition")                  # or get_task("addition", flaw_rate=0.5, seed=1), get_task("reversal")
    data = task.load("sft", "train", limit=None)  # stages.data.records.LoadedData
    task.verify(prompt, response); task.reward(prompt, response); task.category(prompt)
    task.fingerprint()                            # version + parameters, for cache keys

A task with a generator (``has_generator``) is also a data source: ``builtin:addition[/test]`` in a
data spec, with default parameters (``stages.sources``). Verifier-only tasks (``gsm8k``) are not, so
they never shadow real files of the same name.
"""

from __future__ import annotations

from stages.tasks.addition import AdditionTask
from stages.tasks.base import Task
from stages.tasks.gsm8k import GSM8KTask
from stages.tasks.reversal import ReversalTask

TASKS: dict[str, type[Task]] = {"addition": AdditionTask, "gsm8k": GSM8KTask, "reversal": ReversalTask}


def get_task(name: str, **params) -> Task:
    """A task instance by name; ``params`` go to its constructor. ValueError lists valid names."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name](**params)


__all__ = ["TASKS", "AdditionTask", "GSM8KTask", "ReversalTask", "Task", "get_task"]
