"""Video tar shards as video2dataset / webdataset write them, read in place (never unpacked).

A shard is an uncompressed tar whose members are grouped into samples by key, the
webdataset way (the key is the member name up to the first dot of its base name)::

    000000000.mp4   000000000.json   000000000.txt   [000000000.cls]
    000000001.mp4   ...

Each video member (extension in ``extensions``) becomes one row with
``path = "tar://<member>::<absolute tar path>"`` (an fsspec chained URL; the decoder reads the
member in place through a cached index of the tar) and ``video_id = key``. Shards may be
remote (``s3://bucket/k400/`` or ``s3://bucket/k400/*.tar``, any fsspec URL): the rows are then
``tar://<member>::s3://bucket/k400/000000.tar``. Keys must be unique across all shards.
Samples without a video member (video2dataset's failed downloads) are skipped.

Labels (all optional):

* ``<key>.cls``: integer class index as text (webdataset's convention);
* ``<key>.json`` ``"label"``: an integer index, or a class *name* (as when video2dataset
  copies a Kinetics CSV's ``label`` column); names become indices into the ``classes``
  option or, by default, the sorted set of names over all shards;
* ``<key>.json`` ``"label_name"``: the class name of an integer label.

Captions (``<key>.txt`` and json ``"caption"``) are free text, never a class name, so they
are not used.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from manifests._common import (
    BUILDERS,
    VIDEO_EXTENSIONS,
    Problems,
    abs_dir,
    fail,
    finish,
    resolve_classes,
)
from pipeline.manifest import ManifestRow

#: webdataset's key/extension split (``tariterators.base_plus_ext``).
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
#: webdataset skips such members (``__key__``-style metadata).
_META = re.compile(r"__[^/]*__($|/)")


def _is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def tar_url(member: str, tar_path: str | os.PathLike) -> str:
    """fsspec URL of a member inside a tar: ``tar://<member>::<abs tar path or URL>``."""
    return f"tar://{member}::{tar_path if _is_url(tar_path) else abs_dir(tar_path)}"


def _expand_remote(entry: str, problems: Problems) -> list[str]:
    """URLs of the shards a remote entry names: a ``.tar`` URL, a folder or a glob pattern."""
    import fsspec  # lazy: only remote shards need it

    try:
        fs, path = fsspec.core.url_to_fs(entry)
        if fsspec.core.has_magic(path):
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
        else:
            found = [path] if fs.exists(path) else []
    except ImportError as e:
        problems.add(f"cannot read {entry!r}: {e} (install the library for this URL, e.g. pip install s3fs)")
        return []
    except OSError as e:
        problems.add(f"cannot list {entry!r} ({type(e).__name__}: {e})")
        return []
    return [fs.unstrip_protocol(p) for p in found]


def expand_shards(shards: Sequence[str | os.PathLike], problems: Problems) -> list[Path | str]:
    """Shard paths from files, folders (their ``*.tar``, sorted) and glob patterns, in order;
    remote entries (``s3://...``) give URLs."""
    out: list[Path | str] = []
    for entry in shards:
        if _is_url(entry):
            found_urls = _expand_remote(os.fspath(entry), problems)
            if not found_urls:
                problems.add(f"no tar shard matches {os.fspath(entry)!r}")
            out += found_urls
            continue
        p = abs_dir(entry)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix == ".tar" and q.is_file())
        elif p.is_file():
            found = [p]
        else:
            found = [Path(q) for q in sorted(glob.glob(str(p)))]
        if not found:
            problems.add(f"no tar shard matches {os.fspath(entry)!r}")
        out += found
    return list(dict.fromkeys(out))


@dataclass
class _Sample:
    key: str
    tar: Path | str
    video: list[str]
    cls_text: str | None = None
    meta: dict | None = None


def _shard_name(tar_path: Path | str) -> str:
    return tar_path.name if isinstance(tar_path, Path) else tar_path.rsplit("/", 1)[-1]


@contextmanager
def _open_tar(tar_path: Path | str) -> Iterator[tarfile.TarFile]:
    """A local tar, or a remote one read through fsspec (one sequential pass over its headers)."""
    if isinstance(tar_path, Path):
        with tarfile.open(tar_path, mode="r:") as tf:
            yield tf
        return
    import fsspec  # lazy: only remote shards need it

    with fsspec.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        yield tf


def _read_shard(tar_path: Path | str, extensions: set[str], problems: Problems) -> list[_Sample]:
    """Samples of one shard, in member order, reading headers and the small sidecars only."""
    samples: dict[str, _Sample] = {}
    name = _shard_name(tar_path)
    try:
        with _open_tar(tar_path) as tf:
            for info in tf:
                if not info.isreg() or _META.match(info.name):
                    continue
                m = _BASE_PLUS_EXT.match(info.name)
                if not m:
                    continue
                # "./k.mp4" (tar made with "tar cf x.tar ./"): key "k", member name kept.
                key, ext = m.group(1).removeprefix("./"), m.group(2).lower()
                if ext not in extensions and ext not in ("cls", "json"):
                    continue
                s = samples.setdefault(key, _Sample(key=key, tar=tar_path, video=[]))
                if ext in extensions:
                    s.video.append(info.name)
                    continue
                f = tf.extractfile(info)
                data = f.read() if f is not None else b""
                where = f"{name}:{info.name}"
                if ext == "cls":
                    s.cls_text = data.decode("utf-8", "replace").strip()
                else:
                    try:
                        meta = json.loads(data)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        problems.add(f"{where}: not valid JSON ({e})")
                        continue
                    if isinstance(meta, dict):
                        s.meta = meta
                    else:
                        problems.add(f"{where}: expected a JSON object")
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.add(
            f"cannot read tar shard {str(tar_path)!r} ({e}); shards must be complete, "
            "uncompressed .tar files"
        )
    return list(samples.values())


@BUILDERS.register("webdataset")
def build_webdataset(
    *,
    shards: Sequence[str | os.PathLike],
    split: str = "train",
    classes: Sequence[str] | None = None,
    classes_file: str | os.PathLike | None = None,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> list[ManifestRow]:
    """Manifest of the videos inside tar shards (read in place via fsspec ``tar://`` URLs).

    Args:
        shards: tar files, folders of ``*.tar`` and/or glob patterns, in shard order.
        split: split name of every row.
        classes, classes_file: class list for json string labels (label = position).
        extensions: member extensions treated as videos.

    Returns:
        Rows in shard order, then member order inside each shard.

    Raises:
        ManifestError: listing unreadable shards, keys repeated within or across shards,
            samples with several videos, malformed ``.cls``/``.json`` and unknown labels.
    """
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    if not shards:
        raise fail("webdataset", "no shards given; pass tar files, folders or glob patterns")
    exts = {e.lower().lstrip(".") for e in extensions}
    problems = Problems()
    class_list = resolve_classes(classes, classes_file, problems)
    hint = "check the shard paths; keys must be unique across shards"

    seen: dict[str, Path | str] = {}
    parsed: list[tuple[_Sample, int | None, str | None]] = []  # (sample, index, name)
    for tar_path in expand_shards(shards, problems):
        tar_name = _shard_name(tar_path)
        for s in _read_shard(tar_path, exts, problems):
            where = f"{tar_name}:{s.key}"
            if not s.video:
                continue  # e.g. a failed download: metadata only
            if len(s.video) > 1:
                problems.add(f"{where}: several video members {s.video}")
                continue
            if s.key in seen:
                problems.add(
                    f"duplicate video_id {s.key!r}: key in both {str(seen[s.key])!r} and "
                    f"{str(tar_path)!r} (re-key the shards, e.g. prefix the shard name)"
                )
                continue
            seen[s.key] = tar_path
            index: int | None = None
            if s.cls_text is not None:
                try:
                    index = int(s.cls_text)
                except ValueError:
                    problems.add(f"{where}.cls: expected an integer class index, got {s.cls_text!r}")
                    continue
            meta = s.meta or {}
            raw = meta.get("label")
            name = meta.get("label_name")
            if name is not None and not isinstance(name, str):
                problems.add(f"{where}.json: 'label_name' must be a string, got {name!r}")
                continue
            if isinstance(raw, bool) or (raw is not None and not isinstance(raw, (int, str))):
                problems.add(f"{where}.json: 'label' must be an integer or a class name, got {raw!r}")
                continue
            if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
                raw = int(raw)
            if isinstance(raw, int):
                if index is not None and index != raw:
                    problems.add(f"{where}: .cls says {index} but json 'label' says {raw}")
                    continue
                index = raw
            elif isinstance(raw, str):
                if name is not None and name != raw:
                    problems.add(f"{where}.json: 'label' {raw!r} and 'label_name' {name!r} differ")
                    continue
                name = raw
            parsed.append((s, index, name))

    # Class names without an index: map them through the class list.
    named_only = [n for _, i, n in parsed if i is None and n is not None]
    if named_only and any(i is not None for _, i, _ in parsed) and class_list is None:
        problems.add(
            "some samples have integer labels and others only class names; "
            "pass classes/classes_file to map the names"
        )
    if class_list is None:
        class_list = sorted(set(named_only))
    class_of = {n: k for k, n in enumerate(class_list)}

    rows: list[ManifestRow] = []
    for s, index, name in parsed:
        if index is None and name is not None:
            if name not in class_of:
                problems.add(f"{_shard_name(s.tar)}:{s.key}: unknown label {name!r} (not in the class list)")
                continue
            index = class_of[name]
        rows.append(
            ManifestRow(
                video_id=s.key,
                path=tar_url(s.video[0], s.tar),
                split=split,
                label=index,
                label_name=name,
            )
        )
    return finish(
        "webdataset",
        rows,
        problems,
        source=", ".join(os.fspath(s) for s in shards),
        check_files=False,
        num_classes=len(class_list) or None,
        hint=hint,
    )
