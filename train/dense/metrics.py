"""Dense-correspondence metrics: DAVIS-2017 J and F, JHMDB PCK, VIP mIoU.

Written from the definitions of the official evaluations so that scores are comparable
with published ones:

* **DAVIS-2017 semi-supervised** (``davis2017-evaluation``): objects are the ids ``1..K``
  of the *first* ground-truth frame (void 255 counts as background); the first and the
  last frame of every sequence are not scored. Per object and frame, J is the region IoU
  (1 when the object is absent from both masks) and F the boundary F-measure: one-pixel
  boundaries (:func:`seg2bmap`), each dilated by a disk of radius
  ``ceil(bound_th * image diagonal)`` pixels (``bound_th = 0.008``), precision = matched
  predicted boundary / predicted boundary, recall likewise; an empty boundary on one side
  gives P, R = (1, 0) or (0, 1), empty on both gives (1, 1). Per object the mean over
  frames (NaNs ignored), recall (fraction > 0.5) and decay (first quarter minus last
  quarter) follow ``db_statistics``; ``J_mean`` / ``F_mean`` are means over all objects of
  all sequences and ``JF_mean`` their average. A result that uses an id above K is an
  error; ids missing from a result are empty masks.
* **JHMDB PCK@alpha** (the CRW/UVC keypoint-propagation evaluation): a predicted joint is
  correct when its distance to the ground truth is at most ``alpha`` times
  ``0.6 * diagonal of the ground-truth joints' bounding box`` in that frame; the first frame
  (given) is not scored; PCK is computed per joint over all frames of all videos and
  averaged over joints.
* **VIP mIoU**: one confusion matrix over every scored pixel of every frame (label 255
  ignored); IoU per class = TP / (TP + FP + FN); the mean is over classes that occur in the
  ground truth or the predictions.

Layouts: label maps are ``(H, W)`` or ``(T, H, W)`` integer arrays of object / class ids;
binary masks are ``(H, W)`` bool; keypoints are ``(T, J, 2)`` float ``(x, y)`` pixels.
Scores are fractions in [0, 1].
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from pipeline.errors import FreezeframeError
from train.metrics import confusion_matrix

__all__ = [
    "VOID_LABEL",
    "BOUND_TH",
    "DenseEvalError",
    "seg2bmap",
    "boundary_radius",
    "dilate_disk",
    "region_iou",
    "boundary_f",
    "db_statistics",
    "ObjectScores",
    "SequenceScores",
    "DavisScores",
    "evaluate_sequence",
    "summarize_davis",
    "pck_distances",
    "PCKResult",
    "pck",
    "PartConfusion",
]

#: Label of void / "don't care" pixels in DAVIS and VIP annotations.
VOID_LABEL = 255
#: Official DAVIS boundary tolerance as a fraction of the image diagonal.
BOUND_TH = 0.008


class DenseEvalError(FreezeframeError):
    """Results cannot be scored against the ground truth (missing frame, wrong size, bad id)."""


# --------------------------------------------------------------------------- DAVIS J and F


def region_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """Region similarity J of two ``(H, W)`` binary masks; 1.0 when both are empty."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise DenseEvalError(f"mask shapes differ: ground truth {gt.shape}, result {pred.shape}")
    union = int(np.count_nonzero(gt | pred))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(gt & pred)) / union


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map ``(H, W)`` bool of a binary mask ``(H, W)``.

    A pixel is on the boundary when it differs from its east, south or south-east
    neighbour (boundaries sit half a pixel towards the origin); in the last row only the
    east neighbour counts, in the last column only the south one, and the bottom-right
    pixel is never a boundary pixel. Same definition as the Berkeley / DAVIS ``seg2bmap``.
    """
    seg = np.asarray(seg, bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_radius(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """Dilation radius in pixels: ``ceil(bound_th * hypot(H, W))`` if ``bound_th < 1``, else
    ``bound_th`` itself (which must then be a whole number of pixels)."""
    if bound_th >= 1:
        if float(bound_th) != int(bound_th):
            raise ValueError(f"a boundary tolerance >= 1 is a pixel count and must be whole, got {bound_th}")
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``(H, W)`` bool by the disk ``{dx^2 + dy^2 <= radius^2}``.

    Pixels outside the image contribute nothing (as ``cv2.dilate``'s default border).
    Exact: the disk is a stack of horizontal runs of half-width ``isqrt(r^2 - dy^2)``;
    each run is a sliding-window OR computed with integer prefix sums.
    """
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    r = int(radius)
    if r <= 0:
        return mask.copy()
    # prefix sums along x, padded so window [x - a, x + a] is cs[x + a + 1] - cs[x - a]
    cs = np.zeros((h, w + 2 * r + 1), dtype=np.int32)
    cs[:, r + 1 : r + 1 + w] = mask
    cs = np.cumsum(cs, axis=1)
    out = np.zeros_like(mask)
    runs: dict[int, np.ndarray] = {}
    for dy in range(-r, r + 1):
        a = math.isqrt(r * r - dy * dy)
        if a not in runs:
            x = np.arange(w)
            runs[a] = (cs[:, x + r + a + 1] - cs[:, x + r - a]) > 0
        run = runs[a]
        # out[y] |= run[y + dy]
        if dy >= 0:
            out[: h - dy] |= run[dy:]
        else:
            out[-dy:] |= run[: h + dy]
    return out


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of two ``(H, W)`` binary masks (official DAVIS definition)."""
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise DenseEvalError(f"mask shapes differ: ground truth {gt.shape}, result {pred.shape}")
    r = boundary_radius(gt.shape, bound_th)
    fg_b = seg2bmap(pred)
    gt_b = seg2bmap(gt)
    n_fg = int(np.count_nonzero(fg_b))
    n_gt = int(np.count_nonzero(gt_b))
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = int(np.count_nonzero(fg_b & dilate_disk(gt_b, r))) / n_fg
        recall = int(np.count_nonzero(gt_b & dilate_disk(fg_b, r))) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_statistics(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, recall, decay)`` of per-frame scores, NaNs ignored (official ``db_statistics``).

    Recall is the fraction of frames scoring above 0.5; decay is the mean of the first of
    four equal bins of frames minus the mean of the last (bins share their edge frames).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # mean of an all-NaN bin
        m = float(np.nanmean(v))
        rec = float(np.nanmean(v > 0.5))
        ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
        bins = [v[ids[i] : ids[i + 1] + 1] for i in range(4)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return m, rec, decay


@dataclass(frozen=True)
class ObjectScores:
    """Per-frame J and F of one object of one sequence (frames 1 .. T-2), and their stats."""

    sequence: str
    object_id: int
    J: tuple[float, ...]
    F: tuple[float, ...]

    @property
    def name(self) -> str:
        """The official per-object name ``<sequence>_<id>``."""
        return f"{self.sequence}_{self.object_id}"

    def stats(self) -> dict[str, float]:
        jm, jr, jd = db_statistics(self.J)
        fm, fr, fd = db_statistics(self.F)
        return {"J_mean": jm, "J_recall": jr, "J_decay": jd, "F_mean": fm, "F_recall": fr, "F_decay": fd}


@dataclass(frozen=True)
class SequenceScores:
    """Scores of every object of one sequence."""

    sequence: str
    objects: tuple[ObjectScores, ...]

    def summary(self) -> dict[str, float]:
        """Means over this sequence's objects of the per-object J and F means."""
        if not self.objects:
            return {"J_mean": float("nan"), "F_mean": float("nan"), "JF_mean": float("nan")}
        stats = [o.stats() for o in self.objects]
        j = float(np.mean([s["J_mean"] for s in stats]))
        f = float(np.mean([s["F_mean"] for s in stats]))
        return {"J_mean": j, "F_mean": f, "JF_mean": (j + f) / 2}


def _as_labels(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3:
        raise DenseEvalError(f"{what} must be (T, H, W) label maps, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise DenseEvalError(f"{what} must hold integer ids, got dtype {a.dtype}")
    return a


def evaluate_sequence(
    sequence: str,
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    bound_th: float = BOUND_TH,
    num_objects: int | None = None,
) -> SequenceScores:
    """J and F of every object of one semi-supervised DAVIS sequence.

    Args:
        sequence: its name.
        gt: ``(T, H, W)`` ground-truth ids of *all* T frames (255 = void, counted as 0).
        pred: ``(T - 2, H, W)`` result ids of frames ``1 .. T-2`` (the first frame is given,
            the last is not scored), or ``(T, H, W)`` of which the same frames are used.
        bound_th: boundary tolerance (fraction of the diagonal, or pixels if >= 1).
        num_objects: objects to score (default: the largest id of the first gt frame).

    Raises:
        DenseEvalError: shapes disagree, or a result uses an id above ``num_objects``.
    """
    gt = _as_labels(gt, f"{sequence}: ground truth").astype(np.int64)
    pred = _as_labels(pred, f"{sequence}: results").astype(np.int64)
    gt = np.where(gt == VOID_LABEL, 0, gt)
    t = gt.shape[0]
    if t < 3:
        raise DenseEvalError(f"{sequence}: {t} ground-truth frame(s); DAVIS scores frames 1 .. T-2, so T >= 3")
    k = int(gt[0].max()) if num_objects is None else int(num_objects)
    gt_s = gt[1:-1]
    if pred.shape[0] == t:
        pred = pred[1:-1]
    if pred.shape != gt_s.shape:
        raise DenseEvalError(
            f"{sequence}: results have shape {pred.shape}, ground truth frames 1..T-2 {gt_s.shape}"
        )
    top = int(pred.max()) if pred.size else 0
    if top > k:
        raise DenseEvalError(
            f"{sequence}: results use object id {top} but the sequence has {k} object(s); "
            "ids must match the first frame's annotation"
        )
    objects = []
    for obj in range(1, k + 1):
        js, fs = [], []
        for g, p in zip(gt_s == obj, pred == obj):
            js.append(region_iou(g, p))
            fs.append(boundary_f(g, p, bound_th))
        objects.append(ObjectScores(sequence, obj, tuple(js), tuple(fs)))
    return SequenceScores(sequence, tuple(objects))


@dataclass(frozen=True)
class DavisScores:
    """Dataset-level DAVIS scores (official definitions, fractions in [0, 1])."""

    J_mean: float
    J_recall: float
    J_decay: float
    F_mean: float
    F_recall: float
    F_decay: float
    JF_mean: float
    per_sequence: dict[str, dict[str, float]] = field(default_factory=dict)
    per_object: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The ``--json`` object: ``J_mean``, ``F_mean``, ``JF_mean``, ``per_sequence``, ..."""
        return {
            "JF_mean": self.JF_mean,
            "J_mean": self.J_mean,
            "J_recall": self.J_recall,
            "J_decay": self.J_decay,
            "F_mean": self.F_mean,
            "F_recall": self.F_recall,
            "F_decay": self.F_decay,
            "per_sequence": self.per_sequence,
            "per_object": self.per_object,
        }

    def summary(self) -> dict[str, float]:
        return {"JF_mean": self.JF_mean, "J_mean": self.J_mean, "F_mean": self.F_mean}


def summarize_davis(sequences: Iterable[SequenceScores]) -> DavisScores:
    """Dataset means over all objects of all sequences (as ``davis2017-evaluation`` prints)."""
    seqs = list(sequences)
    per_object: dict[str, dict[str, float]] = {}
    for s in seqs:
        for o in s.objects:
            per_object[o.name] = o.stats()
    if not per_object:
        raise DenseEvalError("no object to score: every sequence's first frame is empty")
    cols = {k: float(np.mean([v[k] for v in per_object.values()])) for k in next(iter(per_object.values()))}
    return DavisScores(
        J_mean=cols["J_mean"],
        J_recall=cols["J_recall"],
        J_decay=cols["J_decay"],
        F_mean=cols["F_mean"],
        F_recall=cols["F_recall"],
        F_decay=cols["F_decay"],
        JF_mean=(cols["J_mean"] + cols["F_mean"]) / 2,
        per_sequence={s.sequence: s.summary() for s in seqs},
        per_object=per_object,
    )


# --------------------------------------------------------------------------- JHMDB PCK


def pck_distances(pred: np.ndarray, gt: np.ndarray, *, skip_first: bool = True) -> np.ndarray:
    """Normalised joint distances ``(T', J)`` of one video.

    Args:
        pred: ``(T, J, 2)`` predicted ``(x, y)`` pixels.
        gt: ``(T, J, 2)`` ground-truth ``(x, y)`` pixels.
        skip_first: drop frame 0 (it is given to the propagation).

    Returns:
        ``|pred - gt| / (0.6 * diagonal of gt's bounding box in that frame)``.
    """
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise DenseEvalError(f"keypoints must be (T, J, 2) of equal shape, got {pred.shape} and {gt.shape}")
    if skip_first:
        pred, gt = pred[1:], gt[1:]
    span = gt.max(axis=1) - gt.min(axis=1)  # (T, 2)
    norm = 0.6 * np.hypot(span[:, 0], span[:, 1])  # (T,)
    d = np.hypot(*(pred - gt).transpose(2, 0, 1))  # (T, J)
    with np.errstate(divide="ignore", invalid="ignore"):
        return d / norm[:, None]


@dataclass(frozen=True)
class PCKResult:
    """PCK per joint and its mean over joints (fractions), at threshold ``alpha``."""

    alpha: float
    per_joint: tuple[float, ...]
    mean: float

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "PCK": self.mean, "per_joint": list(self.per_joint)}


def pck(distances: Iterable[np.ndarray], alpha: float = 0.1) -> PCKResult:
    """PCK@alpha from the :func:`pck_distances` of every video (pooled per joint)."""
    d = [np.asarray(x, np.float64) for x in distances]
    if not d:
        raise DenseEvalError("no video to score")
    allv = np.concatenate(d, axis=0)  # (sum T', J)
    if allv.shape[0] == 0:
        raise DenseEvalError("no frame to score (every video has a single frame)")
    per_joint = tuple(float(np.mean(allv[:, j] <= alpha)) for j in range(allv.shape[1]))
    return PCKResult(alpha=float(alpha), per_joint=per_joint, mean=float(np.mean(per_joint)))


# --------------------------------------------------------------------------- VIP mIoU


class PartConfusion:
    """Confusion matrix over the part classes ``0 .. K-1`` of every scored pixel.

    ``add(gt, pred)`` accumulates one frame (or a stack); ``VOID_LABEL`` pixels of the
    ground truth are ignored. ``iou()`` gives per-class IoU (NaN for classes absent from
    both ground truth and predictions); ``miou()`` their mean over present classes.
    """

    def __init__(self, num_classes: int, ignore: int = VOID_LABEL) -> None:
        self.num_classes = int(num_classes)
        self.ignore = ignore
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        gt = np.asarray(gt).reshape(-1)
        pred = np.asarray(pred).reshape(-1)
        if gt.shape != pred.shape:
            raise DenseEvalError(f"label maps differ in size: {gt.size} vs {pred.size}")
        keep = gt != self.ignore
        gt, pred = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
        if pred.size and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise DenseEvalError(f"predicted class outside [0, {self.num_classes}): range [{pred.min()}, {pred.max()}]")
        if gt.size and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise DenseEvalError(f"ground-truth class outside [0, {self.num_classes}) and not {self.ignore}")
        self.matrix += confusion_matrix(pred, gt, self.num_classes)

    def iou(self) -> np.ndarray:
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        v = self.iou()
        if np.all(np.isnan(v)):
            raise DenseEvalError("no pixel scored")
        return float(np.nanmean(v))

    def to_json(self, class_names: Mapping[int, str] | Sequence[str] | None = None) -> dict:
        iou = self.iou()
        names = [str(c) if class_names is None else str(class_names[c]) for c in range(self.num_classes)]
        return {"mIoU": self.miou(), "per_class": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)}}
