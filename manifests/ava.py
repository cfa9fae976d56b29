"""AVA-Actions (Gu et al. 2018) movies as long unlabelled videos (for online pre-training).

Official files::

    ava_file_names_trainval_v2.1.txt   "-5KQ66BBWC4.mkv"  one movie file per line (299)
    ava_train_v2.2.csv                 "-5KQ66BBWC4,0902,0.077,0.151,0.283,0.811,80,1"
    ava_val_v2.2.csv                   same columns (movie id, keyframe second, box, action, person)

Each movie becomes one row covering the annotated 15-minute segment, ``start=900.0`` to
``end=1800.0`` seconds (keyframes are at seconds 902..1798). ``video_id`` is the movie id;
the path is ``<root>/<file name>``. Rows are unlabelled. The split is ``train`` / ``val``
for movies found in the given train/val CSVs (only the first column is read), else the
``split`` option when no CSV is given.
"""
from __future__ import annotations

import os
from pathlib import Path

from manifests._common import BUILDERS, Problems, abs_dir, fail, finish, read_lines, sort_rows
from pipeline.manifest import ManifestRow

FILE_LIST = "ava_file_names_trainval_v2.1.txt"
SEGMENT_START = 900.0
SEGMENT_END = 1800.0


def _csv_movies(path_name: str, ann: Path, problems: Problems) -> set[str]:
    """Movie ids (first column) of an AVA annotation CSV."""
    movies: set[str] = set()
    path = abs_dir(ann / path_name)
    for lineno, text in read_lines(path, problems, "AVA annotation CSV"):
        movie = text.split(",", 1)[0].strip()
        if not movie or "," not in text:
            problems.add(f"{path.name} line {lineno}: expected '<movie_id>,<second>,...', got {text!r}")
            continue
        movies.add(movie)
    return movies


@BUILDERS.register("ava")
def build_ava(
    *,
    root: str | os.PathLike,
    annotations: str | os.PathLike,
    file_list: str = FILE_LIST,
    train_csv: str | None = None,
    val_csv: str | None = None,
    split: str = "trainval",
    unassigned: str | None = None,
    start: float = SEGMENT_START,
    end: float = SEGMENT_END,
) -> list[ManifestRow]:
    """One row per AVA movie, trimmed to the annotated segment (seconds).

    Args:
        root: folder holding the movie files named as in the file list.
        annotations: folder holding the file list and the optional CSVs (names relative to it,
            or absolute).
        file_list: the list of movie file names.
        train_csv, val_csv: e.g. ``ava_train_v2.2.csv``; movies found there get split
            ``train`` / ``val``.
        split: split of every movie when no CSV is given.
        unassigned: split for movies in no given CSV (default: such movies are an error).
        start, end: the segment in seconds.

    Raises:
        ManifestError: listing every malformed line, movie in both CSVs, movie in a CSV but
            not in the file list, unassigned movie, duplicate id and missing video.
    """
    if not start < end:
        raise fail("ava", f"start ({start}) must be before end ({end}) (seconds)")
    root_p, ann = abs_dir(root), abs_dir(annotations)
    problems = Problems()
    hint = "check --annotations (file list and CSVs) and --root (the movie folder)"

    movies: list[tuple[str, str]] = []  # (movie id, file name)
    list_path = ann / file_list
    for lineno, text in read_lines(list_path, problems, "AVA file list"):
        movie, dot, ext = text.rpartition(".")
        if not dot or not movie or "/" in text or " " in text:
            problems.add(f"{list_path.name} line {lineno}: expected '<movie_id>.<ext>', got {text!r}")
            continue
        movies.append((movie, text))

    assigned: dict[str, str] = {}
    by_split = {s: name for s, name in (("train", train_csv), ("val", val_csv)) if name}
    csv_movies = {s: _csv_movies(name, ann, problems) for s, name in by_split.items()}
    for s, ids in csv_movies.items():
        for m in ids:
            if m in assigned:
                problems.add(f"movie {m!r} is in both the {assigned[m]} and the {s} CSV")
            assigned.setdefault(m, s)
    listed = {m for m, _ in movies}
    for m in sorted(set(assigned) - listed):
        problems.add(f"movie {m!r} is in the {assigned[m]} CSV but not in {file_list}")

    rows: list[ManifestRow] = []
    for movie, name in movies:
        if not by_split:
            movie_split = split
        elif movie in assigned:
            movie_split = assigned[movie]
        elif unassigned is not None:
            movie_split = unassigned
        else:
            problems.add(
                f"movie {movie!r} is in no given CSV (pass unassigned='<split>' to keep such movies)"
            )
            continue
        rows.append(
            ManifestRow(
                video_id=movie, path=str(root_p / name), split=movie_split, start=start, end=end
            )
        )
    return finish("ava", sort_rows(rows), problems, source=str(ann), hint=hint)
