"""Results folders in the official layouts, and scoring them against a dense manifest.

* DAVIS / VIP: ``DIR/<video_id>/<frame>.png`` palette PNGs of ids, one per frame, named
  like the frame (the layout the DAVIS evaluation and benchmark server read).
* JHMDB: ``DIR/<video_id>/joints.json`` = ``{"joints": [[[x, y], ...15], ...T]}`` in
  0-based pixels.

:func:`score_davis` / :func:`score_vip` / :func:`score_jhmdb` read any results folder in
that layout (ours or another method's) and report every missing or malformed file at once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from manifests.dense import DenseVideo
from manifests.jhmdb import read_joints
from pipeline.errors import FreezeframeError
from pipeline.fileio import atomic_write_json
from pipeline.labels import LabelFileError, read_label_png, write_label_png
from train.dense.metrics import (
    DavisScores,
    DenseEvalError,
    PartConfusion,
    PCKResult,
    evaluate_sequence,
    pck,
    pck_distances,
    summarize_davis,
)

__all__ = [
    "result_path",
    "write_video_labels",
    "read_video_labels",
    "read_ground_truth",
    "write_joints",
    "read_joints_result",
    "score_davis",
    "score_vip",
    "score_jhmdb",
    "write_copy_first",
]

JOINTS_FILE = "joints.json"


def result_path(out_dir: str | os.PathLike, video: DenseVideo, frame_index: int) -> Path:
    """``DIR/<video_id>/<frame>.png`` of one frame."""
    return Path(out_dir) / video.video_id / f"{video.frame_names[frame_index]}.png"


def write_video_labels(
    out_dir: str | os.PathLike, video: DenseVideo, labels: Iterable[np.ndarray], start: int = 0
) -> int:
    """Write label maps ``(H, W)`` of frames ``start, start + 1, ...`` as palette PNGs.

    Returns the number of frames written."""
    n = 0
    for i, lab in enumerate(labels, start):
        write_label_png(result_path(out_dir, video, i), lab)
        n += 1
    return n


def read_video_labels(
    results_dir: str | os.PathLike, video: DenseVideo, frames: Sequence[int], problems: list[str]
) -> np.ndarray | None:
    """``(len(frames), H, W)`` uint8 result ids of the given frames; missing or unreadable
    files are appended to ``problems`` (and None returned)."""
    out, bad = [], False
    for i in frames:
        try:
            out.append(read_label_png(result_path(results_dir, video, i)))
        except LabelFileError as e:
            problems.append(str(e))
            bad = True
    if bad or not out:
        return None
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        problems.append(f"{video.video_id}: result frames differ in size {sorted(shapes)}")
        return None
    return np.stack(out)


def read_ground_truth(video: DenseVideo) -> np.ndarray:
    """``(len(video.labels), H, W)`` uint8 ids of every label PNG of a DAVIS / VIP video."""
    return np.stack([read_label_png(p) for p in video.labels])


def _need_full_labels(video: DenseVideo) -> None:
    if video.label_frames != tuple(range(len(video.frames))):
        raise DenseEvalError(
            f"{video.video_id}: scoring needs a label for every frame (split {video.split!r} has "
            f"{len(video.label_frames)} of {len(video.frames)}); score train or val"
        )


def score_davis(videos: Sequence[DenseVideo], results_dir: str | os.PathLike, bound_th: float = 0.008) -> DavisScores:
    """Official DAVIS-2017 semi-supervised scores of a results folder.

    Raises:
        DenseEvalError: listing every missing, unreadable or mis-sized result file.
    """
    problems: list[str] = []
    seqs = []
    for v in videos:
        _need_full_labels(v)
        gt = read_ground_truth(v)
        res = read_video_labels(results_dir, v, range(1, len(v.frames) - 1), problems)
        if res is None:
            continue
        try:
            seqs.append(evaluate_sequence(v.video_id, gt, res, bound_th=bound_th))
        except DenseEvalError as e:
            problems.append(str(e))
    if problems:
        raise _problems(results_dir, problems)
    return summarize_davis(seqs)


def score_vip(videos: Sequence[DenseVideo], results_dir: str | os.PathLike, num_classes: int = 20) -> PartConfusion:
    """VIP part mIoU of a results folder (every frame but the first, which is given)."""
    problems: list[str] = []
    conf = PartConfusion(num_classes)
    for v in videos:
        _need_full_labels(v)
        res = read_video_labels(results_dir, v, range(1, len(v.frames)), problems)
        if res is None:
            continue
        gt = read_ground_truth(v)[1:]
        if gt.shape != res.shape:
            problems.append(f"{v.video_id}: results are {res.shape[1:]}, labels {gt.shape[1:]}")
            continue
        try:
            conf.add(gt, res)
        except DenseEvalError as e:
            problems.append(f"{v.video_id}: {e}")
    if problems:
        raise _problems(results_dir, problems)
    return conf


def write_joints(out_dir: str | os.PathLike, video: DenseVideo, joints: np.ndarray) -> Path:
    """Write ``(T, J, 2)`` predicted joint positions (0-based pixels) of one video."""
    return atomic_write_json(Path(out_dir) / video.video_id / JOINTS_FILE, {"joints": np.asarray(joints).tolist()}, indent=None)


def read_joints_result(results_dir: str | os.PathLike, video: DenseVideo) -> np.ndarray:
    path = Path(results_dir) / video.video_id / JOINTS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            return np.asarray(json.load(f)["joints"], dtype=np.float64)
    except FileNotFoundError:
        raise DenseEvalError(f"missing result file {str(path)!r}") from None
    except (ValueError, KeyError) as e:
        raise DenseEvalError(f"{path}: malformed joints file ({e})") from None


def score_jhmdb(videos: Sequence[DenseVideo], results_dir: str | os.PathLike, alpha: float = 0.1) -> PCKResult:
    """PCK@alpha of a JHMDB results folder."""
    problems: list[str] = []
    dists = []
    for v in videos:
        try:
            pred = read_joints_result(results_dir, v)
            dists.append(pck_distances(pred, read_joints(v.labels[0])))
        except (DenseEvalError, FreezeframeError) as e:
            problems.append(f"{v.video_id}: {e}")
    if problems:
        raise _problems(results_dir, problems)
    return pck(dists, alpha)


def _problems(results_dir: str | os.PathLike, problems: list[str]) -> DenseEvalError:
    head = f"results in {str(results_dir)!r}: {len(problems)} problem(s); write DIR/<video>/<frame>.png for every scored frame"
    return DenseEvalError("\n".join([head] + [f"  - {p}" for p in problems]))


def write_copy_first(out_dir: str | os.PathLike, video: DenseVideo) -> int:
    """The trivial baseline: every frame's result is frame 0's label map (void -> 0)."""
    first = read_label_png(video.labels[0])
    first = np.where(first == 255, 0, first).astype(np.uint8)
    return write_video_labels(out_dir, video, (first for _ in video.frames))
