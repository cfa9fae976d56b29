"""Stage-2 models: AdViSe's R3D temporal module (TMM), the MLP head, and the VideoModel wrapper.

``build_model(ModelConfig)`` picks the architecture by name from ``MODELS`` ("tmm", "avgpool").
Models take store features ``(B, T, H, W, C)`` and return logits ``(B, num_classes)``.
"""
from .head import MLPHead
from .tmm import TMM, BottleneckBlock, ModelConfigError, TMMConfig
from .video_model import (
    MODELS,
    ModelConfig,
    ModelFactory,
    VideoModel,
    arch_signature,
    build_model,
    check_arch_compatible,
    check_input_channels,
    expected_in_channels,
    register_arch,
    validate_model_config,
)

__all__ = [
    "MLPHead",
    "TMM",
    "BottleneckBlock",
    "ModelConfigError",
    "TMMConfig",
    "MODELS",
    "ModelConfig",
    "ModelFactory",
    "VideoModel",
    "arch_signature",
    "build_model",
    "check_arch_compatible",
    "check_input_channels",
    "expected_in_channels",
    "register_arch",
    "validate_model_config",
]
