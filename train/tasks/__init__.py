"""Training tasks as plug-ins: ``TASKS`` maps a name to a :class:`~train.tasks.base.Task` subclass.

Add a task with one module::

    @register_task("mytask")
    class MyTask(Task):
        section = "mytask"; Config = MyTaskConfig
        def train_dataset(self, seed): ...
        def step(self, model, batch): ...

(for a built-in, plus one import line below). ``train.loop.fit`` and ``train.config`` need
no edit: the resolver parses the task's section, the loop asks the task for the rest.
"""
from __future__ import annotations

from train.tasks import classify, distill, mfm, moco, prp  # noqa: F401  (built-in tasks register on import)
from train.tasks.base import Task
from train.tasks.registry import TASKS, get_task, register_task

__all__ = ["TASKS", "Task", "get_task", "register_task"]
