"""VIP, Video Instance-level Parsing (Zhou et al. 2018): human part labels propagated in video.

Official layout of ``VIP_Fine``::

    <root>/lists/{train,val}_videos.txt                      one video name per line
    <root>/Images/<video>/<frame>.jpg                        frames
    <root>/Annotations/Category_ids/<video>/<frame>.png      grey PNGs: part class ids
                                                             0 (background) .. 19, 255 ignored

Every frame of ``VIP_Fine`` is annotated (``require_all_labels``). Problems found
(missing list, folders or frames, a label without a frame, a frame without a label, sizes
that disagree) are reported together.
"""
from __future__ import annotations

import os
from pathlib import Path

from manifests._common import Problems, abs_dir, fail, finish
from manifests._dense import DENSE_BUILDERS, DenseVideo, per_frame_labelled_video, read_video_list

#: Part classes of VIP including background (ids 0..19).
NUM_CLASSES = 20
CLASS_NAMES = (
    "background", "hat", "hair", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
    "gloves", "scarf", "skirt", "torso-skin", "face", "right-arm", "left-arm", "right-leg",
    "left-leg", "right-shoe", "left-shoe",
)


@DENSE_BUILDERS.register("vip")
def build_vip(
    *,
    root: str | os.PathLike,
    split: str = "val",
    require_all_labels: bool = True,
    check_sizes: bool = True,
) -> list[DenseVideo]:
    """Videos of one VIP split, in the order of its list file.

    Args:
        root: the ``VIP_Fine`` folder.
        split: ``train`` or ``val`` (reads ``lists/<split>_videos.txt``).
        require_all_labels: every frame must have a label PNG.
        check_sizes: read every image header and check frames and labels agree.

    Raises:
        ManifestError: listing every problem found.
    """
    if split not in ("train", "val"):
        raise fail("vip", f"split must be 'train' or 'val' (got {split!r})")
    root_p = abs_dir(root)
    problems = Problems()
    hint = "check that --vip is the VIP_Fine folder holding lists/, Images/ and Annotations/Category_ids/"
    listing = root_p / "lists" / f"{split}_videos.txt"
    videos = []
    for name in read_video_list(listing, problems, "VIP video list", "video"):
        v = _video(root_p, name, split, require_all_labels, check_sizes, problems)
        if v is not None:
            videos.append(v)
    finish("vip", [v.row() for v in videos], problems, source=str(root_p), hint=hint)
    return videos


def _video(
    root: Path, name: str, split: str, require_all: bool, check_sizes: bool, problems: Problems
) -> DenseVideo | None:
    return per_frame_labelled_video(
        name, split, root / "Images" / name, root / "Annotations" / "Category_ids" / name,
        label_kind="vip-parts", word="label", require_all=require_all, check_sizes=check_sizes, problems=problems)
