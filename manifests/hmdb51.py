"""HMDB51 (Kuehne et al. 2011): 6,766 clips, 51 classes, 3 official 70/30 splits.

Official split files (``testTrainMulti_7030_splits/``), one per class and split number::

    brush_hair_test_split1.txt   "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 "

The code is 1 = train, 2 = test, 0 = not used in this split. Class names may contain
underscores, so the class is everything before ``_test_split<N>.txt``. Videos live at
``<root>/<class>/<video>.avi``. Labels index the sorted class names; ``video_id`` is the
file stem; splits are ``train``, ``test`` (and ``unused`` with ``keep_unused=True``).
"""
from __future__ import annotations

import os
import re

from manifests._common import BUILDERS, Problems, abs_dir, fail, finish, read_lines, sort_rows
from pipeline.manifest import ManifestRow

SPLIT_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<n>[123])\.txt$")
SPLIT_NUMBERS = (1, 2, 3)
#: split-file code -> manifest split name.
CODES = {"1": "train", "2": "test", "0": "unused"}


@BUILDERS.register("hmdb51")
def build_hmdb51(
    *,
    root: str | os.PathLike,
    annotations: str | os.PathLike,
    split_number: int = 1,
    keep_unused: bool = False,
) -> list[ManifestRow]:
    """Manifest of one official HMDB51 split.

    Args:
        root: folder holding ``<class>/<video>.avi``.
        annotations: folder holding the ``<class>_test_split<N>.txt`` files.
        split_number: official split 1, 2 or 3.
        keep_unused: keep code-0 videos as split ``unused`` (default: drop them).

    Returns:
        Rows (``train``, ``test``, then ``unused``; each sorted by path), label 0..50.

    Raises:
        ManifestError: listing every malformed line, class without a split file for this
            split number, duplicate id and missing video.
    """
    if split_number not in SPLIT_NUMBERS:
        raise fail("hmdb51", f"split_number must be 1, 2 or 3 (got {split_number!r})")
    root_p, ann = abs_dir(root), abs_dir(annotations)
    problems = Problems()
    hint = "check that --annotations is the testTrainMulti_7030_splits folder and --root the video folder"
    files: dict[int, dict[str, str]] = {n: {} for n in SPLIT_NUMBERS}
    if ann.is_dir():
        for name in sorted(os.listdir(ann)):
            m = SPLIT_FILE.match(name)
            if m:
                files[int(m["n"])][m["cls"]] = name
    chosen = files[split_number]
    if not chosen:
        problems.add(f"no '<class>_test_split{split_number}.txt' files in {str(ann)!r}")
        return finish("hmdb51", [], problems, source=str(ann), hint=hint)
    for cls in sorted(set().union(*files.values()) - set(chosen)):
        problems.add(f"class {cls!r} has split files but no {cls}_test_split{split_number}.txt")
    classes = sorted(chosen)

    rows: list[ManifestRow] = []
    for label, cls in enumerate(classes):
        path = ann / chosen[cls]
        for lineno, text in read_lines(path, problems, "HMDB51 split file"):
            parts = text.split()
            if len(parts) != 2 or parts[1] not in CODES:
                problems.add(f"{path.name} line {lineno}: expected '<video>.avi <0|1|2>', got {text!r}")
                continue
            split = CODES[parts[1]]
            if split == "unused" and not keep_unused:
                continue
            video = parts[0]
            rows.append(
                ManifestRow(
                    video_id=os.path.splitext(video)[0],
                    path=str(root_p / cls / video),
                    split=split,
                    label=label,
                    label_name=cls,
                )
            )
    return finish(
        "hmdb51", sort_rows(rows), problems, source=str(ann), num_classes=len(classes), hint=hint
    )
