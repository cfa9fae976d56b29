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
from collections import Counter
from pathlib import Path

from manifests._common import Problems, abs_dir, fail, finish, read_lines
from manifests._dense import DENSE_BUILDERS, DenseVideo, image_size

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
    names = [t for _, t in read_lines(listing, problems, "DAVIS sequence list")]
    for n, k in sorted(Counter(names).items()):
        if k > 1:
            problems.add(f"sequence {n!r} is listed {k} times in {listing.name}")
    videos: list[DenseVideo] = []
    for seq in dict.fromkeys(names):
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
    img_dir = root / "JPEGImages" / resolution / seq
    ann_dir = root / "Annotations" / resolution / seq
    if not img_dir.is_dir():
        problems.add(f"{seq}: missing frames folder {str(img_dir)!r}")
        return None
    frames = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".jpg" and not p.name.startswith("."))
    if not frames:
        problems.add(f"{seq}: no .jpg frames in {str(img_dir)!r}")
        return None
    if not ann_dir.is_dir():
        problems.add(f"{seq}: missing annotation folder {str(ann_dir)!r}")
        return None
    anns = sorted(p for p in ann_dir.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))
    index = {p.stem: i for i, p in enumerate(frames)}
    label_frames: list[int] = []
    labels: list[str] = []
    for a in anns:
        if a.stem not in index:
            problems.add(f"{seq}: annotation {a.name} has no frame {a.stem}.jpg")
            continue
        label_frames.append(index[a.stem])
        labels.append(str(a))
    if 0 not in label_frames:
        problems.add(f"{seq}: the first frame {frames[0].name} has no annotation {frames[0].stem}.png")
    if split in FULLY_ANNOTATED:
        missing = [frames[i].name for i in range(len(frames)) if i not in set(label_frames)]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            problems.add(f"{seq}: {len(missing)} frame(s) without annotation ({shown})")
    size = (0, 0)
    if check_sizes:
        sizes = {f.name: image_size(f, problems, f"{seq} frame") for f in frames}
        distinct = {s for s in sizes.values() if s is not None}
        if len(distinct) > 1:
            problems.add(f"{seq}: frames differ in size: {sorted(distinct)}")
        elif distinct:
            size = distinct.pop()
            for i, lab in zip(label_frames, labels):
                s = image_size(Path(lab), problems, f"{seq} annotation")
                if s is not None and s != size:
                    problems.add(f"{seq}: annotation {Path(lab).name} is {s[1]}x{s[0]}, its frame {size[1]}x{size[0]}")
    return DenseVideo(
        video_id=seq,
        split=split,
        frames=tuple(str(f) for f in frames),
        labels=tuple(labels),
        label_frames=tuple(label_frames),
        label_kind="davis-objects",
        size=size,
    )

