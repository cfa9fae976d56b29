"""Dense-benchmark manifests: videos given as frame files plus their label files.

DAVIS-2017, JHMDB and VIP ship videos as folders of frames with per-frame label PNGs (or
one joint file per video). A :class:`DenseVideo` lists the frame files in order and the
label files referenced by that video; :func:`write_dense_manifest` /
:func:`read_dense_manifest` store them as JSON Lines (one video per line), and
:meth:`DenseVideo.row` is the plain :class:`~pipeline.manifest.ManifestRow` (``path`` = the
frames folder) that feature extraction reads.

Builders register in :data:`DENSE_BUILDERS` and report every problem (missing frames,
labels without a frame, frames without a label, sizes that disagree, ...) in one
:class:`~pipeline.errors.ManifestError`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image

from manifests._common import Problems, read_lines
from pipeline.errors import ManifestError
from pipeline.fileio import atomic_write_lines
from pipeline.manifest import ManifestRow
from pipeline.registry import Registry

__all__ = [
    "DENSE_BUILDERS",
    "DenseBuilder",
    "DenseVideo",
    "LABEL_KINDS",
    "frame_files",
    "frames_size",
    "image_size",
    "match_label_files",
    "per_frame_labelled_video",
    "read_video_list",
    "with_video_files",
    "read_dense_manifest",
    "write_dense_manifest",
]

#: What a video's label files hold.
#:  ``davis-objects``: palette PNG per labelled frame, ids 0 (background) .. K, 255 void;
#:  ``vip-parts``: grey PNG per labelled frame, part class ids, 255 ignored;
#:  ``jhmdb-joints``: one MAT-file per video with ``pos_img`` (2, 15, T), 1-based pixels.
LABEL_KINDS = ("davis-objects", "vip-parts", "jhmdb-joints")


@dataclass(frozen=True)
class DenseVideo:
    """One video of a dense benchmark.

    Attributes:
        video_id: unique id (the sequence / video folder name).
        split: e.g. ``train``, ``val``, ``test``.
        frames: absolute paths of the frame images, in temporal order.
        labels: absolute paths of the label files (per labelled frame, or one per video).
        label_frames: for per-frame labels, the index in ``frames`` of each label file;
            empty for a per-video label file.
        label_kind: one of :data:`LABEL_KINDS`.
        size: ``(height, width)`` of the frames in pixels.
        video: a video file holding the same frames (local path or fsspec URL); empty:
            the frames are read from the frame files. Dense extraction then decodes frame
            ``k`` of the video (selected by presentation time) in place of ``frames[k]``;
            ``frames`` still name the frames (results are written under those names).
    """

    video_id: str
    split: str
    frames: tuple[str, ...]
    labels: tuple[str, ...]
    label_frames: tuple[int, ...] = field(default=())
    label_kind: str = "davis-objects"
    size: tuple[int, int] = (0, 0)
    video: str = ""

    @property
    def frames_dir(self) -> str:
        """The folder holding the frames."""
        return os.path.dirname(self.frames[0]) if self.frames else ""

    @property
    def frame_names(self) -> tuple[str, ...]:
        """Frame file stems (``00000``, ...), the names results are written under."""
        return tuple(Path(f).stem for f in self.frames)

    def label_for(self, frame_index: int) -> str | None:
        """The label file of frame ``frame_index`` (None if that frame is not labelled)."""
        try:
            return self.labels[self.label_frames.index(frame_index)]
        except ValueError:
            return None

    def row(self) -> ManifestRow:
        """The extraction manifest row: the video file, else the frames folder."""
        return ManifestRow(video_id=self.video_id, path=self.video or self.frames_dir, split=self.split)

    def to_json(self) -> str:
        d = {
            "video_id": self.video_id,
            "split": self.split,
            "label_kind": self.label_kind,
            "size": list(self.size),
            "frames": list(self.frames),
            "labels": list(self.labels),
            "label_frames": list(self.label_frames),
        }
        if self.video:
            d["video"] = self.video
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "DenseVideo":
        missing = {"video_id", "frames", "labels"} - set(d)
        if missing:
            raise ValueError(f"missing field(s) {sorted(missing)}")
        kind = str(d.get("label_kind", "davis-objects"))
        if kind not in LABEL_KINDS:
            raise ValueError(f"unknown label_kind {kind!r}; one of {', '.join(LABEL_KINDS)}")
        size = tuple(int(x) for x in d.get("size", (0, 0)))
        return cls(
            video_id=str(d["video_id"]),
            split=str(d.get("split", "val")),
            frames=tuple(str(f) for f in d["frames"]),
            labels=tuple(str(f) for f in d["labels"]),
            label_frames=tuple(int(i) for i in d.get("label_frames", ())),
            label_kind=kind,
            size=(size[0], size[1]),
            video=str(d.get("video", "")),
        )


#: A dense builder takes keyword options and returns videos in a deterministic order.
DenseBuilder = Callable[..., list[DenseVideo]]

#: format name -> builder (``davis2017``, ``jhmdb``, ``vip``).
DENSE_BUILDERS: Registry[DenseBuilder] = Registry("dense benchmark format")


def write_dense_manifest(videos: Iterable[DenseVideo], path: str | os.PathLike) -> Path:
    """Write videos as JSON Lines (atomically). Returns the path."""
    return atomic_write_lines(path, (v.to_json() for v in videos))


def read_dense_manifest(path: str | os.PathLike) -> list[DenseVideo]:
    """Read a dense JSONL manifest; every malformed line is reported at once."""
    out: list[DenseVideo] = []
    problems: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(DenseVideo.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                problems.append(f"line {lineno}: {e}")
    if problems:
        raise ManifestError(f"{path}: {len(problems)} malformed line(s)", problems)
    return out


def image_size(path: Path, problems: Problems, what: str) -> tuple[int, int] | None:
    """``(height, width)`` read from an image header (None, with a problem, if unreadable)."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except FileNotFoundError:
        problems.add(f"missing {what} {str(path)!r}")
    except OSError as e:
        problems.add(f"unreadable {what} {str(path)!r}: {e}")
    return None


def read_video_list(listing: Path, problems: Problems, what: str, noun: str) -> list[str]:
    """The names of a list file (one ``noun`` per line, e.g. DAVIS's ImageSets), in order and
    without repeats; each repeated name is a problem."""
    names = [t for _, t in read_lines(listing, problems, what)]
    for n, k in sorted(Counter(names).items()):
        if k > 1:
            problems.add(f"{noun} {n!r} is listed {k} times in {listing.name}")
    return list(dict.fromkeys(names))


def frame_files(
    folder: Path, extensions: Sequence[str], vid: str, problems: Problems, what: str = "frames"
) -> list[Path] | None:
    """The frame images of one video (suffix in ``extensions``, hidden files skipped), sorted
    by name; None, with a problem naming ``what``, if the folder is missing or holds none."""
    if not folder.is_dir():
        problems.add(f"{vid}: missing frames folder {str(folder)!r}")
        return None
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions and not p.name.startswith("."))
    if not frames:
        problems.add(f"{vid}: no {what} in {str(folder)!r}")
    return frames or None


def match_label_files(
    frames: Sequence[Path], folder: Path, vid: str, problems: Problems, word: str, require_all: bool
) -> tuple[list[int], list[str]] | None:
    """The ``.png`` label files of one video matched to its frames by file stem:
    ``(label_frames, labels)``, each label's index in ``frames`` and its path (sorted by name).

    Problems (``word`` names a label file, e.g. ``annotation``): the folder is missing (then
    None), a label without a frame, a first frame without a label and, if ``require_all``,
    frames without a label.
    """
    if not folder.is_dir():
        problems.add(f"{vid}: missing {word} folder {str(folder)!r}")
        return None
    index = {p.stem: i for i, p in enumerate(frames)}
    label_frames: list[int] = []
    labels: list[str] = []
    for a in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")):
        if a.stem not in index:
            problems.add(f"{vid}: {word} {a.name} has no frame {a.stem}.jpg")
            continue
        label_frames.append(index[a.stem])
        labels.append(str(a))
    if 0 not in label_frames:
        problems.add(f"{vid}: the first frame {frames[0].name} has no {word} {frames[0].stem}.png")
    if require_all:
        have = set(label_frames)
        missing = [frames[i].name for i in range(len(frames)) if i not in have]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            problems.add(f"{vid}: {len(missing)} frame(s) without {word} ({shown})")
    return label_frames, labels


def frames_size(
    frames: Sequence[Path], vid: str, problems: Problems, labels: Sequence[str] = (), word: str = "label"
) -> tuple[int, int]:
    """The ``(height, width)`` in pixels all ``frames`` share, read from their headers, and
    that every label image in ``labels`` must have too (``word`` names one in problems);
    ``(0, 0)`` if the frames differ in size (a problem) or none could be read."""
    distinct = {s for s in (image_size(f, problems, f"{vid} frame") for f in frames) if s is not None}
    if len(distinct) > 1:
        problems.add(f"{vid}: frames differ in size: {sorted(distinct)}")
        return (0, 0)
    if not distinct:
        return (0, 0)
    size = distinct.pop()
    for lab in labels:
        s = image_size(Path(lab), problems, f"{vid} {word}")
        if s is not None and s != size:
            problems.add(f"{vid}: {word} {Path(lab).name} is {s[1]}x{s[0]}, its frame {size[1]}x{size[0]}")
    return size


def per_frame_labelled_video(
    video_id: str,
    split: str,
    frame_dir: Path,
    label_dir: Path,
    *,
    label_kind: str,
    word: str,
    require_all: bool,
    check_sizes: bool,
    problems: Problems,
) -> DenseVideo | None:
    """A video of ``.jpg`` frames in ``frame_dir`` with one ``.png`` label per labelled frame in
    ``label_dir`` (same file stem), as DAVIS and VIP ship them: :func:`frame_files`,
    :func:`match_label_files` and, with ``check_sizes``, :func:`frames_size`. None (with
    problems) when a folder is missing or holds no frames."""
    frames = frame_files(frame_dir, (".jpg",), video_id, problems, ".jpg frames")
    if frames is None:
        return None
    matched = match_label_files(frames, label_dir, video_id, problems, word, require_all)
    if matched is None:
        return None
    label_frames, labels = matched
    return DenseVideo(
        video_id=video_id,
        split=split,
        frames=tuple(str(f) for f in frames),
        labels=tuple(labels),
        label_frames=tuple(label_frames),
        label_kind=label_kind,
        size=frames_size(frames, video_id, problems, labels, word) if check_sizes else (0, 0),
    )


#: video file suffixes :func:`with_video_files` looks for
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


def with_video_files(videos: Iterable[DenseVideo], folder: str | os.PathLike) -> list[DenseVideo]:
    """``videos`` with ``video`` set to ``folder/<video_id>.<suffix>`` (one of
    :data:`VIDEO_SUFFIXES`), so dense extraction decodes that file instead of reading frames.

    Raises:
        ManifestError: every video without exactly one such file, together.
    """
    root = Path(folder)
    out, problems = [], []
    for v in videos:
        found = [root / f"{v.video_id}{suf}" for suf in VIDEO_SUFFIXES if (root / f"{v.video_id}{suf}").is_file()]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            problems.append(f"{v.video_id}: {what} video file {root}/{v.video_id}{{{','.join(VIDEO_SUFFIXES)}}}")
            continue
        out.append(dataclasses.replace(v, video=str(found[0])))
    if problems:
        raise ManifestError(f"{root}: {len(problems)} video(s) without exactly one video file; "
                            "name each <video_id>.mp4 (or .mkv, ...)", problems)
    return out
