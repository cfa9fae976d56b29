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
    delta = true                       # optional: each point also PRP-pretrained, then fine-tuned from it
    pretrain_set = ["optim.epochs=20"] # overrides of those PRP runs (instead of ``set``)
    [[tables]]                         # optional: the report's ablation tables (paper's shape)
    title = "Spatial pooling"
    keys = ["model.spatial_pool"]      # rows: the points that change only these keys (+ the base point)

Each run's directory is named from its own overrides (``temporal_kernel=3,spatial_pool=7``),
so rerunning the sweep resumes interrupted runs and skips finished ones (``train.loop.fit``
does both). With ``delta``, point ``NAME`` also gets ``NAME@prp`` (PRP pretraining) and
``NAME@prp-ft`` (the same fine-tuning initialised from it): the report's Delta-Acc.

Runs are shared by jobs in units (a point: its run, or its three runs with ``delta``, which
depend on each other): unit k goes to job ``k % count``. The job's place comes from
:func:`sweep_share`: torchrun / srun ranks (:func:`pipeline.dist.discover_rank`), else a Slurm
array's task id, else explicit ``index``/``count``. Each job trains its runs alone (one process,
no process group). The last job to finish writes the report (:mod:`train.ablation`).
"""
from __future__ import annotations

import itertools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from pipeline.config import from_dict, load_toml
from pipeline.dist import RankInfo, discover_rank, resolve_device
from pipeline.errors import ConfigError
from pipeline.paths import project_root, rooted

__all__ = ["SweepSpec", "SweepRun", "SweepTable", "SweepUnit", "load_sweep", "expand_sweep", "sweep_configs",
           "sweep_units", "sweep_share", "single_process", "rank_device", "PRP_SUFFIX", "PRP_FT_SUFFIX"]

PRP_SUFFIX = "@prp"  # <point>@prp: the point's PRP pretraining run (``delta = true``)
PRP_FT_SUFFIX = "@prp-ft"  # <point>@prp-ft: the point's fine-tuning initialised from it


@dataclass
class SweepTable:
    """One ablation table of the report: the points that change only ``keys`` (and the base point)."""

    title: str = "Ablation"
    keys: list[str] = field(default_factory=list)


@dataclass
class SweepSpec:
    task: str = "finetune"
    out: str = "runs/sweep"
    dataset: str | None = None
    config: str | None = None
    set: list[str] = field(default_factory=list)
    grid: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    delta: bool = False
    pretrain_set: list[str] = field(default_factory=list)
    tables: list[SweepTable] = field(default_factory=list)


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: its directory name and its own overrides (``key=value``)."""

    name: str
    overrides: tuple[str, ...]


def load_sweep(path: str | Path) -> SweepSpec:
    """A sweep spec from TOML (unknown keys and wrong types refused together). A spec shipped in
    ``train/configs`` writes under the data root (:mod:`pipeline.paths`); a user's spec where its
    ``out`` says (relative: the current directory)."""
    spec = from_dict(SweepSpec, load_toml(path))
    if Path(path).resolve().is_relative_to(project_root() / "train" / "configs"):
        spec.out = rooted(spec.out)  # a shipped spec: its runs go under the data root, wherever it is run from
    problems = [f"grid.{k}: expected a non-empty list of values, got {v!r}" for k, v in spec.grid.items()
                if not isinstance(v, list) or not v]
    if not spec.grid and not spec.runs:
        problems.append("the spec has neither [grid] values nor [[runs]]: nothing to sweep")
    problems += [f"tables[{i}] ({t.title!r}): keys is empty" for i, t in enumerate(spec.tables) if not t.keys]
    if spec.delta and spec.task != "finetune":
        problems.append(f"delta = true pairs PRP pretraining with fine-tuning: task must be 'finetune', not {spec.task!r}")
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


@dataclass(frozen=True)
class SweepUnit:
    """The runs of one point, in the order they must run: ``[(run name, config)]`` (one run, or
    with ``delta`` the PRP pretraining, the fine-tuning from it and the one from scratch)."""

    point: SweepRun
    runs: tuple[tuple[str, Any], ...]


def _run_overrides(spec: SweepSpec, name: str, *layers: Sequence[str]) -> list[str]:
    return [*(o for layer in layers for o in layer), f"run_dir={_value(str(Path(spec.out) / name))}",
            f"name={_value(name)}"]


def sweep_units(spec: SweepSpec, resolve: Callable[..., Any], index: int = 0, count: int = 1) -> list[SweepUnit]:
    """This job's units (``k % count == index``), every point of the sweep resolved first, so a
    bad value anywhere is refused before a run starts. ``resolve`` is
    ``train.config.resolve_train_config``."""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"sweep job index {index} of {count}: need 0 <= index < count")
    units = []
    for r in expand_sweep(spec):
        runs = []
        if spec.delta:
            prp = r.name + PRP_SUFFIX
            runs.append((prp, resolve("prp", spec.dataset, spec.config,
                                      _run_overrides(spec, prp, spec.pretrain_set, r.overrides))))
            ft = r.name + PRP_FT_SUFFIX
            runs.append((ft, resolve(spec.task, spec.dataset, spec.config, _run_overrides(
                spec, ft, spec.set, r.overrides, [f"init={_value(str(Path(spec.out) / prp))}"]))))
        runs.append((r.name, resolve(spec.task, spec.dataset, spec.config, _run_overrides(spec, r.name, spec.set,
                                                                                          r.overrides))))
        units.append(SweepUnit(r, tuple(runs)))
    return [u for k, u in enumerate(units) if k % count == index]


def run_names(spec: SweepSpec) -> list[str]:
    """Every run directory name of the sweep, in unit order."""
    names = []
    for r in expand_sweep(spec):
        names += [r.name + PRP_SUFFIX, r.name + PRP_FT_SUFFIX] if spec.delta else []
        names.append(r.name)
    return names


def sweep_share(index: int | None = None, count: int | None = None,
                env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(index, count)`` of this job: explicit values win; else a torchrun / srun rank
    (:func:`pipeline.dist.discover_rank`: rank of world); else a Slurm array task
    (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``); else ``(0, 1)``."""
    env = os.environ if env is None else env
    if index is not None or count is not None:
        return (index or 0), (count or 1)
    rank = discover_rank(env)
    if rank.world > 1:
        return rank.rank, rank.world
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        try:
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
        except ValueError:
            raise ConfigError("SLURM_ARRAY_TASK_ID/COUNT/MIN are not integers; pass --index/--count") from None
    return 0, 1


#: the launcher variables a training run reads to join a process group (train.distributed.setup)
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_LOCALID")


def rank_device(device: str, rank: RankInfo | None = None) -> str:
    """The device a sweep run of this rank trains on: ``auto`` becomes this rank's GPU (local rank
    modulo the GPUs; else the CPU), fixed before :func:`single_process` hides the rank."""
    return str(resolve_device(device, rank or discover_rank())) if device == "auto" else device


@contextmanager
def single_process() -> Iterator[None]:
    """Hide the launcher's variables while a sweep run trains: every rank of a torchrun / srun
    sweep trains its own runs alone instead of joining one process group. Restored after."""
    saved = {k: os.environ.pop(k) for k in _LAUNCHER_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def sweep_configs(spec: SweepSpec, resolve: Callable[..., Any], index: int = 0, count: int = 1) -> list[Any]:
    """The resolved configs of this job's share (:func:`sweep_units`, flattened in run order)."""
    return [cfg for u in sweep_units(spec, resolve, index, count) for _, cfg in u.runs]
