"""Classification metrics for stage 2: top-k, confusion matrix, per-class accuracy, EvalResult.

Pure torch / numpy, no I/O besides ``EvalResult.save`` / ``EvalResult.load``. Accuracies are
fractions in [0, 1]; the report prints them as percentages.

Layouts:
    logits       (N, K) float   one row per clip or per video (already averaged over views)
    targets      (N,)   int     class index in [0, K)
    confusion    (K, K) int64   rows = true class, columns = predicted class
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.fileio import atomic_write_json

__all__ = [
    "topk_correct",
    "confusion_matrix",
    "per_class_accuracy",
    "EvalResult",
    "evaluate_logits",
]


def _check_logits_targets(logits: Tensor, targets: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be (N,) with N = {logits.shape[0]} (rows of logits), got shape {tuple(targets.shape)}"
        )
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one class column")


def topk_correct(logits: Tensor, targets: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose target is among the k highest logits, for every k in ``ks``.

    Args:
        logits: ``(N, K)`` scores.
        targets: ``(N,)`` integer class indices in ``[0, K)``.
        ks: the k values; a k larger than K is clamped to K (so top-5 of a 4-way task is 100 %).

    Returns:
        ``{k: count}`` keyed by the requested k (not the clamped one); counts are Python ints.
    """
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    _check_logits_targets(logits, targets)
    n, num_classes = logits.shape
    if n == 0:
        return {k: 0 for k in ks}
    targets = targets.to(device=logits.device, dtype=torch.long)
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got range [{int(targets.min())}, {int(targets.max())}]")
    maxk = min(max(ks), num_classes)
    top = logits.detach().topk(maxk, dim=1).indices  # (N, maxk), best first
    hit = top.eq(targets[:, None])  # (N, maxk), at most one True per row
    cum = hit.cumsum(dim=1).clamp_(max=1).sum(dim=0)  # (maxk,) rows correct within the first j+1
    return {k: int(cum[min(k, num_classes) - 1]) for k in ks}


def confusion_matrix(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts; ``conf[t, p]`` = number of samples of true class t predicted as p.

    Args:
        preds: ``(N,)`` predicted class indices in ``[0, K)``.
        targets: ``(N,)`` true class indices in ``[0, K)``.
        num_classes: K.
    """
    preds = np.asarray(preds)
    targets = np.asarray(targets)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if preds.ndim != 1 or targets.shape != preds.shape:
        raise ValueError(f"preds and targets must be (N,) arrays of equal length, got {preds.shape} and {targets.shape}")
    k = int(num_classes)
    if preds.size == 0:
        return np.zeros((k, k), dtype=np.int64)
    for what, a in (("preds", preds), ("targets", targets)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{what} must hold integer class indices, got dtype {a.dtype}")
        if a.min() < 0 or a.max() >= k:
            raise ValueError(f"{what} must lie in [0, {k}), got range [{a.min()}, {a.max()}]")
    flat = targets.astype(np.int64) * k + preds.astype(np.int64)
    return np.bincount(flat, minlength=k * k).reshape(k, k).astype(np.int64)


def per_class_accuracy(conf: np.ndarray) -> np.ndarray:
    """``(K,)`` recall of each true class: ``conf[c, c] / conf[c, :].sum()``; NaN for a class with no samples."""
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"conf must be a square (K, K) matrix, got shape {conf.shape}")
    support = conf.sum(axis=1).astype(np.float64)
    out = np.full(conf.shape[0], np.nan, dtype=np.float64)
    np.divide(np.diag(conf).astype(np.float64), support, out=out, where=support > 0)
    return out


def _nan_to_none(values: Sequence[float]) -> list[float | None]:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v) for v in values]


def _none_to_nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


@dataclass
class EvalResult:
    """Final evaluation of a fine-tuned model (``RUN/eval.json``).

    Attributes:
        top1, top5: video-level accuracies, fractions in [0, 1] (top-5 clamps k to K).
        per_class: ``(K,)`` per-class accuracy (recall), NaN for classes absent from the split
            (written to JSON as ``null``).
        confusion: ``(K, K)`` counts, rows = true class, columns = predicted class.
        class_names: the K class names, in class-index order.
        num_videos: N, the number of evaluated videos.
        views: test views (clips) averaged per video.
        video_ids, predictions, targets: per video (same order), the id, the predicted and the
            true class, so two runs on the same test videos can be compared pairwise (McNemar,
            ``train.significance``); empty in results written before they were recorded.
        spatial_crops: spatial crops per clip among the ``views`` (3: the 30-view test), and
            ``crops_note`` why (``test.spatial_crops``, e.g. "auto: ...").
        centre_top1, centre_predictions: with ``spatial_crops`` > 1, the top-1 and per-video
            predictions of the centre crops alone (``views / spatial_crops`` views: the 10-view
            test), from the same logits; None / empty otherwise.
    """

    top1: float
    top5: float
    per_class: list[float]
    confusion: list[list[int]]
    class_names: list[str]
    num_videos: int
    views: int = 1
    video_ids: list[str] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    spatial_crops: int = 1
    crops_note: str = ""
    centre_top1: float | None = None
    centre_predictions: list[int] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def confusion_array(self) -> np.ndarray:
        """The confusion matrix as a ``(K, K)`` int64 array."""
        return np.asarray(self.confusion, dtype=np.int64).reshape(self.num_classes, self.num_classes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN per-class values become ``null``); write it with ``json.dump``."""
        d = asdict(self)
        d["per_class"] = _nan_to_none(self.per_class)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> "EvalResult":
        """Inverse of :meth:`to_json`; also accepts the JSON text itself."""
        if isinstance(data, str):
            data = json.loads(data)
        if isinstance(data, str):  # tolerate a double-encoded file
            data = json.loads(data)
        missing = [k for k in ("top1", "top5", "per_class", "confusion", "class_names", "num_videos") if k not in data]
        if missing:
            raise ValueError(f"evaluation result is missing {missing}; re-run `freezeframe evaluate` to rewrite it")
        return cls(
            top1=float(data["top1"]),
            top5=float(data["top5"]),
            per_class=_none_to_nan(data["per_class"]),
            confusion=[[int(c) for c in row] for row in data["confusion"]],
            class_names=[str(c) for c in data["class_names"]],
            num_videos=int(data["num_videos"]),
            views=int(data.get("views", 1)),
            video_ids=[str(v) for v in data.get("video_ids", [])],
            predictions=[int(p) for p in data.get("predictions", [])],
            targets=[int(t) for t in data.get("targets", [])],
            spatial_crops=int(data.get("spatial_crops", 1)),
            crops_note=str(data.get("crops_note", "")),
            centre_top1=None if data.get("centre_top1") is None else float(data["centre_top1"]),
            centre_predictions=[int(p) for p in data.get("centre_predictions", [])],
        )

    def summary(self) -> dict[str, float]:
        """Headline numbers (fractions in [0, 1]) for metric lines and ``summary.json``
        (``top1_centre``: the centre-crop-only top-1, with several spatial crops)."""
        out = {"top1": self.top1, "top5": self.top5}
        if self.centre_top1 is not None:
            out["top1_centre"] = self.centre_top1
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``to_json()`` to ``path`` atomically (readers never see half a file)."""
        return atomic_write_json(path, self.to_json(), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "EvalResult":
        return cls.from_json(json.loads(Path(path).read_text()))


def evaluate_logits(
    video_logits: Tensor, targets: Tensor, class_names: Sequence[str], views: int = 1,
    video_ids: Sequence[str] = (),
) -> EvalResult:
    """Metrics of video-level predictions.

    Args:
        video_logits: ``(N, K)`` logits (or probabilities) already averaged over the views of each video.
        targets: ``(N,)`` true class indices in ``[0, K)``.
        class_names: K names in class-index order.
        views: number of views averaged per video (recorded, not used in the computation).
        video_ids: the N video ids in row order (recorded with the per-video predictions).
    """
    _check_logits_targets(video_logits, targets)
    n, k = video_logits.shape
    if n == 0:
        raise ValueError("no videos to evaluate: the evaluation split is empty (check data.split / the manifest)")
    if len(class_names) != k:
        raise ValueError(f"got {len(class_names)} class names for {k} logit columns")
    counts = topk_correct(video_logits, targets, ks=(1, 5))
    preds = video_logits.detach().argmax(dim=1).cpu().numpy()
    true = targets.detach().cpu().numpy().astype(np.int64)
    conf = confusion_matrix(preds, true, k)
    if video_ids and len(video_ids) != n:
        raise ValueError(f"got {len(video_ids)} video ids for {n} rows of logits")
    return EvalResult(
        top1=counts[1] / n,
        top5=counts[5] / n,
        per_class=[float(v) for v in per_class_accuracy(conf)],
        confusion=conf.tolist(),
        class_names=[str(c) for c in class_names],
        num_videos=int(n),
        views=int(views),
        video_ids=[str(v) for v in video_ids],
        predictions=[int(p) for p in preds],
        targets=[int(t) for t in true],
    )
