"""Provenance recorded in every store and every run directory."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

TRACKED_PACKAGES = (
    "torch", "torchvision", "open_clip_torch", "timm", "av", "zarr", "numcodecs",
    "numpy", "webdataset", "typer", "rich", "freezeframe",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the libraries whose behaviour shapes features or training."""
    out: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(cwd: str | os.PathLike | None = None) -> str | None:
    """The checkout's commit (with ``-dirty`` when there are local changes), or None."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def environment() -> dict:
    """Versions, git revision, host and time: the common provenance block."""
    return {
        "packages": package_versions(),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
