"""Every video file under a folder, unlabelled (e.g. raw footage for self-supervised learning).

Files are found recursively (extensions mp4, avi, mkv, webm, mov, m4v, any case; hidden
files and folders skipped). ``video_id`` is the path relative to the root without the
extension, with ``/`` separators (``day1/cam2/clip0001``), so it is stable and unique
unless two files differ only by extension (an error). The split comes from an option.
"""
from __future__ import annotations

import os
from typing import Sequence

from manifests._common import (
    BUILDERS,
    VIDEO_EXTENSIONS,
    Problems,
    abs_dir,
    finish,
    sort_rows,
    video_id_from_relpath,
    walk_videos,
)
from pipeline.manifest import ManifestRow


@BUILDERS.register("folder")
def build_folder(
    *,
    root: str | os.PathLike,
    split: str = "train",
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> list[ManifestRow]:
    """Manifest of every video under ``root`` (unlabelled, one split).

    Raises:
        ManifestError: no video found, or two files share a video_id.
    """
    root_p = abs_dir(root)
    problems = Problems()
    if not root_p.is_dir():
        problems.add(f"video folder {str(root_p)!r} does not exist")
    rows = [
        ManifestRow(video_id=video_id_from_relpath(p.relative_to(root_p)), path=str(p), split=split)
        for p in (walk_videos(root_p, extensions) if root_p.is_dir() else ())
    ]
    if root_p.is_dir() and not rows:
        problems.add(f"no video files (.{', .'.join(extensions)}) under {str(root_p)!r}")
    return finish(
        "folder",
        sort_rows(rows),
        problems,
        source=str(root_p),
        check_files=False,
        hint="check --root",
    )
