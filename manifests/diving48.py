"""Diving48 (Li et al. 2018), V2 annotations: ~18k trimmed dive clips, 48 classes.

Official files::

    Diving48_V2_train.json   [{"vid_name": "-mmq0PT-u8k_00155", "label": 0,
                               "start_frame": 0, "end_frame": 84}, ...]
    Diving48_V2_test.json    same fields
    Diving48_vocab.json      [["Back", "15som", "05Twis", "FREE"], ...]  (48 entries:
                             takeoff, somersault, twist, flight)

Videos live at ``<root>/<vid_name>.mp4`` (the unpacked ``rgb/`` folder). ``label_name``
is the vocab entry joined with spaces (``"Back 15som 05Twis FREE"``). ``start_frame`` /
``end_frame`` are not turned into ``start``/``end``: the distributed clips are already
trimmed to the dive, and frame indices cannot become seconds without decoding.
"""
from __future__ import annotations

import os
from typing import Sequence

from manifests._common import BUILDERS, Problems, abs_dir, fail, finish, json_entries, read_json, sort_rows
from pipeline.manifest import ManifestRow

FILE_TEMPLATE = "Diving48_V2_{split}.json"
VOCAB_FILE = "Diving48_vocab.json"
SPLITS = ("train", "test")


def read_vocab(data: object, name: str, problems: Problems) -> list[str]:
    """Class names from the vocab JSON: each ``[takeoff, somersault, twist, flight]``."""
    if not isinstance(data, list):
        problems.add(f"{name}: expected a list of [takeoff, somersault, twist, flight] lists")
        return []
    names: list[str] = []
    for i, entry in enumerate(data):
        if not isinstance(entry, list) or not entry or not all(isinstance(x, str) for x in entry):
            problems.add(f"{name} entry {i}: expected a list of strings, got {entry!r}")
            names.append(str(entry))
        else:
            names.append(" ".join(entry))
    return names


@BUILDERS.register("diving48")
def build_diving48(
    *,
    root: str | os.PathLike,
    annotations: str | os.PathLike,
    splits: Sequence[str] = SPLITS,
    file_template: str = FILE_TEMPLATE,
    vocab_file: str = VOCAB_FILE,
    extension: str = "mp4",
) -> list[ManifestRow]:
    """Manifest of Diving48.

    Args:
        root: folder holding ``<vid_name>.mp4``.
        annotations: folder holding the split JSONs and the vocab JSON.
        splits: split names; each reads ``file_template.format(split=...)``.
        file_template: split file name pattern (``Diving48_{split}.json`` for V1).
        vocab_file: the class vocabulary (its length is the number of classes).
        extension: video file extension.

    Raises:
        ManifestError: listing every malformed entry, unknown label, duplicate id and
            missing video.
    """
    if not splits:
        raise fail("diving48", "splits is empty; use e.g. ['train', 'test']")
    root_p, ann = abs_dir(root), abs_dir(annotations)
    problems = Problems()
    hint = "check that --annotations holds the Diving48 V2 JSON files and --root the rgb/ videos"
    vocab = read_json(ann / vocab_file, problems, "Diving48 vocab")
    classes = read_vocab(vocab, vocab_file, problems) if vocab is not None else []
    if not classes:
        if not problems:
            problems.add(f"{vocab_file} lists no classes")
        return finish("diving48", [], problems, source=str(ann), hint=hint)

    rows: list[ManifestRow] = []
    for split in splits:
        path = ann / file_template.format(split=split)
        for where, entry in json_entries(path, problems, f"Diving48 {split} file", "{vid_name, label, ...}"):
            if not isinstance(entry, dict) or not isinstance(entry.get("vid_name"), str):
                problems.add(f"{where}: expected an object with a 'vid_name' string, got {entry!r}")
                continue
            label = entry.get("label")
            if not isinstance(label, int) or isinstance(label, bool):
                problems.add(f"{where}: 'label' must be an integer, got {label!r}")
                continue
            if not 0 <= label < len(classes):
                problems.add(f"{where}: unknown label {label} (vocab has 0..{len(classes) - 1})")
                continue
            vid = entry["vid_name"]
            rows.append(
                ManifestRow(
                    video_id=vid,
                    path=str(root_p / f"{vid}.{extension}"),
                    split=split,
                    label=label,
                    label_name=classes[label],
                )
            )
    return finish(
        "diving48", sort_rows(rows), problems, source=str(ann), num_classes=len(classes), hint=hint
    )
