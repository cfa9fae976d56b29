"""JHMDB keypoint propagation (Jhuang et al. 2013): frames plus 15 joint positions per frame.

Official layout (``Rename_Images.tar.gz``, ``joint_positions.zip``, ``splits.zip``)::

    <root>/Rename_Images/<class>/<video>/00001.png, 00002.png, ...    frames
    <root>/joint_positions/<class>/<video>/joint_positions.mat        pos_img: (2, 15, T) x, y
                                                                      in 1-based pixels
    <root>/splits/<class>_test_split<N>.txt                           "<video>.avi 1|2"
                                                                      (1 = train, 2 = test)

The split files have HMDB51's format. Label propagation is evaluated on the test videos
of split 1 (``split="test"``, ``split_number=1``). Each video references its MAT-file;
``pos_img`` must hold one column of joints per frame (problems reported together).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from manifests._common import Problems, abs_dir, fail, finish, read_lines
from manifests._dense import DENSE_BUILDERS, DenseVideo, frame_files, frames_size
from manifests.hmdb51 import CODES, SPLIT_FILE, SPLIT_NUMBERS
from manifests.matfile import MatFileError, read_mat

#: Joints per person in JHMDB's ``pos_img``.
NUM_JOINTS = 15
FRAME_EXTENSIONS = (".png", ".jpg")


def read_joints(path: str | os.PathLike) -> np.ndarray:
    """``(T, 15, 2)`` float64 joint ``(x, y)`` positions in 0-based pixels from a JHMDB
    ``joint_positions.mat`` (MATLAB's 1-based ``pos_img`` minus 1, as CRW reads them)."""
    mat = read_mat(path)
    pos = mat.get("pos_img")
    if not isinstance(pos, np.ndarray) or pos.ndim != 3 or pos.shape[0] != 2:
        got = "none" if pos is None else getattr(pos, "shape", type(pos).__name__)
        raise MatFileError(f"{path}: pos_img must be a (2, joints, frames) array, got {got}")
    return np.ascontiguousarray(pos.transpose(2, 1, 0).astype(np.float64) - 1.0)


@DENSE_BUILDERS.register("jhmdb")
def build_jhmdb(
    *,
    root: str | os.PathLike,
    split: str = "test",
    split_number: int = 1,
    check_sizes: bool = True,
) -> list[DenseVideo]:
    """Videos of one JHMDB split (sorted by class, then video).

    Args:
        root: folder holding ``Rename_Images``, ``joint_positions`` and ``splits``.
        split: ``test`` or ``train``.
        split_number: official split 1, 2 or 3.
        check_sizes: read every frame header and check the frames of a video agree.

    Raises:
        ManifestError: listing every problem found.
    """
    if split not in ("train", "test"):
        raise fail("jhmdb", f"split must be 'train' or 'test' (got {split!r})")
    if split_number not in SPLIT_NUMBERS:
        raise fail("jhmdb", f"split_number must be 1, 2 or 3 (got {split_number!r})")
    root_p = abs_dir(root)
    problems = Problems()
    hint = "check that --jhmdb is the folder holding Rename_Images/, joint_positions/ and splits/"
    split_dir = root_p / "splits"
    files = {}
    if split_dir.is_dir():
        for name in sorted(os.listdir(split_dir)):
            m = SPLIT_FILE.match(name)
            if m and int(m["n"]) == split_number:
                files[m["cls"]] = split_dir / name
    if not files:
        problems.add(f"no '<class>_test_split{split_number}.txt' files in {str(split_dir)!r}")
    videos: list[DenseVideo] = []
    for cls, path in sorted(files.items()):
        for lineno, text in read_lines(path, problems, "JHMDB split file"):
            parts = text.split()
            if len(parts) != 2 or parts[1] not in CODES:
                problems.add(f"{path.name} line {lineno}: expected '<video>.avi <0|1|2>', got {text!r}")
                continue
            if CODES[parts[1]] != split:
                continue
            v = _video(root_p, cls, os.path.splitext(parts[0])[0], split, check_sizes, problems)
            if v is not None:
                videos.append(v)
    finish("jhmdb", [v.row() for v in videos], problems, source=str(root_p), hint=hint)
    return videos


def _video(root: Path, cls: str, name: str, split: str, check_sizes: bool, problems: Problems) -> DenseVideo | None:
    vid = f"{cls}/{name}"
    mat = root / "joint_positions" / cls / name / "joint_positions.mat"
    frames = frame_files(root / "Rename_Images" / cls / name, FRAME_EXTENSIONS, vid, problems)
    if frames is None:
        return None
    try:
        joints = read_joints(mat)
    except MatFileError as e:
        problems.add(f"{vid}: {e}")
        return None
    if joints.shape[0] != len(frames):
        problems.add(f"{vid}: {mat.name} has joints for {joints.shape[0]} frames, the folder holds {len(frames)}")
    if joints.shape[1] != NUM_JOINTS:
        problems.add(f"{vid}: {mat.name} has {joints.shape[1]} joints, JHMDB has {NUM_JOINTS}")
    size = frames_size(frames, vid, problems) if check_sizes else (0, 0)
    return DenseVideo(
        video_id=vid,
        split=split,
        frames=tuple(str(f) for f in frames),
        labels=(str(mat),),
        label_frames=(),
        label_kind="jhmdb-joints",
        size=size,
    )
