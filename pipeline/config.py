"""Dataclass configs: load from TOML files, override with dotted ``key=value`` strings.

Every config is a (possibly nested) dataclass. Files hold a subset of its fields;
command-line overrides such as ``optim.lr=1e-3`` or ``model.temporal_kernel=1`` are parsed
as TOML values (so ``1e-3`` is a float, ``[1,2]`` a list, ``true`` a bool, anything
unparseable a string).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from pipeline.errors import ConfigError

C = TypeVar("C")


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(d: dict) -> str:
    """Stable short hash of a JSON-ready dict."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(text.strip())
    return out


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge (update wins)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_toml(path: str | Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, _where=where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(args[0], value, where)
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (tuple,) and isinstance(value, list):
        return tuple(value)
    return value


def from_dict(cls: type[C], d: dict, _where: str = "") -> C:
    """Build dataclass ``cls`` from a dict, refusing unknown keys with their dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - names)
    if unknown:
        where = f"{_where}." if _where else ""
        raise ConfigError(
            f"unknown config key(s) {[where + u for u in unknown]}; known: {sorted(names)}"
        )
    kwargs = {}
    for k, v in d.items():
        kwargs[k] = _coerce(hints[k], v, f"{_where}.{k}" if _where else k)
    base = cls()  # type: ignore[call-arg]
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in kwargs:
            continue
        cur = getattr(base, f.name)
        if dataclasses.is_dataclass(cur) and isinstance(d[f.name], dict):
            kwargs[f.name] = from_dict(type(cur), d[f.name], _where=f.name)
    return dataclasses.replace(base, **kwargs)


def resolve(cls: type[C], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> C:
    """Defaults <- each TOML file in order <- dotted overrides."""
    d: dict = {}
    for f in files:
        d = merge(d, load_toml(f))
    d = merge(d, parse_overrides(overrides))
    return from_dict(cls, d)
