"""The dataclass tree of a training run: shared sections only (model, optim, data, run knobs).

Task options live with their task (``Task.section`` / ``Task.Config``, see ``train.tasks``) and
evaluation options with their evaluation; :func:`train.config.resolve_train_config` parses them
into ``TrainConfig.task_cfg`` / ``TrainConfig.eval_cfg``. Adding a task never edits this file.

Runtime knobs (they may differ when a run is resumed, and are ignored when pairing runs in a
report) are declared once, on the field, with :func:`pipeline.config.runtime`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import runtime
from train.models import ModelConfig


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine to ``min_lr``.

    The peak learning rate is ``base_lr * batch_size * world_size / 64`` (the released
    code's linear scaling; ``batch_size`` counts videos per rank and step).
    """

    base_lr: float = 1e-3
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 800
    warmup_epochs: float = 5.0
    min_lr: float = 0.0
    batch_size: int = 32  # videos per rank per step (PRP: x clips_per_video clips)
    label_smoothing: float = 0.05
    grad_clip: float | None = None
    decay_matrices_only: bool = False  # weight decay on weight matrices only (not biases, norms)


@dataclass
class DataConfig:
    store: str = ""
    train_split: str = "train"
    test_split: str = "test"
    workers: int = runtime(2)  # DataLoader workers per rank
    in_memory: str = runtime("auto")  # auto | yes | no: read the whole store into RAM first
    in_memory_max_gb: float = runtime(4.0)  # "auto" loads the store when it is smaller than this
    augment: tuple[str, ...] = ()  # feature-space augmentations, e.g. ("hflip", "grid-crop")


@dataclass
class TrainConfig:
    """One training run. ``task`` names a registered task (``train.tasks.TASKS``).

    ``task_cfg`` is the active task's own section (its ``Task.Config``), ``eval_cfg`` maps each
    of the task's evaluations to its section; both are filled by the resolver.
    """

    task: str = "prp"
    name: str = runtime("")
    run_dir: str = runtime("")
    seed: int = 0
    device: str = runtime("auto")
    amp: bool = True  # bf16 autocast on CUDA
    init: str | None = None  # a run dir or checkpoint to start from (tasks that accept one)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval_every: int = runtime(0)  # epochs between evaluations during training (0: only at the end)
    checkpoint_every: int = runtime(50)  # steps between checkpoints (also at every epoch end)
    log_every: int = runtime(10)  # steps between metric lines
    max_steps: int | None = runtime(None)  # stop early (debugging); the lr schedule is unchanged
    task_cfg: Any = None  # the active task's section (a Task.Config instance), set by the resolver
    eval_cfg: dict[str, Any] = field(default_factory=dict)  # evaluation name -> its section
