"""The task registry (re-exported by ``train.tasks``, which also imports the built-in tasks)."""
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
