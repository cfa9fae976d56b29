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
from collections import Counter
from pathlib import Path

from manifests._common import Problems, abs_dir, fail, finish, read_lines
from manifests._dense import DENSE_BUILDERS, DenseVideo, image_size

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
    names = [t for _, t in read_lines(listing, problems, "VIP video list")]
    for n, k in sorted(Counter(names).items()):
        if k > 1:
            problems.add(f"video {n!r} is listed {k} times in {listing.name}")
    videos = []
    for name in dict.fromkeys(names):
        v = _video(root_p, name, split, require_all_labels, check_sizes, problems)
        if v is not None:
            videos.append(v)
    finish("vip", [v.row() for v in videos], problems, source=str(root_p), hint=hint)
    return videos


def _video(
    root: Path, name: str, split: str, require_all: bool, check_sizes: bool, problems: Problems
) -> DenseVideo | None:
    img_dir = root / "Images" / name
    ann_dir = root / "Annotations" / "Category_ids" / name
    if not img_dir.is_dir():
        problems.add(f"{name}: missing frames folder {str(img_dir)!r}")
        return None
    frames = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg" and not p.name.startswith("."))
    if not frames:
        problems.add(f"{name}: no .jpg frames in {str(img_dir)!r}")
        return None
    if not ann_dir.is_dir():
        problems.add(f"{name}: missing label folder {str(ann_dir)!r}")
        return None
    index = {p.stem: i for i, p in enumerate(frames)}
    label_frames, labels = [], []
    for a in sorted(p for p in ann_dir.iterdir() if p.suffix.lower() == ".png"):
        if a.stem not in index:
            problems.add(f"{name}: label {a.name} has no frame {a.stem}.jpg")
            continue
        label_frames.append(index[a.stem])
        labels.append(str(a))
    if 0 not in label_frames:
        problems.add(f"{name}: the first frame {frames[0].name} has no label {frames[0].stem}.png")
    if require_all:
        have = set(label_frames)
        missing = [frames[i].name for i in range(len(frames)) if i not in have]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            problems.add(f"{name}: {len(missing)} frame(s) without label ({shown})")
    size = (0, 0)
    if check_sizes:
        distinct = {s for s in (image_size(f, problems, f"{name} frame") for f in frames) if s is not None}
        if len(distinct) > 1:
            problems.add(f"{name}: frames differ in size: {sorted(distinct)}")
        elif distinct:
            size = distinct.pop()
            for lab in labels:
                s = image_size(Path(lab), problems, f"{name} label")
                if s is not None and s != size:
                    problems.add(f"{name}: label {Path(lab).name} is {s[1]}x{s[0]}, its frame {size[1]}x{size[0]}")
    return DenseVideo(
        video_id=name,
        split=split,
        frames=tuple(str(f) for f in frames),
        labels=tuple(labels),
        label_frames=tuple(label_frames),
        label_kind="vip-parts",
        size=size,
    )
