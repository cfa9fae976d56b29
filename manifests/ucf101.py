"""UCF101 (Soomro et al. 2012): 13,320 clips, 101 classes, 3 official train/test splits.

Official annotation files (``ucfTrainTestlist/``)::

    classInd.txt       "1 ApplyEyeMakeup"                                 (1-based index)
    trainlist01.txt    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"    (1-based label)
    testlist01.txt     "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"      (no label column)

Videos live at ``<root>/<ClassName>/<video>.avi`` (the unpacked ``UCF-101/`` folder).
Manifest labels are 0-based (``label = index - 1``); test labels come from the folder
name. ``video_id`` is the file stem (``v_ApplyEyeMakeup_g08_c01``); splits are ``train``
and ``test``.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from manifests._common import BUILDERS, Problems, abs_dir, fail, finish, read_lines, sort_rows
from pipeline.manifest import ManifestRow

CLASS_INDEX = "classInd.txt"
TRAIN_LIST = "trainlist0{n}.txt"
TEST_LIST = "testlist0{n}.txt"
SPLIT_NUMBERS = (1, 2, 3)


def read_class_index(path: Path, problems: Problems) -> list[str]:
    """Class names of ``classInd.txt`` indexed 0-based (``"1 ApplyEyeMakeup"`` -> [0])."""
    by_index: dict[int, str] = {}
    for lineno, text in read_lines(path, problems, "UCF101 class index"):
        parts = text.split()
        if len(parts) != 2 or not parts[0].isdigit():
            problems.add(f"{path.name} line {lineno}: expected '<index> <ClassName>', got {text!r}")
            continue
        idx, name = int(parts[0]), parts[1]
        if idx in by_index:
            problems.add(f"{path.name} line {lineno}: index {idx} used twice")
            continue
        by_index[idx] = name
    if by_index and sorted(by_index) != list(range(1, len(by_index) + 1)):
        problems.add(f"{path.name}: class indices must be 1..{len(by_index)} without gaps")
    names = [by_index[i] for i in sorted(by_index)]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.add(f"{path.name}: class {n!r} listed twice")
    return names


@BUILDERS.register("ucf101")
def build_ucf101(
    *,
    root: str | os.PathLike,
    annotations: str | os.PathLike,
    split_number: int = 1,
) -> list[ManifestRow]:
    """Manifest of one official UCF101 split.

    Args:
        root: folder holding ``<ClassName>/<video>.avi`` (the unpacked ``UCF-101``).
        annotations: folder holding ``classInd.txt``, ``trainlist0N.txt``, ``testlist0N.txt``.
        split_number: official split 1, 2 or 3.

    Returns:
        Rows (split ``train`` then ``test``, each sorted by path), label 0..100.

    Raises:
        ManifestError: listing every malformed line, unknown class, label/folder mismatch,
            duplicate id and missing video.
    """
    if split_number not in SPLIT_NUMBERS:
        raise fail("ucf101", f"split_number must be 1, 2 or 3 (got {split_number!r})")
    root_p, ann = abs_dir(root), abs_dir(annotations)
    problems = Problems()
    classes = read_class_index(ann / CLASS_INDEX, problems)
    hint = "check that --annotations is the ucfTrainTestlist folder and --root the UCF-101 folder"
    if not classes:  # every line would be an unknown label: report the root cause only
        if not problems:
            problems.add(f"{CLASS_INDEX} lists no classes")
        return finish("ucf101", [], problems, source=str(ann), hint=hint)
    class_of = {name: i for i, name in enumerate(classes)}
    rows: list[ManifestRow] = []

    for split, template, has_label in (("train", TRAIN_LIST, True), ("test", TEST_LIST, False)):
        path = ann / template.format(n=split_number)
        for lineno, text in read_lines(path, problems, f"UCF101 {split} list"):
            where = f"{path.name} line {lineno}"
            parts = text.split()
            if len(parts) != (2 if has_label else 1) or (has_label and not parts[1].isdigit()):
                shape = "'<Class>/<video>.avi <label>'" if has_label else "'<Class>/<video>.avi'"
                problems.add(f"{where}: expected {shape}, got {text!r}")
                continue
            rel = PurePosixPath(parts[0])
            if len(rel.parts) != 2:
                problems.add(f"{where}: video path {parts[0]!r} is not '<ClassName>/<video>'")
                continue
            folder = rel.parts[0]
            if has_label:
                label = int(parts[1]) - 1
                if not 0 <= label < len(classes):
                    problems.add(f"{where}: unknown label {parts[1]} (classInd has 1..{len(classes)})")
                    continue
                if class_of.get(folder, label) != label:
                    problems.add(
                        f"{where}: label {parts[1]} is {classes[label]!r} but the video is in "
                        f"folder {folder!r}"
                    )
                    continue
            else:
                if folder not in class_of:
                    problems.add(f"{where}: unknown label {folder!r} (not in {CLASS_INDEX})")
                    continue
                label = class_of[folder]
            rows.append(
                ManifestRow(
                    video_id=rel.stem,
                    path=str(root_p.joinpath(*rel.parts)),
                    split=split,
                    label=label,
                    label_name=classes[label],
                )
            )
    return finish(
        "ucf101",
        sort_rows(rows),
        problems,
        source=str(ann),
        num_classes=len(classes),
        hint=hint,
    )
