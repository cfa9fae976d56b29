"""DAVIS-2017 semi-supervised video object segmentation (Pont-Tuset et al. 2017).

Official layout (``DAVIS-2017-trainval-480p.zip``; test-dev has the same folders)::

    <root>/ImageSets/2017/{train,val,test-dev,test-challenge}.txt   one sequence name per line
    <root>/JPEGImages/480p/<seq>/00000.jpg, 00001.jpg, ...          frames
    <root>/Annotations/480p/<seq>/00000.png, ...                    palette PNGs: 0 background,
                                                                    1..K objects, 255 void

``train`` and ``val`` are annotated on every frame; the test sets only on the first. The
objects of a sequence are the ids of its first annotation. ``resolution`` selects
``480p`` or ``Full-Resolution``. Problems found (missing list, folders or frames, an
annotation without a frame, a frame without an annotation where all must have one,
sizes that disagree) are reported together.
"""
from __future__ import annotations

import os
from pathlib import Path

from manifests._common import Problems, abs_dir, fail, finish
from manifests._dense import DENSE_BUILDERS, DenseVideo, per_frame_labelled_video, read_video_list

SPLITS = ("train", "val", "test-dev", "test-challenge")
#: Splits whose every frame is annotated.
FULLY_ANNOTATED = ("train", "val")
RESOLUTIONS = ("480p", "Full-Resolution")


@DENSE_BUILDERS.register("davis2017")
def build_davis2017(
    *,
    root: str | os.PathLike,
    split: str = "val",
    resolution: str = "480p",
    check_sizes: bool = True,
) -> list[DenseVideo]:
    """Videos of one DAVIS-2017 split, in the order of its ImageSets list.

    Args:
        root: the DAVIS folder (holding ``ImageSets``, ``JPEGImages``, ``Annotations``).
        split: ``train``, ``val``, ``test-dev`` or ``test-challenge``.
        resolution: ``480p`` or ``Full-Resolution``.
        check_sizes: read every image header and check frames and annotations agree.

    Raises:
        ManifestError: listing every problem found.
    """
    if split not in SPLITS:
        raise fail("davis2017", f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    if resolution not in RESOLUTIONS:
        raise fail("davis2017", f"resolution must be one of {', '.join(RESOLUTIONS)} (got {resolution!r})")
    root_p = abs_dir(root)
    problems = Problems()
    hint = "check that --davis is the DAVIS folder holding ImageSets/, JPEGImages/ and Annotations/"
    listing = root_p / "ImageSets" / "2017" / f"{split}.txt"
    videos: list[DenseVideo] = []
    for seq in read_video_list(listing, problems, "DAVIS sequence list", "sequence"):
        v = _sequence(root_p, seq, split, resolution, check_sizes, problems)
        if v is not None:
            videos.append(v)
    return _finish(videos, problems, str(root_p), hint)


def _finish(videos: list[DenseVideo], problems: Problems, source: str, hint: str) -> list[DenseVideo]:
    finish("davis2017", [v.row() for v in videos], problems, source=source, hint=hint)
    return videos


def _sequence(
    root: Path, seq: str, split: str, resolution: str, check_sizes: bool, problems: Problems
) -> DenseVideo | None:
    return per_frame_labelled_video(
        seq, split, root / "JPEGImages" / resolution / seq, root / "Annotations" / resolution / seq,
        label_kind="davis-objects", word="annotation", require_all=split in FULLY_ANNOTATED,
        check_sizes=check_sizes, problems=problems)
