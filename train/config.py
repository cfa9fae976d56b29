"""The stage-2 training config: resolve it from dataset TOML files + overrides, read it back.

The dataclass tree is in ``train.schema`` (shared sections); each task and evaluation declares
its own section (``Task.section`` / ``Task.Config``), parsed here with the same typed loader
(``pipeline.config.from_dict``): adding a task edits neither the dataclasses nor this file.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.config import drop_keys, from_dict, load_toml, merge, parse_overrides, runtime_keys, to_dict
from pipeline.errors import ConfigError, FreezeframeError
from pipeline.paths import root_keys
from train.evals import EVALUATIONS
from train.presets import PRESETS, preset_layers
from train.schema import DataConfig, OptimConfig, TrainConfig, peak_lr, per_rank_batch
from train.tasks import TASKS, Task, get_task

__all__ = ["CONFIG_DIR", "render_config", "TrainConfig", "OptimConfig", "DataConfig", "resolve_train_config", "load_train_config",
           "plugin_sections", "content_of", "RUNTIME_KEYS"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: dotted names of the runtime knobs of TrainConfig (declared on the fields with ``runtime()``):
#: they may change when a run resumes, and do not make two runs different in a report
RUNTIME_KEYS: tuple[str, ...] = tuple(runtime_keys(TrainConfig))
_PLUGIN_KEYS = ("task_cfg", "eval_cfg")


def plugin_sections() -> dict[str, type]:
    """Section name -> dataclass, for every section a registered task or evaluation declares."""
    out: dict[str, type] = {}
    owners = [TASKS.get(n) for n in TASKS] + [EVALUATIONS.get(n) for n in EVALUATIONS]
    for owner in owners:
        if owner.section is None:
            continue
        if out.setdefault(owner.section, owner.Config) is not owner.Config:
            raise FreezeframeError(f"config section {owner.section!r} is declared with two dataclasses "
                                   f"({out[owner.section].__name__}, {owner.Config.__name__}); rename one")
        if owner.section in TrainConfig.__dataclass_fields__:
            raise FreezeframeError(f"config section {owner.section!r} of {owner.name!r} clashes with a TrainConfig field")
    return out


def _assemble(task: type[Task], d: Mapping[str, Any], task_section: Mapping | None,
              eval_sections: Mapping[str, Mapping]) -> TrainConfig:
    """TrainConfig from the shared keys ``d`` plus the task's and its evaluations' sections."""
    cfg = from_dict(TrainConfig, d)
    cfg.task = task.name
    cfg.task_cfg = from_dict(task.Config, task_section or {}, task.section or "") if task.section else None
    cfg.eval_cfg = {}
    for name in task.evaluations:
        ev = EVALUATIONS.get(name)
        if ev.section:
            cfg.eval_cfg[name] = from_dict(ev.Config, eval_sections.get(name) or {}, ev.section)
    return cfg


#: dotted keys of a training config that hold paths (rooted in the shipped dataset files)
PATH_KEYS = ("data.store", "data.splits", "run_dir", "init")


def _rooted_dataset_file(t: Mapping[str, Any]) -> dict[str, Any]:
    """A dataset file's tables (``[common]``, ``[pretrain]``..., recipe tables ``[paper.finetune]``)
    with their :data:`PATH_KEYS` under the data root (:mod:`pipeline.paths`)."""
    out: dict[str, Any] = {}
    for name, table in t.items():
        if not isinstance(table, Mapping):
            out[name] = table
            continue
        table = root_keys(table, PATH_KEYS)
        out[name] = {k: root_keys(v, PATH_KEYS) if isinstance(v, Mapping) and k not in ("data",) else v
                     for k, v in table.items()}
    return out


def resolve_train_config(task: str, dataset: str | None, config_file: str | Path | None,
                         overrides: Sequence[str]) -> TrainConfig:
    """Defaults <- recipe preset <- ``train/configs/<dataset>.toml`` <- ``config_file`` <- ``overrides``.

    Relative paths of the dataset file (:data:`PATH_KEYS`) are under the data root
    (:func:`pipeline.paths.data_root`: ``--data-root``, ``FREEZEFRAME_DATA_ROOT`` or the project root);
    those of ``config_file`` and ``overrides`` are the user's (the current directory).

    From each file, ``[common]`` then the task's own table (``[pretrain]`` for PRP,
    ``[finetune]``...) then the recipe's table of that file (``[paper.finetune]``...) apply.
    The recipe (``recipe``: ``paper``, ``released`` or "" for none, see ``train.presets``) is
    the last one named by the overrides, the config file's or the dataset file's ``[common]``;
    its preset file is applied first, under everything else. Sections of every registered task and evaluation are accepted
    and type-checked (one override list serves several tasks); only the active task's section
    and its evaluations' are kept. Wrong types and unknown keys raise ``ConfigError``.
    """
    task_cls = get_task(task)
    files: list[Path] = []
    if dataset:
        path = CONFIG_DIR / f"{dataset}.toml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
            raise FreezeframeError(f"no training config {path}; known datasets: {known}")
        files.append(path)
    if config_file:
        files.append(Path(config_file))
    tables = [load_toml(f) for f in files]
    if dataset:  # the shipped dataset file's paths mean the data root, not the current directory
        tables[0] = _rooted_dataset_file(tables[0])
    over = parse_overrides(overrides)
    recipe = ""
    for layer in [t.get("common", {}) for t in tables] + [over]:
        recipe = layer.get("recipe", recipe)
    if not isinstance(recipe, str) or (recipe and recipe not in PRESETS):
        raise ConfigError(f"invalid config: recipe={recipe!r}; choose one of {PRESETS.names()} (or \"\" for none)")
    table = task_cls.table()
    d: dict = copy.deepcopy(task_cls.defaults)  # the task's own recipe, under every file and override
    for layer in preset_layers(recipe, table):
        d = merge(d, layer)
    for t in tables:
        d = merge(d, t.get("common", {}))
        d = merge(d, t.get(table, {}))
        if recipe:
            d = merge(d, (t.get(recipe) or {}).get(table, {}))
    d = merge(d, over)
    d["recipe"] = recipe
    d["task"] = task
    for key in _PLUGIN_KEYS:
        if key in d:
            raise ConfigError(f"invalid config: {key!r} is filled from the task's own sections; "
                              f"set e.g. {task_cls.section or 'optim'}.<key> instead")
    sections = plugin_sections()
    parsed = {s: d.pop(s) for s in list(d) if s in sections}
    problems: list[str] = []
    for s, values in parsed.items():  # type-check every section, active or not
        if not isinstance(values, dict):
            problems.append(f"{s!r} is a table of {sections[s].__name__} fields, got {values!r}")
            continue
        try:
            from_dict(sections[s], values, s)
        except ConfigError as e:
            problems += _problem_lines(e)
    evals = {n: parsed.get(EVALUATIONS.get(n).section or "", {}) for n in task_cls.evaluations}
    try:
        cfg = _assemble(task_cls, d, parsed.get(task_cls.section or ""), evals)
    except ConfigError as e:
        problems += [p for p in _problem_lines(e) if p not in problems]
        problems += [p for p in _top_level_problems(d) if p not in problems]
    if problems:  # every problem of every section in one error
        if len(problems) == 1:
            raise ConfigError(f"invalid config: {problems[0]}")
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def _top_level_problems(d: Mapping[str, Any]) -> list[str]:
    """Range problems of the top-level scalar values of ``d`` (``from_dict`` skips the top-level
    check once a section has a problem; this keeps every problem in one error)."""
    probe = TrainConfig()
    for k, v in d.items():
        if k in TrainConfig.__dataclass_fields__ and not isinstance(v, dict):
            object.__setattr__(probe, k, v)
    return probe.own_problems()


def _problem_lines(e: ConfigError) -> list[str]:
    """The problems listed by a ``from_dict`` error (``invalid config: x`` or a ``  - x`` list)."""
    text = str(e).removeprefix("invalid config:").strip()
    lines = [ln.strip().removeprefix("- ").removeprefix("TrainConfig: ") for ln in text.splitlines() if ln.strip()]
    return lines or [str(e)]


def load_train_config(d: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from its ``to_dict`` form (a run's ``config.json``)."""
    d = dict(d)
    task_section = d.pop("task_cfg", None)
    eval_sections = d.pop("eval_cfg", None) or {}
    return _assemble(get_task(str(d.get("task", "prp"))), d, task_section, eval_sections)


def content_of(cfg: TrainConfig) -> dict[str, Any]:
    """``to_dict(cfg)`` without the runtime knobs: what must match to resume a run."""
    keys = list(RUNTIME_KEYS)
    if cfg.task_cfg is not None:
        keys += [f"task_cfg.{k}" for k in runtime_keys(type(cfg.task_cfg))]
    for name, section in cfg.eval_cfg.items():
        keys += [f"eval_cfg.{name}.{k}" for k in runtime_keys(type(section))]
    return drop_keys(to_dict(cfg), keys)


def config_notes(cfg: TrainConfig, world_sizes: Sequence[int] = (1, 4, 8)) -> list[str]:
    """What the batch settings mean: the batch scope, then per world size the videos per
    rank and step and the peak learning rate they give."""
    o = cfg.optim
    lines = [f"recipe {cfg.recipe or '(none)'}; optim.batch_size={o.batch_size} counts videos "
             f"{'per rank' if o.batch_scope == 'per_rank' else 'over all ranks'} (optim.batch_scope={o.batch_scope})"]
    for world in world_sizes:
        try:
            per_rank = per_rank_batch(o, world)
        except ConfigError as e:
            lines.append(f"{world} rank(s): {e}")
            continue
        lines.append(f"{world} rank(s): {per_rank} videos per rank, {per_rank * world} per step, "
                     f"peak lr {peak_lr(o, per_rank, world):.3g} (base_lr {o.base_lr:g} x {per_rank * world} / 64)")
    return lines


def render_config(cfg: TrainConfig, world_sizes: Sequence[int] = (1, 4, 8)) -> str:
    """The resolved config as one JSON object (what ``--print-config`` prints; nothing is run),
    with :func:`config_notes` under the key ``_notes``."""
    import json

    return json.dumps({**to_dict(cfg), "_notes": config_notes(cfg, world_sizes)}, indent=2, sort_keys=True,
                      default=str)
