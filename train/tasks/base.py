"""The ``Task`` base class: what a training task tells the loop (``train.loop.fit``).

A task owns its data (``train_dataset``), its trainable modules (``build``), its loss
(``step``, with a function from ``train.losses``) and any extra state that must survive a
checkpoint (``state_dict``). The loop owns everything else: ranks and DDP, the optimiser and
learning-rate schedule, AMP, the DataLoader and mid-epoch resume, checkpoints, metric lines,
and running the task's evaluations. A task never branches on another task's name.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline.errors import FreezeframeError
from pipeline.store import FeatureStore
from train.models import build_model
from train.rundir import check_init_source, store_identity
from train.schema import TrainConfig


class NoOptions:
    """The config section of a task without options (``section = None``)."""


class Task:
    """Base class of training tasks; subclass it and decorate with ``@register_task(name)``.

    Class attributes:
        name: registry name, e.g. ``"prp"`` (set by ``register_task``).
        section: the task's config table / dotted prefix (e.g. ``"prp"``), None for no options.
        Config: dataclass of that section; the resolver stores an instance at ``cfg.task_cfg``.
        command: the table of a dataset config file applied for this task (``[pretrain]`` for
            PRP), after ``[common]``; defaults to ``name``.
        evaluations: names in ``train.evals.EVALUATIONS`` run at the end (and every
            ``cfg.eval_every`` epochs); their numbers go to ``summary.json``.
        accepts_init: whether ``cfg.init`` (weights of an earlier run) makes sense for this task.
        uses_model_config: whether ``build`` makes ``cfg.model`` (the TMM + head), so the store's
            channels must fit ``model.tmm.in_channels``; False for tasks with their own modules.
        defaults: config values this task starts from, before any file or override (a nested
            dict like a TOML table, e.g. its recipe's ``{"optim": {"epochs": 5}}``).
    """

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None
    Config: ClassVar[type] = NoOptions
    command: ClassVar[str | None] = None
    evaluations: ClassVar[tuple[str, ...]] = ()
    accepts_init: ClassVar[bool] = False
    uses_model_config: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: TrainConfig, store: FeatureStore, device: torch.device) -> None:
        self.cfg, self.store, self.device = cfg, store, device

    @classmethod
    def table(cls) -> str:
        """The dataset-config table of this task (``command`` or ``name``)."""
        return cls.command or cls.name

    @property
    def options(self) -> Any:
        """This task's config section (``cfg.task_cfg``, an instance of ``Config``)."""
        return self.cfg.task_cfg

    def preflight(self) -> None:
        """Refuse, with a message saying what to change, a run that cannot work (before any work)."""
        if self.cfg.init and not self.accepts_init:
            raise FreezeframeError(f"init (weights of an earlier run) is not used by task {self.name!r}; "
                                   "remove init, or use a task that starts from one (e.g. finetune)")
        if self.cfg.init:  # an unfinished run, or features of another kind, are refused unless asked
            check_init_source(self.cfg.init, store_identity(self.store), allow_unfinished=self.cfg.init_unfinished,
                              allow_other_store=self.cfg.init_other_store)

    def train_dataset(self, seed: int) -> Dataset:
        """Map-style dataset of training items seeded by ``(seed, epoch, index)``; has ``set_epoch``."""
        raise NotImplementedError

    def build(self) -> nn.Module:
        """The trainable modules, on the CPU (the loop moves them and wraps them in DDP).

        Default: ``train.models.build_model(cfg.model)``, drawing from the global torch RNG
        (seeded by the loop), so a run's initial weights depend on the seed only."""
        return build_model(self.cfg.model)

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        """Forward one batch (already on the device) and return ``{"loss": scalar, ...}``.

        Other scalars (e.g. ``"acc"``) are logged in the metric lines; the loop runs this
        inside autocast and calls ``backward`` on ``"loss"``. Randomness: per-item draws belong
        in the dataset (seeded by (seed, epoch, index)); the global torch RNG may be used here
        (it is checkpointed, and nothing else in the loop draws from it)."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimiser step (``step`` counts finished steps): momentum updates, queues."""

    def state_dict(self) -> dict:
        """Extra state (queues, momentum encoders...) saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (called when a run resumes)."""
