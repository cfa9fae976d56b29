"""Dataclass configs: one typed loader for every stage.

Every config is a (possibly nested) dataclass. Values come in layers, later layers winning:
the dataclass defaults, tables of TOML files, then dotted command-line overrides such as
``optim.base_lr=1e-3`` (parsed as TOML values: ``1e-3`` is a float, ``[1,2]`` a list,
``true`` a bool, anything unparseable a string).

:func:`from_dict` checks every value against the field's annotation when it is parsed
(``fps=four`` is refused at once with the field's type) and refuses unknown keys with their
dotted path; all problems are reported together in one :class:`~pipeline.errors.ConfigError`.

Which fields are *runtime knobs* (they may differ when a run or an extraction is resumed:
devices, workers, logging) and which define *content* is declared once, on the field::

    workers: int = runtime(2)

:func:`content_dict` drops the runtime fields; resume checks and store headers compare it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar

from pipeline.errors import ConfigError

C = TypeVar("C")

_RUNTIME = "freezeframe_runtime"


def runtime(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is a runtime knob: it may change between resumed runs and is
    left out of :func:`content_dict`."""
    kw: dict[str, Any] = {"metadata": {_RUNTIME: True}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    else:
        kw["default"] = default
    return dataclasses.field(**kw)


def is_runtime(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(_RUNTIME, False))


def runtime_keys(cls: type) -> list[str]:
    """Dotted names of every runtime field of dataclass ``cls`` (nested configs included)."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_runtime(f):
            out.append(f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            out += [f"{f.name}.{k}" for k in runtime_keys(hints[f.name])]
    return out


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def content_dict(cfg: Any) -> dict:
    """:func:`to_dict` without the runtime fields: what must match to resume a run."""
    return drop_keys(to_dict(cfg), runtime_keys(type(cfg)))


def drop_keys(d: dict, dotted_keys: Sequence[str]) -> dict:
    """A deep copy of ``d`` without the given dotted keys (missing keys are ignored)."""
    out = json.loads(json.dumps(d))
    for key in dotted_keys:
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def config_hash(d: dict) -> str:
    """Stable short hash of a JSON-ready dict."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def diff_dicts(have: Mapping, want: Mapping, prefix: str = "", *, have_name: str = "existing",
               want_name: str = "wanted") -> list[str]:
    """Readable lines, one per dotted key whose value differs between two nested dicts."""
    out = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k), want.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff_dicts(a, b, f"{prefix}{k}.", have_name=have_name, want_name=want_name)
        elif a != b:
            out.append(f"{prefix}{k}: {have_name} {a!r}, {want_name} {b!r}")
    return out


# --------------------------------------------------------------------------------------
# layers: TOML files and dotted overrides
# --------------------------------------------------------------------------------------
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
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.base_lr=1e-3)")
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is set to a value and used as a table")
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
    """A TOML file as a dict; a missing or malformed file is a :class:`ConfigError`."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def resolve(cls: type[C], layers: Sequence[Mapping] = (), overrides: Sequence[str] = ()) -> C:
    """Defaults <- each dict layer in order <- dotted overrides, type-checked."""
    d: dict = {}
    for layer in layers:
        d = merge(d, dict(layer))
    d = merge(d, parse_overrides(overrides))
    return from_dict(cls, d)


# --------------------------------------------------------------------------------------
# typed construction
# --------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


class _Problems(list):
    def add(self, where: str, msg: str) -> None:
        self.append(f"{where}: {msg}")


def _coerce(tp: Any, value: Any, where: str, problems: _Problems) -> Any:
    """``value`` converted to annotation ``tp`` (int -> float, list -> tuple), or a problem."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, where, problems)
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        problems.add(where, f"expected a table of {tp.__name__} fields, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[str] = []
        for a in args:
            if a is type(None):
                continue
            sub = _Problems()
            v = _coerce(a, value, where, sub)
            if not sub:
                return v
            errors += sub
        problems.add(where, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.add(where, f"expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            problems.add(where, f"expected a list, got {value!r}")
            return value
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                problems.add(where, f"expected a list of {len(args)} values, got {list(value)!r}")
                return value
            items = [_coerce(a, v, f"{where}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(elem, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            problems.add(where, f"expected a table, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.add(where, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(where, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(where, f"expected a number, got {value!r}")
            return value
        value = float(value)
        if math.isnan(value):
            problems.add(where, "expected a number, got nan")
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.add(where, f"expected a string, got {value!r}")
        return value
    return value


def _build(cls: type[C], d: Mapping, where: str, problems: _Problems) -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{where}." if where else ""
    n = len(problems)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        problems.append(f"unknown config key(s) {[prefix + u for u in unknown]}; known: {sorted(fields)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k, problems) for k, v in d.items() if k in fields}
    try:
        base = cls()  # type: ignore[call-arg]
    except Exception as e:  # a default that fails its own check: report, do not crash
        problems.append(f"{where or cls.__name__}: {e}")
        return None  # type: ignore[return-value]
    if len(problems) > n:  # unknown keys or wrong types: __post_init__ checks would repeat them
        return base
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError as e:
        problems.append(str(e))
    except (ValueError, TypeError) as e:  # __post_init__ range checks
        problems.append(f"{where or cls.__name__}: {e}")
    return base


def check_value(tp: Any, value: Any, where: str) -> tuple[Any, list[str]]:
    """``value`` checked against type annotation ``tp`` as :func:`from_dict` checks a field
    (no bool for an int, no float for an int, nan refused, int -> float, list -> tuple).

    Returns the converted value and the problems found (``"where: expected ..."``), empty
    when it fits. For records that are not configs (manifest rows) but want the same rules.
    """
    problems = _Problems()
    out = _coerce(tp, value, where, problems)
    return out, list(problems)


def from_dict(cls: type[C], d: Mapping, _where: str = "") -> C:
    """Build dataclass ``cls`` from a dict, type-checking every value.

    Unknown keys are refused with their dotted name, wrong types with the field's type,
    and values rejected by a ``__post_init__`` with its message: all in one ConfigError.
    """
    problems = _Problems()
    out = _build(cls, d, _where, problems)
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"invalid config: {problems[0]}")
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
    return out
