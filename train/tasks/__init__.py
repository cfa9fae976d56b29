"""Training tasks as plug-ins: ``TASKS`` maps a name to a :class:`~train.tasks.base.Task` subclass.

Add a task with one module::

    @register_task("mytask")
    class MyTask(Task):
        section = "mytask"; Config = MyTaskConfig
        def train_dataset(self, seed): ...
        def step(self, model, batch): ...

and (for a built-in) one import line below. ``train.loop.fit`` and ``train.config`` need no edit.
"""
from __future__ import annotations

from typing import Callable

from pipeline.registry import Registry
from train.tasks.base import Task

TASKS: Registry[type[Task]] = Registry("training task")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register a :class:`Task` subclass under ``name`` (sets ``cls.name``)."""

    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS.add(name, cls)
        return cls

    return deco


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name`` (``RegistryError`` listing the known ones otherwise)."""
    return TASKS.get(name)


# built-in tasks register themselves on import
from train.tasks import classify, prp  # noqa: E402,F401

__all__ = ["TASKS", "Task", "get_task", "register_task"]
