"""The stage-2 training config: one dataclass tree, loaded from TOML + dotted overrides."""
from __future__ import annotations

from dataclasses import dataclass, field

from train.data import ClipConfig, TestViewConfig
from train.models import ModelConfig
from train.sampling import PRPConfig


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


@dataclass
class DataConfig:
    store: str = ""
    train_split: str = "train"
    test_split: str = "test"
    workers: int = 2  # DataLoader workers per rank
    in_memory: str = "auto"  # auto | yes | no: read the whole store into RAM first
    in_memory_max_gb: float = 4.0  # "auto" loads the store when it is smaller than this
    augment: tuple[str, ...] = ()  # feature-space augmentations, e.g. ("hflip", "grid-crop")


@dataclass
class TrainConfig:
    """``task`` is "prp" (pretraining) or "finetune" (classification + test views)."""

    task: str = "prp"
    name: str = ""
    run_dir: str = ""
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    init: str | None = None  # pretraining run dir or checkpoint (finetune only)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prp: PRPConfig = field(default_factory=PRPConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    test: TestViewConfig = field(default_factory=TestViewConfig)
    eval_every: int = 0  # epochs between test-view evaluations during fine-tuning (0: only at the end)
    checkpoint_every: int = 50  # steps between checkpoints (also at every epoch end)
    log_every: int = 10  # steps between metric lines
    max_steps: int | None = None  # stop early (debugging)
