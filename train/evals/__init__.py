"""Evaluations as plug-ins: ``EVALUATIONS`` maps a name to an :class:`Evaluation` subclass.

A task lists the evaluations it runs (``Task.evaluations``); the loop runs them at the end of
training (and every ``eval_every`` epochs) and ``RunDir.write_eval`` stores their results.
"""
from __future__ import annotations

from typing import Callable

from pipeline.registry import Registry
from train.evals.base import EvalOutput, Evaluation

EVALUATIONS: Registry[type[Evaluation]] = Registry("evaluation")


def register_evaluation(name: str) -> Callable[[type[Evaluation]], type[Evaluation]]:
    """Class decorator: register an :class:`Evaluation` subclass under ``name`` (sets ``cls.name``)."""

    def deco(cls: type[Evaluation]) -> type[Evaluation]:
        cls.name = name
        EVALUATIONS.add(name, cls)
        return cls

    return deco


def get_evaluation(name: str) -> Evaluation:
    """A new instance of the evaluation registered as ``name``."""
    return EVALUATIONS.get(name)()


from train.evals import multiview  # noqa: E402,F401  (built-ins register on import)

__all__ = ["EVALUATIONS", "EvalOutput", "Evaluation", "get_evaluation", "register_evaluation"]
