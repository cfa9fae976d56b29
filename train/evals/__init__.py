"""Evaluations as plug-ins: ``EVALUATIONS`` maps a name to an :class:`Evaluation` subclass.

A task lists the evaluations it runs (``Task.evaluations``); the loop runs them at the end of
training (and every ``eval_every`` epochs) and ``RunDir.write_eval`` stores their results
(``eval-<name>.json``; the multi-view test keeps ``eval.json``). One module per evaluation.
"""
from __future__ import annotations

from train.evals import multiview, propagation  # noqa: F401  (built-ins register on import)
from train.evals.base import EvalOutput, Evaluation
from train.evals.registry import EVALUATIONS, get_evaluation, register_evaluation

__all__ = ["EVALUATIONS", "EvalOutput", "Evaluation", "get_evaluation", "register_evaluation"]
