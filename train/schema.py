"""The dataclass tree of a training run: shared sections only (model, optim, data, run knobs).

Task options live with their task (``Task.section`` / ``Task.Config``, see ``train.tasks``) and
evaluation options with their evaluation; :func:`train.config.resolve_train_config` parses them
into ``TrainConfig.task_cfg`` / ``TrainConfig.eval_cfg``. Adding a task never edits this file.

Runtime knobs (they may differ when a run is resumed, and are ignored when pairing runs in a
report) are declared once, on the field, with :func:`pipeline.config.runtime`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from pipeline.config import runtime
from pipeline.errors import ConfigError
from train.models import ModelConfig


def range_problems(obj: Any, at_least: Iterable[tuple[str, float]] = (), positive: Iterable[str] = (),
                   choices: Iterable[tuple[str, tuple[str, ...]]] = ()) -> list[str]:
    """One line per field of ``obj`` out of range: ``(name, low)`` pairs must be ``>= low``
    (``None`` allowed where the field is optional), ``positive`` names ``> 0``, ``choices``
    ``(name, allowed)`` one of the allowed strings. Type errors are the loader's job."""
    out: list[str] = []
    for name, low in at_least:
        v = getattr(obj, name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < low:
            out.append(f"{name} must be >= {low}, got {v!r}")
    for name in positive:
        v = getattr(obj, name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not v > 0:
            out.append(f"{name} must be > 0, got {v!r}")
    for name, allowed in choices:
        v = getattr(obj, name)
        if v not in allowed:
            out.append(f"{name} must be one of {list(allowed)}, got {v!r}")
    return out


def raise_problems(problems: list[str]) -> None:
    """Raise one ValueError listing every problem (``pipeline.config.from_dict`` reports it with
    the section's dotted name, together with the other sections' problems)."""
    if problems:
        raise ValueError("\n".join(problems))


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine to ``min_lr``.

    The peak learning rate is ``base_lr * global_batch / 64`` (linear scaling), where the
    global batch is what ``batch_scope`` says ``batch_size`` counts:

    * ``"per_rank"`` (the released code: ``BASE_LR * BATCHSIZE_PER_GPU * world / 64``):
      ``batch_size`` videos per rank and step, global batch ``batch_size * world_size``;
    * ``"global"`` (the paper's "eta x batch / 64"): ``batch_size`` videos per step over all
      ranks (must divide by the world size), ``batch_size / world_size`` per rank.
    """

    base_lr: float = 1e-3
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 800
    warmup_epochs: float = 5.0
    min_lr: float = 0.0
    batch_size: int = 32  # videos per step, per rank or over all ranks (batch_scope); PRP: x clips_per_video clips
    batch_scope: str = "per_rank"  # per_rank | global: what batch_size counts (lr scaling and DataLoader)
    label_smoothing: float = 0.05
    grad_clip: float | None = None
    decay_matrices_only: bool = False  # weight decay on weight matrices only (not biases, norms)

    def __post_init__(self) -> None:
        problems = range_problems(self, at_least=[("epochs", 1), ("batch_size", 1), ("warmup_epochs", 0),
                                                  ("min_lr", 0), ("weight_decay", 0), ("label_smoothing", 0),
                                                  ("base_lr", 0)])  # base_lr 0: weights kept (checks)
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0 or unset (null), got {self.grad_clip!r}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        raise_problems(problems)


BATCH_SCOPES = ("per_rank", "global")


def per_rank_batch(optim: OptimConfig, world: int) -> int:
    """Videos per rank and step from ``optim.batch_size`` and ``optim.batch_scope``."""
    if optim.batch_scope not in BATCH_SCOPES:
        raise ConfigError(f"optim.batch_scope must be one of {BATCH_SCOPES}, got {optim.batch_scope!r}")
    if optim.batch_scope == "per_rank":
        return optim.batch_size
    if optim.batch_size % world:
        raise ConfigError(f"optim.batch_size={optim.batch_size} is a global batch (optim.batch_scope=global) and "
                          f"does not divide over {world} ranks; use a multiple of {world}")
    return optim.batch_size // world


def peak_lr(optim: OptimConfig, per_rank: int, world: int) -> float:
    """``base_lr * global batch / 64``: the linear scaling rule of both the paper and the released code."""
    return optim.base_lr * per_rank * world / 64


@dataclass
class DataConfig:
    store: str = ""
    splits: str = ""  # split table (JSONL: video_id, split[, label]; a manifest works) replacing the store's splits
    train_split: str = "train"
    test_split: str = "test"
    workers: int = runtime(2)  # DataLoader workers per rank
    prefetch_factor: int = runtime(4)  # batches each worker reads ahead (DataLoader prefetch_factor; workers > 0)
    in_memory: str = runtime("auto")  # auto | yes | no: read the whole store into RAM first
    in_memory_max_gb: float = runtime(4.0)  # "auto" loads the store when it is smaller than this
    augment: tuple[str, ...] = ()  # feature-space augmentations, e.g. ("hflip", "grid-crop")
    # label-changing augmentations (fine-tuning; p = 0.5 each) -> the class each class becomes under
    # it, e.g. {reverse = [3, 2, 1, 0]}: a clip played backwards, whose label is remapped (train.data)
    relabel: dict[str, tuple[int, ...]] = field(default_factory=dict)
    allow_incomplete: bool = runtime(False)  # train on a store whose extraction has not finished
    skip_bad_videos: bool = False  # leave out (count, report) training videos with NaN/inf features

    def __post_init__(self) -> None:
        raise_problems(range_problems(self, at_least=[("workers", 0), ("prefetch_factor", 1)], positive=["in_memory_max_gb"],
                                      choices=[("in_memory", ("auto", "yes", "no"))]))


@dataclass
class TrainConfig:
    """One training run. ``task`` names a registered task (``train.tasks.TASKS``).

    ``task_cfg`` is the active task's own section (its ``Task.Config``), ``eval_cfg`` maps each
    of the task's evaluations to its section; both are filled by the resolver.
    """

    task: str = "prp"
    recipe: str = ""  # the recipe preset applied under the dataset file (train.presets: paper | released; "" none)
    name: str = runtime("")
    run_dir: str = runtime("")
    seed: int = 0
    device: str = runtime("auto")
    amp: bool = False  # TMM + head in float32 (as released); True: bf16 autocast on CUDA
    init: str | None = None  # a run dir or checkpoint to start from (tasks that accept one)
    init_unfinished: bool = runtime(False)  # allow init from a run that did not finish training
    init_other_store: bool = runtime(False)  # allow init from a run trained on a store of other features
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval_every: int = runtime(0)  # epochs between evaluations during training (0: only at the end)
    checkpoint_every: int = runtime(50)  # steps between checkpoints (also at every epoch end)
    log_every: int = runtime(10)  # steps between metric lines
    max_steps: int | None = runtime(None)  # stop early (debugging); the lr schedule is unchanged
    keep_last: int = runtime(0)  # keep the last N end-of-epoch checkpoints (checkpoints/epoch-<e>.pt); 0: none
    best_metric: str = runtime("")  # keep checkpoints/best.pt by this evaluation number (e.g. top1; *loss*: lower)
    task_cfg: Any = None  # the active task's section (a Task.Config instance), set by the resolver
    eval_cfg: dict[str, Any] = field(default_factory=dict)  # evaluation name -> its section

    def __post_init__(self) -> None:
        raise_problems(self.own_problems())

    def own_problems(self) -> list[str]:
        """Out-of-range values of the top-level fields (the sections check themselves)."""
        problems = range_problems(self, at_least=[("eval_every", 0), ("checkpoint_every", 1), ("log_every", 1),
                                                  ("keep_last", 0)])
        if self.max_steps is not None and isinstance(self.max_steps, int) and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 or unset (null), got {self.max_steps!r}")
        return problems
