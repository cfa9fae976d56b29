"""The task registry (re-exported by ``train.tasks``, which also imports the built-in tasks)."""
from __future__ import annotations

from typing import Callable

from pipeline.registry import Registry
from train.tasks.base import Task

TASKS: Registry[type[Task]] = Registry("training task")


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: register a :class:`Task` subclass under ``name`` (sets ``cls.name``)."""
    return TASKS.register_named(name)


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name`` (``RegistryError`` listing the known ones otherwise)."""
    return TASKS.get(name)
