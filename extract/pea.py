"""Co-Settle's positional-embedding augmentation (PEA): the return view A' of the cycle.

The released code (``interpolate_and_crop_pos_embed`` + ``forward_encoder_asy``, see
``docs/cosettle.md``) runs the frozen ViT a second time on the same pixels with a perturbed
positional embedding:

* the ``(H, W)`` patch-PE grid is upsampled bicubically (``align_corners=False``) to
  ``(int((1 + r) H), int((1 + r) W))`` (``r`` = ``ratio``, 10 in ``train.sh``: 14 -> 154);
* an ``(H, W)`` window at offset ``(oy, ox)``, each uniform in ``[0, int((1 + r) H) - H]``
  (inclusive), is cropped from it and replaces the patch PE;
* the CLS PE is unchanged; DINOv2 registers are inserted after the PE is added and carry none.

The released code draws one offset per batch; here every sample has its own offset
(``offsets`` ``(N, 2)`` int, rows ``(oy, ox)`` in upsampled patch units), so a stored view is
reproducible from its recorded offset alone. Offsets come from :func:`draw_offsets` with an
explicit ``torch.Generator``.

:func:`pea_forward` returns the same token layout as :meth:`Backbone.forward`: the last
block's tokens after the final norm (open_clip ``ln_post``, timm ``norm``), prefix tokens
(CLS, registers) dropped, ``(N, H, W, C)`` float32. With ``ratio=0`` (window = the original
grid) it equals the normal forward exactly.

Supported: :class:`~extract.backbones.OpenClipViTBackbone` and
:class:`~extract.backbones.TimmViTBackbone` (ViTs with a learned absolute PE, fixed image
size). Anything else (the CNN) raises :class:`PEAError`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extract.backbones import Backbone, OpenClipViTBackbone, TimmViTBackbone
from pipeline.errors import FreezeframeError

__all__ = [
    "DEFAULT_PEA_RATIO",
    "PEAError",
    "draw_offsets",
    "frame_offsets",
    "patch_pe",
    "pea_forward",
    "pea_patch_pe",
    "pea_supported",
    "upsampled_size",
]

#: ``--asy_pos_ratio`` of the released ``scripts/train.sh``
DEFAULT_PEA_RATIO = 10.0


class PEAError(FreezeframeError, ValueError):
    """PEA cannot be applied (backbone without a positional embedding, bad ratio or offsets)."""


# --------------------------------------------------------------------------------------
# the PE window
# --------------------------------------------------------------------------------------
def upsampled_size(grid: tuple[int, int], ratio: float) -> tuple[int, int]:
    """``(int((1 + ratio) H), int((1 + ratio) W))``: the side of the upsampled PE grid (154 for 14, r=10)."""
    if not ratio >= 0:
        raise PEAError(f"PEA ratio must be >= 0 (10 in the released recipe), got {ratio}")
    return int((1 + ratio) * grid[0]), int((1 + ratio) * grid[1])


def draw_offsets(n: int, grid: tuple[int, int], ratio: float, generator: torch.Generator) -> Tensor:
    """``n`` window offsets ``(n, 2)`` int64, rows ``(oy, ox)``, each uniform in ``[0, up - H]``
    (``[0, up - W]``), drawn from ``generator`` (CPU)."""
    uh, uw = upsampled_size(grid, ratio)
    oy = torch.randint(0, uh - grid[0] + 1, (n,), generator=generator)
    ox = torch.randint(0, uw - grid[1] + 1, (n,), generator=generator)
    return torch.stack([oy, ox], dim=1)


def frame_offsets(seed: int, video_id: str, frames: Sequence[int], views: int, grid: tuple[int, int],
                  ratio: float) -> Tensor:
    """The offsets of the ``views`` stored PEA views of frames ``frames`` of ``video_id``.

    ``(len(frames), views, 2)`` int64. Frame ``j`` draws its ``views`` offsets from a generator
    seeded by ``sha256(f"{seed}/{video_id}/{j}")``, so they do not depend on how frames were
    batched, on the rank or on a resume, and anyone can recompute them from the store header's
    seed.
    """
    out = torch.empty(len(frames), views, 2, dtype=torch.long)
    for i, j in enumerate(frames):
        digest = hashlib.sha256(f"{seed}/{video_id}/{int(j)}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        out[i] = draw_offsets(views, grid, ratio, g)
    return out


def pea_patch_pe(pe: Tensor, grid: tuple[int, int], ratio: float, offsets: Tensor) -> Tensor:
    """Windows of the upsampled patch PE.

    Args:
        pe: patch PE ``(H * W, D)``, row-major over the grid (no CLS entry).
        grid: ``(H, W)``.
        ratio: ``r``; the grid is upsampled to :func:`upsampled_size`.
        offsets: ``(N, 2)`` int ``(oy, ox)`` in upsampled patch units.

    Returns:
        ``(N, H * W, D)`` in ``pe``'s dtype: window ``n`` = ``up[oy:oy+H, ox:ox+W]`` row-major.
    """
    h, w = grid
    if pe.ndim != 2 or pe.shape[0] != h * w:
        raise PEAError(f"patch PE must be (H*W={h * w}, D), got {tuple(pe.shape)}")
    uh, uw = upsampled_size(grid, ratio)
    offsets = torch.as_tensor(offsets, dtype=torch.long)
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise PEAError(f"offsets must be (N, 2) rows (oy, ox), got {tuple(offsets.shape)}")
    if len(offsets) and (offsets.min() < 0 or offsets[:, 0].max() > uh - h or offsets[:, 1].max() > uw - w):
        raise PEAError(f"offsets must lie in [0, {uh - h}] x [0, {uw - w}] for grid {grid} and ratio {ratio}")
    d = pe.shape[1]
    grid_pe = pe.reshape(1, h, w, d).permute(0, 3, 1, 2)  # (1, D, H, W)
    up = F.interpolate(grid_pe, size=(uh, uw), mode="bicubic", align_corners=False)[0]  # (D, uh, uw)
    windows = [up[:, oy:oy + h, ox:ox + w] for oy, ox in offsets.tolist()]
    if not windows:
        return pe.new_zeros(0, h * w, d)
    return torch.stack(windows).permute(0, 2, 3, 1).reshape(len(windows), h * w, d).contiguous()


# --------------------------------------------------------------------------------------
# forwards with a given patch PE, one per backbone family
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PEFamily:
    """How one backbone family exposes its patch PE and runs with a replaced one."""

    patch_pe: Callable[[Backbone], Tensor]                       # -> (H*W, D)
    forward: Callable[[Backbone, Tensor, Tensor], Tensor]        # (bb, x (N,3,S,S), pe (N,H*W,D)) -> (N,L,C)


def _clip_patch_pe(bb: Backbone) -> Tensor:
    return bb.visual.positional_embedding[1:]


def _clip_forward(bb: Backbone, x: Tensor, pe: Tensor) -> Tensor:
    """open_clip ``VisionTransformer._embeds`` with ``positional_embedding[1:]`` = ``pe``, then
    ``transformer``, ``ln_post`` on all tokens, CLS dropped (``OpenClipViTBackbone``'s tokens)."""
    v = bb.visual
    x = v.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, H*W, width)
    cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    cls_pe = v.positional_embedding[:1].to(x.dtype).unsqueeze(0).expand(pe.shape[0], -1, -1)
    x = x + torch.cat([cls_pe, pe.to(x.dtype)], dim=1)
    x = v.patch_dropout(x)
    x = v.ln_pre(x)
    x = v.transformer(x)
    return v.ln_post(x)[:, 1:]


def _timm_patch_pe(bb: Backbone) -> Tensor:
    m = bb.model
    start = 0 if m.no_embed_class else m.num_prefix_tokens
    return m.pos_embed[0, start:]


def _timm_forward(bb: Backbone, x: Tensor, pe: Tensor) -> Tensor:
    """timm ``VisionTransformer.forward_features`` with the patch part of ``pos_embed`` = ``pe``
    (``_pos_embed`` logic: with ``no_embed_class`` (DINOv2-reg) the PE is added to the patches
    and CLS + registers are concatenated after, without PE; else prefix tokens are concatenated
    first and keep their own PE entries), prefix tokens dropped."""
    m = bb.model
    x = m.patch_embed(x)
    prefix = []
    if m.cls_token is not None:
        prefix.append(m.cls_token.expand(x.shape[0], -1, -1))
    if m.reg_token is not None:
        prefix.append(m.reg_token.expand(x.shape[0], -1, -1))
    if m.no_embed_class:
        x = x + pe
        x = torch.cat(prefix + [x], dim=1)
    else:
        prefix_pe = m.pos_embed[:, :m.num_prefix_tokens].expand(pe.shape[0], -1, -1)
        x = torch.cat(prefix + [x], dim=1)
        x = x + torch.cat([prefix_pe, pe], dim=1)
    x = m.pos_drop(x)
    x = m.patch_drop(x)
    x = m.norm_pre(x)
    x = m.blocks(x)
    x = m.norm(x)
    return x[:, m.num_prefix_tokens:]


def _check_timm(bb: Backbone) -> None:
    m = bb.model
    if getattr(m, "pos_embed", None) is None or getattr(m, "dynamic_img_size", False):
        raise PEAError(f"backbone {bb.name!r}: PEA needs a learned absolute PE at a fixed image size")


_FAMILIES: dict[type[nn.Module], _PEFamily] = {
    OpenClipViTBackbone: _PEFamily(_clip_patch_pe, _clip_forward),
    TimmViTBackbone: _PEFamily(_timm_patch_pe, _timm_forward),
}


def _family(bb: Backbone) -> _PEFamily:
    fam = _FAMILIES.get(type(bb))
    if fam is None:
        raise PEAError(
            f"backbone {bb.name!r} has no positional embedding, so it has no PEA return view; "
            f"use the plain return view (A' = A) instead"
        )
    if isinstance(bb, TimmViTBackbone):
        _check_timm(bb)
    return fam


def pea_supported(bb: Backbone) -> bool:
    """True when :func:`pea_forward` can run on ``bb`` (open_clip and timm ViTs)."""
    try:
        _family(bb)
    except PEAError:
        return False
    return True


def patch_pe(bb: Backbone) -> Tensor:
    """The backbone's patch PE ``(H * W, D)`` (no CLS / register entries), row-major."""
    return _family(bb).patch_pe(bb)


def pea_forward(bb: Backbone, x: Tensor, offsets: Tensor, ratio: float = DEFAULT_PEA_RATIO) -> Tensor:
    """The PEA return view: ``(N, 3, S, S)`` normalised images -> ``(N, H, W, C)`` float32.

    Sample ``n`` runs with the patch PE window at ``offsets[n]`` (``(N, 2)`` int, see
    :func:`pea_patch_pe`) of the grid upsampled by ``1 + ratio``; the token layout is that of
    ``bb(x)`` (after the final norm, prefix tokens dropped).
    """
    fam = _family(bb)
    bb._check_input(x)
    offsets = torch.as_tensor(offsets, dtype=torch.long)
    if offsets.shape[0] != x.shape[0]:
        raise PEAError(f"need one offset per image: {offsets.shape[0]} offsets for {x.shape[0]} images")
    h, w = bb.grid()
    pe = pea_patch_pe(fam.patch_pe(bb), (h, w), ratio, offsets).to(x.device)
    tokens = fam.forward(bb, x, pe)
    return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).float()
