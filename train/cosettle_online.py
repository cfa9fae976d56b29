"""The online return view: A' computed during training by the frozen encoder, from the videos.

For stores extracted without PEA views (or to draw a fresh PEA window every step), the
dataset decodes frame ``t1`` of the video again (:class:`FrameSource`: the store header's
manifest, geometry, fps and segment; the frame's timestamp must equal the stored one) and
draws a window offset; the task's step runs the frozen backbone with that PEA window on the
device (:class:`OnlineEncoder`), under ``no_grad``. The backbone is rebuilt from the store
header and must have the store's weights (sha256; random-weight stores use the extraction's
seeded init).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from extract.config import ExtractConfig
from extract.decode import Geometry, iter_frames
from extract.encode import build_backbone
from extract.pea import PEAError, draw_offsets, pea_forward, pea_supported
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.manifest import read_manifest
from pipeline.pooling import compress
from pipeline.store import FeatureStore

__all__ = ["FrameSource", "OnlineEncoder", "OnlineViewError"]


class OnlineViewError(FreezeframeError):
    """The online return view cannot be computed (videos missing, other weights, no PE)."""


class FrameSource:
    """Decodes stored frame ``t`` of a video exactly as the extraction did: ``(S, S, 3)`` uint8."""

    def __init__(self, store: FeatureStore, manifest: str | None = None) -> None:
        self.store = store
        path = manifest or store.header.get("manifest_path")
        if not path or not Path(path).is_file():
            raise OnlineViewError(
                f"the online return view decodes the videos again, but the store's manifest {path!r} is not "
                f"readable; pass it with `--set cosettle.manifest=PATH`")
        self.rows = {r.video_id: r for r in read_manifest(path)}
        missing = [v for v in store.video_ids if v not in self.rows]
        if missing:
            raise OnlineViewError(f"{len(missing)} stored videos are not in the manifest {path} (e.g. {missing[0]!r})")
        content = store.content
        self.geometry = Geometry(**content["geometry"])
        self.fps = content.get("fps")

    def frame(self, video_id: str, t: int) -> np.ndarray:
        row = self.rows[video_id]
        pos = 0
        chunks = iter_frames(row.path, geometry=self.geometry, fps=self.fps, start=row.start, end=row.end,
                             chunk_size=min(64, t + 1))
        try:
            for chunk in chunks:
                if t < pos + len(chunk):
                    ts = float(chunk.timestamps[t - pos])
                    stored = float(self.store.timestamps(video_id)[t])
                    if abs(ts - stored) > 1e-6:
                        raise OnlineViewError(
                            f"{video_id}: frame {t} decodes at {ts:.6f} s but was stored at {stored:.6f} s; "
                            f"the video file changed since extraction")
                    return chunk.frames[t - pos].copy()
                pos += len(chunk)
        finally:
            chunks.close()
        raise OnlineViewError(f"{video_id}: only {pos} frames decode, the store has {self.store.num_frames(video_id)}")


class OnlineEncoder:
    """The store's frozen backbone on ``device``: PEA views of uint8 frames, pooled as stored."""

    def __init__(self, store: FeatureStore, ratio: float, device: torch.device) -> None:
        content = store.content
        extract_cfg = store.header.get("config", {})
        cfg = ExtractConfig(backbone=content["backbone"], weights=extract_cfg.get("weights"),
                            random_weights=content.get("weights_source") == "random",
                            image_size=extract_cfg.get("image_size"))
        bb = build_backbone(cfg)
        if bb.weights_sha256 != content.get("weights_sha256"):
            raise ConfigMismatchError(
                f"the backbone rebuilt for the online return view has weights {bb.weights_sha256} but the store "
                f"was extracted with {content.get('weights_sha256')}; the weights file changed")
        if not pea_supported(bb):
            raise PEAError(
                f"backbone {bb.name!r} has no positional embedding, so there is no online PEA view; use "
                f"`--set cosettle.return_view=plain` (A' = A)")
        self.backbone = bb.to(device).eval()
        self.ratio = ratio
        self.device = device
        self.spatial_pool, self.channel_pool = content.get("spatial_pool"), content.get("channel_pool")

    def offsets(self, rng: np.random.Generator) -> np.ndarray:
        """One window offset ``(2,)`` int64 drawn from the item's rng."""
        g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        return draw_offsets(1, self.backbone.grid(), self.ratio, g)[0].numpy()

    @torch.no_grad()
    def __call__(self, frames: Tensor, offsets: Tensor) -> Tensor:
        """``(B, S, S, 3)`` uint8, ``(B, 2)`` -> ``(B, H, W, C)`` float32 A' tokens."""
        x = self.backbone.prepare(frames.to(self.device))
        tokens = pea_forward(self.backbone, x, offsets.to(torch.long).cpu(), self.ratio)
        return compress(tokens, self.spatial_pool, self.channel_pool)
