"""Videos sorted into one folder per class: ``<root>/<class>/<video>``.

Optionally split first: ``<root>/<split>/<class>/<video>``; ``layout="auto"`` picks this
when every top-level folder is a split name (:data:`SPLIT_NAMES`). Videos may be nested
deeper inside a class folder. Labels index the sorted class folder names (of the
``train`` split when there is one), unless an explicit class list is given; a class folder
not in that list is an unknown label. ``video_id`` is the path relative to the root
without extension (``train/dog/clip01``); the split is the split folder's name (or the
``split`` option for the plain layout).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from manifests._common import (
    BUILDERS,
    VIDEO_EXTENSIONS,
    Problems,
    abs_dir,
    fail,
    finish,
    resolve_classes,
    sort_rows,
    video_id_from_relpath,
    walk_videos,
)
from pipeline.manifest import ManifestRow
from pipeline.registry import Registry

#: Top-level folder names recognised as splits by ``layout="auto"``.
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})

#: (root, default split) -> {split: split folder}; the class folders are inside.
SplitFolders = Callable[[Path, str], dict[str, Path]]
LAYOUTS: Registry[SplitFolders] = Registry("folder-per-class layout")


def _subdirs(d: Path) -> list[Path]:
    return sorted(
        (Path(e.path) for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")),
        key=lambda p: p.name,
    )


@LAYOUTS.register("class")
def _class_layout(root: Path, split: str) -> dict[str, Path]:
    """``<root>/<class>/<video>``: everything in the ``split`` option's split"""
    return {split: root}


@LAYOUTS.register("split-class")
def _split_class_layout(root: Path, split: str) -> dict[str, Path]:
    """``<root>/<split>/<class>/<video>``"""
    return {d.name: d for d in _subdirs(root)}


@LAYOUTS.register("auto")
def _auto_layout(root: Path, split: str) -> dict[str, Path]:
    """``split-class`` if every top-level folder is a split name, else ``class``"""
    top = _subdirs(root)
    if top and all(d.name in SPLIT_NAMES for d in top):
        return _split_class_layout(root, split)
    return _class_layout(root, split)


@BUILDERS.register("folder-per-class")
def build_folder_per_class(
    *,
    root: str | os.PathLike,
    layout: str = "auto",
    split: str = "train",
    classes: Sequence[str] | None = None,
    classes_file: str | os.PathLike | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> list[ManifestRow]:
    """Manifest of a class-per-folder tree.

    Args:
        root: the tree's root.
        layout: ``auto``, ``class`` or ``split-class``.
        split: split name for the ``class`` layout.
        classes, classes_file: explicit class list (label = position).
        extensions: video file extensions.

    Raises:
        ManifestError: listing videos outside class folders, unknown classes, duplicate ids
            and an empty tree.
    """
    if layout not in LAYOUTS:
        raise fail("folder-per-class", f"unknown layout {layout!r}; choose one of {LAYOUTS.names()}")
    root_p = abs_dir(root)
    problems = Problems()
    hint = "check --root (<root>/<class>/<video> or <root>/<split>/<class>/<video>)"
    if not root_p.is_dir():
        problems.add(f"video folder {str(root_p)!r} does not exist")
        return finish("folder-per-class", [], problems, source=str(root_p), hint=hint)

    split_dirs = LAYOUTS.get(layout)(root_p, split)
    class_list = resolve_classes(classes, classes_file, problems)
    if class_list is None:
        source = [split_dirs["train"]] if "train" in split_dirs else list(split_dirs.values())
        class_list = sorted({d.name for s in source for d in _subdirs(s)})
    class_of = {name: i for i, name in enumerate(class_list)}

    rows: list[ManifestRow] = []
    unknown: set[tuple[str, str]] = set()  # (class, folder)
    for split_name, split_dir in split_dirs.items():
        for p in walk_videos(split_dir, extensions):
            rel = p.relative_to(split_dir)
            if len(rel.parts) < 2:
                problems.add(f"video {str(p)!r} is not inside a class folder")
                continue
            cls = rel.parts[0]
            if cls not in class_of:
                unknown.add((cls, str(split_dir / cls)))
                continue
            rows.append(
                ManifestRow(
                    video_id=video_id_from_relpath(p.relative_to(root_p)),
                    path=str(p),
                    split=split_name,
                    label=class_of[cls],
                    label_name=cls,
                )
            )
    for cls, where in sorted(unknown):
        problems.add(f"unknown label {cls!r} (folder {where!r} is not in the class list)")
    if not rows and not problems:
        problems.add(f"no video files (.{', .'.join(extensions)}) in class folders under {str(root_p)!r}")
    return finish(
        "folder-per-class",
        sort_rows(rows),
        problems,
        source=str(root_p),
        check_files=False,
        num_classes=len(class_list),
        hint=hint,
    )
