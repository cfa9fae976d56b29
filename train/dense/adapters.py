"""What propagates for each kind of label, and how it becomes a result file.

A :class:`LabelAdapter` turns a video's given labels (frame 0) into grid distributions
``(h, w, L)`` and the propagated distributions ``(T, h, w, L)`` back into results in the
official layout. One adapter per :data:`manifests.dense.LABEL_KINDS` entry, in the
:data:`ADAPTERS` registry:

* ``davis-objects`` / ``vip-parts``: one channel per id present in the first label map
  (void 255 counts as background 0); results are the argmax of the distributions upsampled
  to the frame size, written as palette PNGs for every frame (frame 0 = the given map).
* ``jhmdb-joints``: one channel per joint, a Gaussian of ``sigma`` cells at the joint's
  grid position; a propagated joint is the mean of its ``topk`` strongest cells weighted by
  their mass (CRW's ``process_pose``), mapped back to pixels.

Grid and pixel coordinates: cell ``j`` of ``w`` spans pixels ``[j W / w, (j + 1) W / w)``;
pixel centre ``x`` sits at grid coordinate ``(x + 0.5) w / W - 0.5``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from manifests.dense import DenseVideo
from manifests.jhmdb import read_joints
from pipeline.labels import read_label_png
from pipeline.registry import Registry
from train.dense.metrics import VOID_LABEL
from train.dense.propagate import PropagationConfig, iter_grid_to_labels, labels_to_grid, propagate
from train.dense.results import write_joints, write_video_labels

__all__ = [
    "ADAPTERS",
    "LabelAdapter",
    "MaskAdapter",
    "JointAdapter",
    "adapter_for",
    "grid_to_pixels",
    "pixels_to_grid",
    "propagate_labels_of",
]


class LabelAdapter(Protocol):
    def first_grid(self, video: DenseVideo, grid: tuple[int, int], cfg: PropagationConfig) -> Tensor:
        """``(h, w, L)`` distributions of frame 0."""

    def write(self, video: DenseVideo, soft: Tensor, out_dir: str | os.PathLike, cfg: PropagationConfig) -> int:
        """Write the results of ``soft`` ``(T, h, w, L)``; returns files written."""


#: label kind -> adapter
ADAPTERS: Registry[LabelAdapter] = Registry("label kind")


def pixels_to_grid(xy: np.ndarray, size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """``(..., 2)`` pixel ``(x, y)`` -> grid ``(x, y)`` (cell centres at integers)."""
    (hh, ww), (gh, gw) = size, grid
    xy = np.asarray(xy, np.float64)
    return np.stack([(xy[..., 0] + 0.5) * gw / ww - 0.5, (xy[..., 1] + 0.5) * gh / hh - 0.5], -1)


def grid_to_pixels(xy: np.ndarray, size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`pixels_to_grid`."""
    (hh, ww), (gh, gw) = size, grid
    xy = np.asarray(xy, np.float64)
    return np.stack([(xy[..., 0] + 0.5) * ww / gw - 0.5, (xy[..., 1] + 0.5) * hh / gh - 0.5], -1)


@dataclass(frozen=True)
class MaskAdapter:
    """Object ids (DAVIS) or part classes (VIP) in label PNGs."""

    def values(self, video: DenseVideo) -> list[int]:
        first = read_label_png(video.labels[0])
        ids = set(np.unique(first).tolist()) - {VOID_LABEL}
        return sorted(ids | {0})

    def first_grid(self, video: DenseVideo, grid: tuple[int, int], cfg: PropagationConfig) -> Tensor:
        first = read_label_png(video.labels[0])
        first = np.where(first == VOID_LABEL, 0, first)
        return labels_to_grid(first, self.values(video), grid, cfg.label_downsample)

    def write(self, video: DenseVideo, soft: Tensor, out_dir: str | os.PathLike, cfg: PropagationConfig) -> int:
        size = _size(video)
        maps = iter_grid_to_labels(soft[1:], size, self.values(video), cfg.upsample)
        first = read_label_png(video.labels[0])
        n = write_video_labels(out_dir, video, [np.where(first == VOID_LABEL, 0, first)], start=0)
        return n + write_video_labels(out_dir, video, maps, start=1)


@dataclass(frozen=True)
class JointAdapter:
    """JHMDB joints: Gaussian heatmaps of ``sigma`` cells; read out by a top-``topk`` mean."""

    sigma: float = 0.5
    topk: int = 3

    def first_grid(self, video: DenseVideo, grid: tuple[int, int], cfg: PropagationConfig) -> Tensor:
        joints = read_joints(video.labels[0])[0]  # (J, 2)
        g = pixels_to_grid(joints, _size(video), grid)
        yy, xx = np.mgrid[0 : grid[0], 0 : grid[1]]
        d2 = (xx[..., None] - g[:, 0]) ** 2 + (yy[..., None] - g[:, 1]) ** 2  # (h, w, J)
        return torch.from_numpy(np.exp(-d2 / (2 * self.sigma**2))).float()

    def coords(self, soft: Tensor, size: tuple[int, int]) -> np.ndarray:
        """``(T, J, 2)`` pixel positions of ``soft`` ``(T, h, w, J)``."""
        t, h, w, j = soft.shape
        flat = soft.reshape(t, h * w, j)
        k = min(self.topk, h * w)
        vals, idx = torch.topk(flat, k, dim=1)  # (T, k, J)
        wts = vals / vals.sum(1, keepdim=True).clamp_min(1e-12)
        gx = ((idx % w).double() * wts).sum(1)
        gy = ((idx // w).double() * wts).sum(1)
        return grid_to_pixels(torch.stack([gx, gy], -1).numpy(), size, (h, w))

    def write(self, video: DenseVideo, soft: Tensor, out_dir: str | os.PathLike, cfg: PropagationConfig) -> int:
        pred = self.coords(soft, _size(video))
        pred[0] = read_joints(video.labels[0])[0]  # frame 0 is given
        write_joints(out_dir, video, pred)
        return 1


def _size(video: DenseVideo) -> tuple[int, int]:
    if video.size == (0, 0):
        first = read_label_png(video.labels[0]) if video.label_kind != "jhmdb-joints" else None
        if first is None:
            raise ValueError(f"{video.video_id}: frame size unknown; build the manifest with check_sizes=True")
        return first.shape[0], first.shape[1]
    return video.size


ADAPTERS.add("davis-objects", MaskAdapter())
ADAPTERS.add("vip-parts", MaskAdapter())
ADAPTERS.add("jhmdb-joints", JointAdapter())


def adapter_for(video: DenseVideo) -> LabelAdapter:
    return ADAPTERS.get(video.label_kind)


def propagate_labels_of(
    video: DenseVideo, feats: Tensor, cfg: PropagationConfig, device: torch.device | str | None = None
) -> Tensor:
    """Propagate ``video``'s frame-0 labels with its features ``(T, h, w, C)``: ``(T, h, w, L)``."""
    if feats.shape[0] != len(video.frames):
        raise ValueError(f"{video.video_id}: {feats.shape[0]} feature frames for {len(video.frames)} frames")
    first = adapter_for(video).first_grid(video, (feats.shape[1], feats.shape[2]), cfg)
    return propagate(feats, first, cfg, device)

