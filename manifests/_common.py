"""Shared pieces of the manifest builders: the registry, problem collection, file helpers.

Every builder collects *all* problems it finds (malformed lines, unknown labels, missing
videos, duplicate ids, ...) into a :class:`Problems` list and calls :func:`finish`, which
adds the checks of :func:`pipeline.manifest.validate_manifest` and raises one
:class:`~pipeline.errors.ManifestError` listing everything.
"""
from __future__ import annotations

import inspect
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pipeline.errors import ManifestError
from pipeline.manifest import ManifestRow, validate_manifest
from pipeline.registry import Registry

#: A builder takes keyword options only and returns manifest rows in a deterministic order.
ManifestBuilder = Callable[..., list[ManifestRow]]

#: format name -> builder (``ucf101``, ``kinetics400``, ``webdataset``, ...).
BUILDERS: Registry[ManifestBuilder] = Registry("manifest format")

#: File extensions (lower case, no dot) treated as videos by the generic builders.
VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "avi", "mkv", "webm", "mov", "m4v")

#: Order of the usual split names in manifests; other names follow, alphabetically.
_SPLIT_RANK = {"train": 0, "val": 1, "test": 2}


class ManifestWarning(UserWarning):
    """Something was dropped or adjusted on request (e.g. ``allow_missing=True``).

    The CLI prints these; library users see them through :mod:`warnings`.
    """


def split_key(split: str) -> tuple[int, str]:
    """Sort key putting ``train``, ``val``, ``test`` first, then other splits by name."""
    return (_SPLIT_RANK.get(split, len(_SPLIT_RANK)), split)


def sort_rows(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """Rows sorted by split (train, val, test, others) then path then video_id."""
    return sorted(rows, key=lambda r: (split_key(r.split), r.path, r.video_id))


def abs_dir(path: str | os.PathLike) -> Path:
    """Absolute path (``~`` expanded, symlinks kept) so manifests work from any directory."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


class Problems:
    """An ordered list of human-readable problems found while building a manifest."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)


def fail(fmt: str, summary: str, problems: Sequence[str] = ()) -> ManifestError:
    """A ManifestError for a bad option (raised before any file is read)."""
    return ManifestError(f"{fmt}: {summary}", list(problems))


def run_builder(registry: Registry[Callable[..., Any]], fmt: str, options: dict[str, Any]) -> Any:
    """Call the builder of format ``fmt`` in ``registry`` with the keyword ``options``, once
    they are known to fit its signature.

    Raises:
        ManifestError: an unknown format (naming the known ones), an option the builder does
            not take (naming those it takes), a required option left out, or every problem
            the builder found in the data.
    """
    try:
        builder = registry.get(fmt)
    except KeyError as e:
        raise ManifestError(str(e.args[0])) from None
    params = inspect.signature(builder).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ManifestError(f"{fmt}: unknown option(s) {unknown}; accepted: {', '.join(params)}")
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    absent = [n for n in required if n not in options]
    if absent:
        raise ManifestError(f"{fmt}: missing required option(s) {absent}")
    return builder(**options)


def finish(
    fmt: str,
    rows: list[ManifestRow],
    problems: Problems,
    *,
    source: str,
    check_files: bool = True,
    num_classes: int | None = None,
    hint: str = "",
) -> list[ManifestRow]:
    """Run the shared manifest checks and raise one ManifestError with every problem.

    Args:
        fmt: format name, for the message.
        rows: the rows, already in their final order.
        problems: problems the builder found while parsing.
        source: where the annotations came from (shown in the message).
        check_files: also check that every ``path`` exists (False when the builder did).
        num_classes: labels must lie in ``[0, num_classes)``.
        hint: what the user should do, appended to the summary line.
    """
    try:
        validate_manifest(rows, check_files=check_files, num_classes=num_classes)
    except ManifestError as e:
        problems.items.extend(e.problems)
    if problems:
        summary = f"{fmt} manifest from {source}: {len(problems)} problem(s)"
        summary += f"; {hint}" if hint else "; fix them and run again"
        raise ManifestError(summary, problems.items)
    return rows


def find_file(directory: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that exists in ``directory`` (None if none does)."""
    for name in names:
        p = directory / name
        if p.is_file():
            return p
    return None


def find_split_files(
    fmt: str,
    folder: Path,
    names: dict[str, Sequence[str]],
    splits: Sequence[str] | None,
    problems: Problems,
    noun: str,
) -> dict[str, Path]:
    """The annotation file of each split in ``folder``: ``names[split]`` lists the names it may
    have (the first found wins). ``splits`` None: every split whose file exists; otherwise
    exactly those, a missing one being a problem (``noun`` names the file, e.g. ``CSV``).

    Raises:
        ManifestError: a split that is not a key of ``names`` (before any file is read).
    """
    unknown = [s for s in (splits or ()) if s not in names]
    if unknown:
        raise fail(fmt, f"unknown split(s) {unknown}; choose from {list(names)}")
    found: dict[str, Path] = {}
    for split in (splits if splits is not None else names):
        path = find_file(folder, names[split])
        if path is not None:
            found[split] = path
        elif splits is not None:
            problems.add(f"missing {split} {noun}: none of {list(names[split])} in {str(folder)!r}")
    return found


def read_lines(path: Path, problems: Problems, what: str) -> Iterator[tuple[int, str]]:
    """``(line_number, stripped_text)`` of the non-empty lines of a text annotation file.

    Handles a UTF-8 BOM and Windows line endings (UCF101's lists use CRLF). A missing
    file is added to ``problems`` and yields nothing.
    """
    if not path.is_file():
        problems.add(f"missing {what} {str(path)!r}")
        return
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if text:
                yield lineno, text


def read_json(path: Path, problems: Problems, what: str) -> Any | None:
    """Parsed JSON of an annotation file, or None (with a problem added) if unreadable."""
    if not path.is_file():
        problems.add(f"missing {what} {str(path)!r}")
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.add(f"{what} {str(path)!r} is not valid JSON: {e}")
        return None


def json_entries(path: Path, problems: Problems, what: str, shape: str) -> Iterator[tuple[str, Any]]:
    """``(where, entry)`` for each entry of a JSON file that holds a list (``where`` is
    ``"<file name> entry <i>"``, for problems about the entry). An unreadable file, or one that
    is not a list (``shape`` describes the objects expected, e.g. ``{id, template, ...}``), is a
    problem and yields nothing."""
    data = read_json(path, problems, what)
    if data is None:
        return
    if not isinstance(data, list):
        problems.add(f"{path.name}: expected a list of {shape} objects")
        return
    for i, entry in enumerate(data):
        yield f"{path.name} entry {i}", entry


def walk_videos(
    root: Path, extensions: Sequence[str] = VIDEO_EXTENSIONS
) -> Iterator[Path]:
    """Every video file under ``root``, recursively, in sorted (stable) order.

    Extensions match case-insensitively. Hidden files and folders (name starting with
    ``.``, e.g. macOS ``._x.mp4`` resource forks) are skipped. Symlinked folders are
    followed once (a cycle of links is not walked twice).
    """
    exts = {e.lower().lstrip(".") for e in extensions}
    seen: set[str] = set()

    def walk(d: Path) -> Iterator[Path]:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=True):
                yield from walk(Path(e.path))
            elif e.is_file(follow_symlinks=True):
                ext = e.name.rsplit(".", 1)[-1].lower() if "." in e.name else ""
                if ext in exts:
                    yield Path(e.path)

    yield from walk(root)


def video_id_from_relpath(rel: Path) -> str:
    """``a/b/clip.mp4`` -> ``a/b/clip`` (POSIX separators, stable across OSes)."""
    return rel.with_suffix("").as_posix()


def resolve_classes(
    classes: Sequence[str] | None,
    classes_file: str | os.PathLike | None,
    problems: Problems,
) -> list[str] | None:
    """An explicit class list (label = position), from ``classes`` or ``classes_file``.

    ``classes_file`` holds one class name per non-empty line. Returns None when neither
    is given (the builder then derives the classes from the data).
    """
    if classes is not None and classes_file is not None:
        problems.add("give either classes or classes_file, not both")
    if classes is not None:
        names = [str(c) for c in classes]
    elif classes_file is not None:
        names = [t for _, t in read_lines(abs_dir(classes_file), problems, "class list file")]
    else:
        return None
    dups = sorted(n for n, k in Counter(names).items() if k > 1)
    for n in dups:
        problems.add(f"class {n!r} appears twice in the class list")
    return names
