"""The ``Evaluation`` base class: a test a task runs on its trained model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from pipeline.store import FeatureStore
from train.rundir import RunDir
from train.schema import TrainConfig


class EvalOutput(Protocol):
    """What an evaluation returns: JSON for its result file, headline numbers for summaries."""

    def to_json(self) -> dict[str, Any]: ...

    def summary(self) -> dict[str, float]: ...


class NoOptions:
    """The config section of an evaluation without options."""


class Evaluation:
    """Base class; subclass it and decorate with ``@register_evaluation(name)``.

    ``section`` / ``Config``: its config table (e.g. ``test``) and dataclass; the resolver puts
    an instance at ``cfg.eval_cfg[name]`` (see :meth:`options`).
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    Config: ClassVar[type] = NoOptions
    #: True: ``run`` is called on every rank (each takes its share of the work and the output is
    #: gathered, the same on every rank); False: on rank 0 alone while the others wait
    distributed: ClassVar[bool] = False

    def options(self, cfg: TrainConfig) -> Any:
        return cfg.eval_cfg.get(self.name) or self.Config()

    def preflight(self, store: FeatureStore, cfg: TrainConfig) -> None:
        """Refuse before training what would make the evaluation fail after it."""

    def run(self, model: nn.Module, store: FeatureStore, cfg: TrainConfig, device: torch.device) -> EvalOutput:
        raise NotImplementedError

    def plot(self, out: EvalOutput, run: RunDir, title: str | None = None) -> list[Path]:
        """Figures of ``out`` written into the run directory (none by default)."""
        return []
