"""Atomic file writes: the one helper every stage uses to publish a file.

A reader (another process, a resumed run, a crash survivor) sees either the old file or the
whole new one, never a torn one: the bytes go to a unique temporary file in the same folder,
are flushed and fsynced, then renamed over the target with ``os.replace``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, mode: int = 0o644) -> Path:
    """Call ``write(f)`` on a temporary binary file, then rename it to ``path`` atomically.

    The temporary name is unique per call (``mkstemp``), so two processes writing the same
    target never share a temporary file; the last rename wins whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> Path:
    return atomic_write(path, lambda f: f.write(data), mode=mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``obj`` as JSON (non-JSON values through ``str``), with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def atomic_write_lines(path: str | os.PathLike, lines: Any) -> Path:
    """Each item of ``lines`` (strings without newline) on its own line."""
    return atomic_write_text(path, "".join(f"{line}\n" for line in lines))
