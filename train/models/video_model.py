"""The stage-2 model: optional train-time compression -> temporal module -> head.

Data flow (shapes)::

    store features  (B, T, H, W, C)       channels-last float, C = model.tmm.in_channels
    compress        (B, T, H', W', C')    pipeline.pooling.compress(spatial_pool, channel_pool)
    permute         (B, C', T, H', W')
    temporal module (B, C_out, T, H', W') TMM, or identity for the "avgpool" baseline (C_out = C')
    head            (B, num_classes)      global average over T, H', W' + MLP

Channel bookkeeping: ``model.tmm.in_channels`` is the C of the features handed to the model
(the store's C). With ``channel_pool = c`` the TMM (or the avgpool head) sees ``c`` channels,
otherwise ``model.tmm.in_channels``; ``expected_in_channels(cfg)`` returns that number and
``check_input_channels(cfg, store_channels)`` refuses a store that cannot produce it.

Architectures are looked up by name in ``MODELS`` (``model.arch``); add one with
``@register_arch(name, signature_fields)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from pipeline.errors import ConfigMismatchError
from pipeline.pooling import compress
from pipeline.registry import Registry

from .head import MLPHead
from .tmm import TMM, ModelConfigError, TMMConfig

__all__ = [
    "ModelConfig",
    "VideoModel",
    "ModelFactory",
    "MODELS",
    "register_arch",
    "build_model",
    "expected_in_channels",
    "check_input_channels",
    "validate_model_config",
    "arch_signature",
    "check_arch_compatible",
]


@dataclass
class ModelConfig:
    """Stage-2 model configuration (TOML section ``[model]``).

    Attributes:
        arch: "tmm" (R3D bottleneck TMM + head) or "avgpool" (no TMM: the features averaged over
            T, H, W go straight into the same head). See ``MODELS.names()``.
        tmm: TMM widths/depth; ``tmm.in_channels`` is the store's feature width C.
        mlp_dim: hidden width of the head MLP.
        spatial_pool: train-time adaptive average pooling of the grid to k x k (None = off).
        channel_pool: train-time adaptive average pooling of channels to c (None = off).
        num_classes: logits of the head (4 for PRP's playback rates).
    """

    arch: str = "tmm"
    tmm: TMMConfig = field(default_factory=TMMConfig)
    mlp_dim: int = 1024
    spatial_pool: int | None = None
    channel_pool: int | None = None
    num_classes: int = 4


class VideoModel(nn.Module):
    """Compression + temporal module + head.

    Args:
        temporal: module mapping ``(B, in_channels, T, H, W)`` -> ``(B, head.in_channels, T, H, W)``
            (a ``TMM``, or ``nn.Identity`` for the average-pooling baseline).
        head: the ``MLPHead``.
        in_channels: channels the temporal module expects, i.e. after channel pooling.
        spatial_pool, channel_pool: train-time compression (see ``pipeline.pooling``), None = off.

    Attributes ``.tmm`` (the temporal module) and ``.head`` are public; ``reset_head`` swaps the head.
    """

    def __init__(
        self,
        temporal: nn.Module,
        head: MLPHead,
        in_channels: int,
        spatial_pool: int | None = None,
        channel_pool: int | None = None,
    ) -> None:
        super().__init__()
        self.tmm = temporal
        self.head = head
        self.in_channels = in_channels
        self.spatial_pool = spatial_pool
        self.channel_pool = channel_pool

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def prepare(self, x: Tensor) -> Tensor:
        """Store layout ``(B, T, H, W, C)`` -> compressed model layout ``(B, C', T, H', W')``."""
        if x.dim() != 5:
            raise ConfigMismatchError(
                f"VideoModel expects store features shaped (B, T, H, W, C), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ConfigMismatchError(
                f"VideoModel needs float features, got {x.dtype}; dequantise int8 stores "
                f"(x = q * scale) before calling the model"
            )
        x = compress(x, self.spatial_pool, self.channel_pool)
        if x.shape[-1] != self.in_channels:
            raise ConfigMismatchError(
                f"the model expects {self.in_channels} channels after channel pooling "
                f"(channel_pool={self.channel_pool}) but the features have {x.shape[-1]}; set "
                f"model.tmm.in_channels to the store's channel count or model.channel_pool "
                f"to the width the checkpoint was trained with"
            )
        param = next(self.parameters(), None)
        if param is not None and x.dtype != param.dtype:
            x = x.to(param.dtype)  # e.g. float16 store -> float32 model
        return x.permute(0, 4, 1, 2, 3).contiguous()

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, T, H, W, C)`` store features -> ``(B, C_out, T, H', W')`` before the head."""
        return self.tmm(self.prepare(x))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, H, W, C)`` store features -> logits ``(B, num_classes)``."""
        return self.head(self.forward_features(x))

    def reset_head(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one with ``num_classes`` outputs.

        Used when fine-tuning from a PRP checkpoint: the temporal module keeps its weights; the
        whole pretext head (MLP and BN included) is re-initialised, same width and device/dtype.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ModelConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        old = self.head
        ref = old.fc1.weight
        self.head = MLPHead(old.in_channels, num_classes, old.mlp_dim).to(device=ref.device, dtype=ref.dtype)
        self.head.train(old.training)


ModelFactory = Callable[[ModelConfig, int], VideoModel]
"""``factory(cfg, in_channels) -> VideoModel``; ``in_channels`` is ``expected_in_channels(cfg)``."""

MODELS: Registry[ModelFactory] = Registry("model architecture")
_SIGNATURE_FIELDS: Registry[tuple[str, ...]] = Registry("model architecture signature")

# Config fields that determine the head's state_dict shapes (shared by every arch).
_HEAD_FIELDS = ("mlp_dim", "num_classes")


def register_arch(name: str, signature_fields: tuple[str, ...]) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name``.

    ``signature_fields`` are the dotted ``ModelConfig`` fields (besides ``arch``, the input width
    and the head fields) that determine the state_dict shapes of this architecture.
    """

    def deco(factory: ModelFactory) -> ModelFactory:
        MODELS.register(name)(factory)
        _SIGNATURE_FIELDS.register(name)(tuple(signature_fields))
        return factory

    return deco


@register_arch("tmm", ("tmm.hidden", "tmm.out_channels", "tmm.blocks", "tmm.temporal_kernel"))
def _build_tmm(cfg: ModelConfig, in_channels: int) -> VideoModel:
    tmm = TMM.from_config(cfg.tmm, in_channels=in_channels)
    head = MLPHead(cfg.tmm.out_channels, cfg.num_classes, cfg.mlp_dim)
    return VideoModel(tmm, head, in_channels, cfg.spatial_pool, cfg.channel_pool)


@register_arch("avgpool", ())
def _build_avgpool(cfg: ModelConfig, in_channels: int) -> VideoModel:
    """No TMM: the (compressed) IFM features averaged over T, H, W feed the same head."""
    head = MLPHead(in_channels, cfg.num_classes, cfg.mlp_dim)
    return VideoModel(nn.Identity(), head, in_channels, cfg.spatial_pool, cfg.channel_pool)


def _positive_int(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or omitted (None)" if optional else ""
        raise ModelConfigError(f"{name} must be a positive integer{extra}, got {value!r}")


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise ``ModelConfigError`` naming the first invalid field (arch, sizes, kt parity)."""
    if cfg.arch not in MODELS:
        raise ModelConfigError(f"unknown model.arch {cfg.arch!r}; choose one of: {', '.join(MODELS.names())}")
    _positive_int("model.tmm.in_channels", cfg.tmm.in_channels)
    _positive_int("model.mlp_dim", cfg.mlp_dim)
    _positive_int("model.num_classes", cfg.num_classes)
    _positive_int("model.spatial_pool", cfg.spatial_pool, optional=True)
    _positive_int("model.channel_pool", cfg.channel_pool, optional=True)
    if cfg.channel_pool is not None and cfg.channel_pool > cfg.tmm.in_channels:
        raise ModelConfigError(
            f"model.channel_pool={cfg.channel_pool} exceeds model.tmm.in_channels="
            f"{cfg.tmm.in_channels}; channel pooling can only reduce the width"
        )


def expected_in_channels(cfg: ModelConfig) -> int:
    """Channels the temporal module (or avgpool head) expects: ``channel_pool`` if set, else ``tmm.in_channels``."""
    return cfg.channel_pool if cfg.channel_pool is not None else cfg.tmm.in_channels


def check_input_channels(cfg: ModelConfig, store_channels: int) -> None:
    """Refuse (``ConfigMismatchError``) a store whose feature width C cannot feed ``cfg``.

    Without channel pooling C must equal ``model.tmm.in_channels``; with ``channel_pool = c``
    C must be at least ``c`` (adaptive pooling only reduces).
    """
    if cfg.channel_pool is None:
        if store_channels != cfg.tmm.in_channels:
            raise ConfigMismatchError(
                f"the feature store has C={store_channels} channels but model.tmm.in_channels="
                f"{cfg.tmm.in_channels}; set model.tmm.in_channels={store_channels} (or set "
                f"model.channel_pool to pool the store's channels down)"
            )
    elif store_channels < cfg.channel_pool:
        raise ConfigMismatchError(
            f"model.channel_pool={cfg.channel_pool} needs at least that many channels but the "
            f"feature store has C={store_channels}; use model.channel_pool<={store_channels} or None"
        )


def build_model(cfg: ModelConfig) -> VideoModel:
    """Validate ``cfg`` and build the ``VideoModel`` registered under ``cfg.arch``."""
    validate_model_config(cfg)
    return MODELS.get(cfg.arch)(cfg, expected_in_channels(cfg))


def _get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def arch_signature(cfg: ModelConfig) -> dict[str, Any]:
    """The config values that determine the model's state_dict shapes (JSON-ready, flat dotted keys).

    Store it in checkpoints and compare with ``check_arch_compatible`` before loading.
    Pooling sizes other than the resulting channel count do not change shapes and are left out.
    """
    validate_model_config(cfg)
    sig: dict[str, Any] = {"arch": cfg.arch, "in_channels": expected_in_channels(cfg)}
    for name in _SIGNATURE_FIELDS.get(cfg.arch) + _HEAD_FIELDS:
        sig[name] = _get_dotted(cfg, name)
    return sig


def check_arch_compatible(
    checkpoint: Mapping[str, Any], current: Mapping[str, Any], *, new_head: bool = False
) -> None:
    """Raise ``ConfigMismatchError`` listing every field where two signatures differ.

    ``new_head=True`` (fine-tuning after ``reset_head``) ignores the head fields
    (``mlp_dim``, ``num_classes``), since the head is re-initialised.
    """
    ignore = set(_HEAD_FIELDS) if new_head else set()
    keys = sorted((set(checkpoint) | set(current)) - ignore)
    diffs = [
        f"{k}: checkpoint {checkpoint.get(k, '<absent>')!r} vs config {current.get(k, '<absent>')!r}"
        for k in keys
        if checkpoint.get(k) != current.get(k)
    ]
    if diffs:
        raise ConfigMismatchError(
            "the checkpoint was trained with a different model architecture; set the model.* "
            "options to match the checkpoint (or start from scratch):\n  - " + "\n  - ".join(diffs)
        )
