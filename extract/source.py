"""Stage 1 without the store: features of chosen frames, decoded and encoded on demand.

:class:`OnlineFeatureSource` gives, for a video and frame indices, the ``(T, H, W, C)``
features the extraction would have stored for those frames: frame ``i`` is the ``i``-th frame
:func:`extract.decode.iter_frames` yields with the run's fps, segment and geometry, and the
frames go through the same frozen backbone, preprocessing and pooling
(:class:`extract.encode.FeatureEncoder`). Online training (decode + backbone in the loop, as
the released AdViSe code does) and the benchmarks use it; ``tests/test_source.py`` shows it
agrees with a store within the store dtype's rounding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from extract.backbones import Backbone
from extract.config import ExtractConfig
from extract.decode import Geometry, iter_frames
from extract.encode import FeatureEncoder, build_backbone
from pipeline.config import from_dict
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.manifest import ManifestRow, read_manifest
from pipeline.store import STORAGE_DTYPES, FeatureStore


class OnlineFeatureSource:
    """Decode frames of a video and run the frozen backbone on them, on demand.

    Args:
        cfg: the extraction config whose features to reproduce (backbone, weights, image
            size, fps, geometry, pooling, storage dtype, decode chunk size and threads).
        rows: the videos (manifest rows: path and optional ``[start, end)`` segment in seconds).
        backbone: an already built backbone (default: :func:`extract.encode.build_backbone`,
            i.e. the run's weights, a seeded random init with ``random_weights``).
        device: where the backbone runs.

    :meth:`frames` only decodes (no backbone: safe in DataLoader workers); :meth:`encode`
    only runs the backbone; :meth:`features` does both.
    """

    def __init__(self, cfg: ExtractConfig, rows: Sequence[ManifestRow], *, backbone: Backbone | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.rows = {r.video_id: r for r in rows}
        self.backbone = backbone if backbone is not None else build_backbone(cfg)
        # as extract.runner.run_extract derives it: the backbone's input side and interpolation
        self.geometry = Geometry(size=self.backbone.preprocess.size, mode=cfg.geometry,
                                 interpolation=cfg.interpolation or self.backbone.preprocess.interpolation)
        self.storage = STORAGE_DTYPES.get(cfg.dtype)
        self.encoder = FeatureEncoder(self.backbone, torch.device(device), cfg)

    @classmethod
    def for_store(cls, store: FeatureStore, rows: Sequence[ManifestRow] | None = None, *,
                  backbone: Backbone | None = None, device: str | torch.device = "cpu") -> "OnlineFeatureSource":
        """The source of ``store``'s features: its extraction config from the header, its
        manifest (``rows``, default: the manifest the store was extracted from). Refuses a
        backbone whose weights or preprocessing differ from the store's."""
        # the header keeps only the names of the storage options (never credentials): not a config value
        recorded = {k: v for k, v in store.header["config"].items() if k != "storage_options"}
        cfg = from_dict(ExtractConfig, recorded)
        if rows is None:
            manifest = Path(store.header.get("manifest_path") or cfg.manifest)
            if not manifest.is_file():
                raise FreezeframeError(f"the manifest of {store.path} ({manifest}) is gone; pass its rows explicitly")
            rows = read_manifest(manifest)
        src = cls(cfg, rows, backbone=backbone, device=device)
        content = store.content
        have = {"weights_sha256": src.backbone.weights_sha256, "preprocess": src.backbone.preprocess.to_dict(),
                "geometry": src.geometry.to_dict()}
        diff = [f"{k}: store {content.get(k)!r}, source {v!r}" for k, v in have.items() if content.get(k) != v]
        if diff:
            raise ConfigMismatchError(f"the backbone does not compute {store.path}'s features ("
                                      + "; ".join(diff) + "); pass the store's backbone (or none)")
        return src

    @property
    def video_ids(self) -> list[str]:
        return list(self.rows)

    def frames(self, video_id: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Frames ``indices`` of a video as ``(N, S, S, 3)`` uint8 RGB (in the order given,
        repeats allowed). Decoding streams chunk by chunk and stops after the last needed frame."""
        row = self.rows[video_id]
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            s = self.geometry.size
            return np.empty((0, s, s, 3), dtype=np.uint8)
        if idx.min() < 0:
            raise IndexError(f"negative frame index for {video_id!r}")
        need = np.unique(idx)
        kept: dict[int, np.ndarray] = {}
        pos = 0
        chunks = iter_frames(row.path, geometry=self.geometry, fps=self.cfg.fps, start=row.start, end=row.end,
                             chunk_size=self.cfg.chunk_size, threads=self.cfg.decode_threads)
        try:
            for chunk in chunks:
                n = len(chunk.frames)
                for j in need[(need >= pos) & (need < pos + n)]:
                    kept[int(j)] = chunk.frames[int(j) - pos].copy()
                pos += n
                if pos > need[-1]:
                    break
        finally:
            chunks.close()
        if len(kept) != len(need):
            raise IndexError(f"frame index {int(need[-1])} out of range [0, {pos}) for {video_id!r}")
        return np.stack([kept[int(j)] for j in idx])

    def encode(self, frames: np.ndarray, *, as_stored: bool = False) -> np.ndarray:
        """``(N, S, S, 3)`` uint8 frames -> ``(N, H, W, C)`` float32 features. ``as_stored``
        rounds them through the storage dtype (float16, int8) as a store would."""
        x = self.encoder(frames)
        return self.storage.decode(self.storage.encode(x)) if as_stored else x

    def features(self, video_id: str, indices: Sequence[int] | np.ndarray, *, as_stored: bool = False) -> np.ndarray:
        """Features ``(N, H, W, C)`` float32 of frames ``indices`` of a video (what
        ``store.features(video_id, indices)`` returns, see :meth:`encode` for ``as_stored``)."""
        return self.encode(self.frames(video_id, indices), as_stored=as_stored)


__all__ = ["OnlineFeatureSource"]
