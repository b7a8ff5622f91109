"""Built-in verifiable tasks: generators of SFT/preference/prompt/KTO data plus verifiers and rewards.

Usage::

    from stages.tasks import TASKS, get_task

    task = get_task("addition")                  # or get_task("addition", flaw_rate=0.5, seed=1)
    data = task.load("sft", "train", limit=None)  # stages.data.records.LoadedData
    task.verify(prompt, response); task.reward(prompt, response); task.category(prompt)
    task.fingerprint()                            # version + parameters, for cache keys

Importing this package registers every task that has a generator (``has_generator``) in the data
loader's ``BUILTIN_SOURCES`` hook (``stages.data.loader``), with default parameters, so a data spec
can name ``addition`` as a source. Verifier-only tasks (``gsm8k``) are not registered there, so they
never shadow real files of the same name. Each registered source carries ``.version`` (the task's
fingerprint) for cache keys.
"""

from __future__ import annotations

from stages.data.records import LoadedData
from stages.tasks.addition import AdditionTask
from stages.tasks.base import Task
from stages.tasks.gsm8k import GSM8KTask

TASKS: dict[str, type[Task]] = {"addition": AdditionTask, "gsm8k": GSM8KTask}


def get_task(name: str, **params) -> Task:
    """A task instance by name; ``params`` go to its constructor. ValueError lists valid names."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name](**params)


class TaskSource:
    """A loader hook: ``TaskSource("addition")(kind, split, limit) -> LoadedData`` with default parameters."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.version = get_task(name).fingerprint()

    def __call__(self, kind: str, split: str, limit: int | None = None) -> LoadedData:
        return get_task(self.name).load(kind, split, limit)

    def __repr__(self) -> str:
        return f"TaskSource({self.name!r})"


def register_builtin_sources() -> list[str]:
    """Put every generator task into ``stages.data.loader.BUILTIN_SOURCES``; returns the names added.

    Safe to call again, and a no-op while the loader (or its hook) does not exist yet.
    """
    try:
        from stages.data import loader
    except ModuleNotFoundError as error:
        # Only a missing loader module is expected; a broken import inside it must surface.
        if error.name not in ("stages.data.loader", "stages.data"):
            raise
        return []
    sources = getattr(loader, "BUILTIN_SOURCES", None)
    if sources is None:
        return []
    names = [name for name, cls in TASKS.items() if cls.has_generator]
    for name in names:
        sources[name] = TaskSource(name)
    return names


# The loader must not import tasks (it is generic), so the tasks plug themselves in on import.
register_builtin_sources()

__all__ = ["TASKS", "AdditionTask", "GSM8KTask", "Task", "TaskSource", "get_task", "register_builtin_sources"]
