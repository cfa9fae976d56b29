"""The evaluation registry (re-exported by ``train.evals``, which also imports the built-ins)."""
from __future__ import annotations

from typing import Callable

from pipeline.registry import Registry
from train.evals.base import Evaluation

EVALUATIONS: Registry[type[Evaluation]] = Registry("evaluation")


def register_evaluation(name: str) -> Callable[[type[Evaluation]], type[Evaluation]]:
    """Class decorator: register an :class:`Evaluation` subclass under ``name`` (sets ``cls.name``)."""
    return EVALUATIONS.register_named(name)


def get_evaluation(name: str) -> Evaluation:
    """A new instance of the evaluation registered as ``name``."""
    return EVALUATIONS.get(name)()
