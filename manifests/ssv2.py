"""Something-Something V2 (Goyal et al. 2017): 220,847 clips, 174 template classes.

Official files (``labels/`` of the download; the ``something-something-v2-*.json`` names
are accepted too)::

    labels.json        {"Approaching something with your camera": "0", ...}
    train.json         [{"id": "78687", "label": "holding potato next to vicks vaporub bottle",
                         "template": "Holding [something] next to [something]",
                         "placeholders": ["potato", "vicks vaporub bottle"]}, ...]
    validation.json    same fields
    test.json          [{"id": "1420"}, ...]   (no labels)

As in the official loader, the class of a clip is its ``template`` with the square
brackets removed (``"Holding something next to something"``), looked up in labels.json
(the ``label`` field is the filled-in caption and is not used). Videos live at
``<root>/<id>.webm``; ``video_id`` is the id; splits are ``train``, ``val``, ``test``.
"""
from __future__ import annotations

import os
from typing import Sequence

from manifests._common import (
    BUILDERS,
    Problems,
    abs_dir,
    find_file,
    find_split_files,
    finish,
    json_entries,
    read_json,
    sort_rows,
)
from pipeline.manifest import ManifestRow

LABEL_FILES = ("labels.json", "something-something-v2-labels.json")
#: manifest split -> candidate file names (first existing wins).
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.json", "something-something-v2-train.json"),
    "val": ("validation.json", "something-something-v2-validation.json"),
    "test": ("test.json", "something-something-v2-test.json"),
}
LABELLED_SPLITS = ("train", "val")


def template_class(template: str) -> str:
    """``"Putting [something] on a surface"`` -> ``"Putting something on a surface"``."""
    return template.replace("[", "").replace("]", "")


def read_labels(data: object, name: str, problems: Problems) -> dict[str, int]:
    """``{"class name": "0", ...}`` -> ``{"class name": 0, ...}``."""
    if not isinstance(data, dict):
        problems.add(f"{name}: expected an object {{class name: index}}")
        return {}
    out: dict[str, int] = {}
    for key, value in data.items():
        try:
            out[key] = int(value)
        except (TypeError, ValueError):
            problems.add(f"{name}: class {key!r} has a non-integer index {value!r}")
    if sorted(out.values()) != list(range(len(out))):
        problems.add(f"{name}: class indices must be 0..{len(out) - 1}, each used once")
    return out


@BUILDERS.register("ssv2")
def build_ssv2(
    *,
    root: str | os.PathLike,
    annotations: str | os.PathLike,
    splits: Sequence[str] | None = None,
    extension: str = "webm",
) -> list[ManifestRow]:
    """Manifest of Something-Something V2.

    Args:
        root: folder holding ``<id>.webm``.
        annotations: folder holding labels.json and the split JSONs.
        splits: any of ``train``, ``val``, ``test``; None = every split whose file exists.
        extension: video file extension.

    Raises:
        ManifestError: listing every malformed entry, unknown template, duplicate id and
            missing video.
    """
    root_p, ann = abs_dir(root), abs_dir(annotations)
    problems = Problems()
    hint = "check that --annotations is the SSv2 labels/ folder and --root the video folder"

    files = find_split_files("ssv2", ann, SPLIT_FILES, splits, problems, "file")
    if not files and splits is None:
        problems.add(f"no SSv2 split file (train.json, validation.json, test.json) in {str(ann)!r}")

    labels: dict[str, int] = {}
    if any(s in LABELLED_SPLITS for s in files):
        label_file = find_file(ann, LABEL_FILES)
        if label_file is None:
            problems.add(f"missing labels file: none of {list(LABEL_FILES)} in {str(ann)!r}")
        else:
            data = read_json(label_file, problems, "labels file")
            if data is not None:
                labels = read_labels(data, label_file.name, problems)
        if not labels:  # every labelled entry would be an unknown label: report the cause only
            if not problems:
                problems.add("the labels file lists no classes")
            return finish("ssv2", [], problems, source=str(ann), hint=hint)

    rows: list[ManifestRow] = []
    for split, path in files.items():
        for where, entry in json_entries(path, problems, f"SSv2 {split} file", "{id, template, ...}"):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), (str, int)):
                problems.add(f"{where}: expected an object with an 'id', got {entry!r}")
                continue
            vid = str(entry["id"])
            label: int | None = None
            name: str | None = None
            if split in LABELLED_SPLITS:
                template = entry.get("template")
                if not isinstance(template, str):
                    problems.add(f"{where} (id {vid}): missing 'template'")
                    continue
                name = template_class(template)
                if name not in labels:
                    problems.add(f"{where} (id {vid}): unknown label {name!r} (not in labels.json)")
                    continue
                label = labels[name]
            rows.append(
                ManifestRow(
                    video_id=vid,
                    path=str(root_p / f"{vid}.{extension}"),
                    split=split,
                    label=label,
                    label_name=name,
                )
            )
    return finish(
        "ssv2", sort_rows(rows), problems, source=str(ann), num_classes=len(labels) or None, hint=hint
    )
