"""Ablation sweeps: a grid (and lists) of overrides over one store, one run directory per point.

A spec is a TOML file::

    task = "finetune"                  # a registered task (prp, finetune, ...)
    dataset = "synth-motion"           # optional: train/configs/<dataset>.toml
    config = "my.toml"                 # optional: a config file
    out = "runs/kt-ablation"           # the runs go to <out>/<name>
    set = ["optim.epochs=20"]          # overrides shared by every run
    [grid]                             # every combination of these values
    "model.tmm.temporal_kernel" = [1, 3]
    "model.spatial_pool" = [1, 7]
    [[runs]]                           # and/or explicit points (a table of overrides each)
    "model.arch" = "avgpool"

Each run's directory is named from its own overrides (``temporal_kernel=3,spatial_pool=7``),
so rerunning the sweep resumes interrupted runs and skips finished ones (``train.loop.fit``
does both). ``index``/``count`` give a job its share of the runs (a Slurm array, or one
process per machine): run i goes to job ``i % count``. The result is ``report`` over ``out``.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.config import from_dict, load_toml
from pipeline.errors import ConfigError

__all__ = ["SweepSpec", "SweepRun", "load_sweep", "expand_sweep", "sweep_configs"]


@dataclass
class SweepSpec:
    task: str = "finetune"
    out: str = "runs/sweep"
    dataset: str | None = None
    config: str | None = None
    set: list[str] = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: its directory name and its own overrides (``key=value``)."""

    name: str
    overrides: tuple[str, ...]


def load_sweep(path: str | Path) -> SweepSpec:
    """A sweep spec from TOML (unknown keys and wrong types refused together)."""
    spec = from_dict(SweepSpec, load_toml(path))
    problems = [f"grid.{k}: expected a non-empty list of values, got {v!r}" for k, v in spec.grid.items()
                if not isinstance(v, list) or not v]
    if not spec.grid and not spec.runs:
        problems.append("the spec has neither [grid] values nor [[runs]]: nothing to sweep")
    if problems:
        raise ConfigError(f"invalid sweep {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return spec


def _value(v: Any) -> str:
    """A value in override syntax (TOML): strings quoted, lists/bools as TOML."""
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def _name(point: dict[str, Any], short: bool) -> str:
    parts = []
    for k, v in point.items():
        key = k.rsplit(".", 1)[-1] if short else k
        text = v if isinstance(v, str) else _value(v)
        parts.append(f"{key}={text}")
    name = ",".join(parts) or "base"
    return "".join(ch if ch.isalnum() or ch in "-_.=,+" else "_" for ch in name)


def expand_sweep(spec: SweepSpec) -> list[SweepRun]:
    """Every point: the grid's combinations (keys in spec order) then the explicit runs. Names use
    the last part of each key, or the full dotted keys when the short names would collide."""
    keys = list(spec.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))] if keys else []
    points += [dict(r) for r in spec.runs]
    short = len({_name(p, True) for p in points}) == len(points)
    out = []
    for p in points:
        out.append(SweepRun(_name(p, short), tuple(f"{k}={_value(v)}" for k, v in p.items())))
    if len({r.name for r in out}) != len(out):
        raise ConfigError("two points of the sweep have the same overrides; remove the duplicate")
    return out


def sweep_configs(spec: SweepSpec, resolve: Callable[..., Any], index: int = 0, count: int = 1) -> list[Any]:
    """The resolved configs of this job's share of the runs (``i % count == index``), each with
    ``run_dir = <out>/<name>`` and ``name``; every point is resolved first, so a bad value in any
    of them is refused before a run starts. ``resolve`` is ``train.config.resolve_train_config``."""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"sweep job index {index} of {count}: need 0 <= index < count")
    runs = expand_sweep(spec)
    cfgs = []
    for r in runs:
        overrides: Sequence[str] = [*spec.set, *r.overrides, f"run_dir={_value(str(Path(spec.out) / r.name))}",
                                    f"name={_value(r.name)}"]
        cfgs.append(resolve(spec.task, spec.dataset, spec.config, overrides))
    return [c for i, c in enumerate(cfgs) if i % count == index]
