"""Where the relative paths of the project's shipped config files point: the data root.

A dataset config (``manifests/configs/<name>.toml``, ``train/configs/<name>.toml``, the shipped
sweeps and experiments) names its manifest, store, run directories in paths such as
``stores/ucf101.zarr``. Those resolve against the **data root**, not the current directory:
``--data-root DIR`` (the root option of the CLI, which sets the variable) or the environment
variable ``FREEZEFRAME_DATA_ROOT``, else the project root (the checkout holding ``pipeline/``).
Absolute paths stay as they are; paths a user types (``--store``, ``--set``, ``--config``
files of their own) are the user's and keep meaning the current directory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["DATA_ROOT_ENV", "project_root", "data_root", "rooted", "root_keys"]

DATA_ROOT_ENV = "FREEZEFRAME_DATA_ROOT"


def project_root() -> Path:
    """The checkout (or installed tree) holding the ``pipeline`` package."""
    return Path(__file__).resolve().parent.parent


def data_root(env: Mapping[str, str] | None = None) -> Path:
    """``$FREEZEFRAME_DATA_ROOT`` if set (and not empty), else :func:`project_root`."""
    value = (os.environ if env is None else env).get(DATA_ROOT_ENV, "")
    return Path(value).expanduser().resolve() if value else project_root()


def rooted(path: Any, root: Path | None = None) -> Any:
    """A relative path string as a path under ``root`` (default :func:`data_root`); absolute
    paths, empty strings and non-strings (None) unchanged."""
    if not isinstance(path, str) or not path or Path(path).expanduser().is_absolute():
        return path
    return str((root or data_root()) / path)


def root_keys(table: Mapping[str, Any], keys: Sequence[str], root: Path | None = None) -> dict[str, Any]:
    """A copy of a config table with the values of the dotted ``keys`` rooted (:func:`rooted`);
    a key may be written dotted (``data.store = ...``) or as nested tables (``[data] store``)."""
    out: dict[str, Any] = dict(table)
    for key in keys:
        if key in out:
            out[key] = rooted(out[key], root)
            continue
        head, _, rest = key.partition(".")
        if rest and isinstance(out.get(head), Mapping):
            out[head] = root_keys(out[head], [rest], root)
    return out
