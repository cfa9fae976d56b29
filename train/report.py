"""Compare finished stage-2 runs: a run table, the paper's Delta-Acc, and a Markdown report.

A run directory (written by ``train.loop.fit``, read through ``train.rundir.RunDir``) holds ``config.json``, ``metrics.jsonl``,
``summary.json`` and, for fine-tuning runs, ``eval.json``; only ``config.json`` is required
here, so runs still in progress show up with what they have so far.

Delta-Acc (AdViSe's pretraining gain) = top-1 of a fine-tuning run initialised from a PRP
pretraining run - top-1 of the *same* fine-tuning run from scratch. Two runs are "the same"
when their resolved configs are equal after removing ``init`` and the runtime knobs
(:data:`PAIRING_IGNORED_KEYS`), i.e. same model, optimiser, data and seed.

Accuracies are fractions in [0, 1]; tables print percentages, Delta-Acc in percentage points.
Every top-1 read from ``eval.json`` carries its sample size (test videos) and a Wilson 95 %
interval; every Delta-Acc pair whose ``eval.json`` files hold per-video predictions on the same
videos carries the exact paired McNemar p-value (:mod:`train.significance`). Top-5 is shown only
for runs with more than 5 classes (with 5 or fewer it is 100 % by construction).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.config import drop_keys, runtime_keys
from pipeline.registry import Registry
from train import plots
from train.metrics import EvalResult
from train.plots import ComparisonRow
from train.rundir import RunDir, RunDirError, find_runs
from train.schema import TrainConfig
from train.significance import paired_outcomes, wilson_interval

__all__ = [
    "RunDirError",
    "RunRecord",
    "DeltaRow",
    "PAIRING_IGNORED_KEYS",
    "MODEL_LABELS",
    "find_runs",
    "mcnemar_p",
    "resolvable_difference",
    "sample_size_note",
    "format_top1",
    "format_p",
    "read_config",
    "read_metrics",
    "load_run",
    "compare_runs",
    "delta_acc",
    "comparison_rows",
    "render_table",
    "render_delta_table",
    "render_markdown",
    "write_report",
    "report_main",
    "draw_curves",
]

#: Dotted config keys ignored when deciding that two fine-tuning runs differ only by their init:
#: init differs by design; the rest are TrainConfig's runtime knobs (declared on the fields)
PAIRING_IGNORED_KEYS: tuple[str, ...] = ("init", *runtime_keys(TrainConfig))
#: Tasks whose runs are paired for Delta-Acc.
DELTA_TASKS: tuple[str, ...] = ("finetune",)


# --------------------------------------------------------------------------------------------
# reading run directories (RunDir owns the files)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/config.json`` as a dict."""
    return RunDir(run_dir).read_config()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of ``RUN/metrics.jsonl`` (see :meth:`RunDir.read_metrics`)."""
    return RunDir(run_dir).read_metrics()


# --------------------------------------------------------------------------------------------
# run records


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _as_float(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _as_int(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


@dataclass
class RunRecord:
    """One run, as shown in the report.

    Attributes:
        name, task: from the config ("prp" pretraining or "finetune").
        arch, temporal_kernel, blocks, hidden, out_channels: the model (``model.arch``, ``model.tmm.*``);
            the TMM fields are what the config says, even for arches without a TMM.
        pretrained_from: the config's ``init`` (a pretraining run dir or checkpoint), None = from scratch.
        seed, epochs: from the config / summary.
        top1, top5: final accuracy, fraction in [0, 1]: ``eval.json`` if present, else ``summary.json``,
            else the last eval line of ``metrics.jsonl``; None if the run never evaluated.
        final_loss: last training loss; seconds: wall-clock training time in seconds.
        path: the run directory.
        dataset: stem of ``data.store`` (the feature store the run trained on).
        num_classes: ``model.num_classes``.
        complete: True when ``summary.json`` exists (the loop writes it last).
        num_videos, correct: test videos of ``eval.json`` and how many of them were right at top-1
            (None without ``eval.json``: top-1 from ``summary.json`` or the metrics has no sample size).
        eval_classes: number of classes of ``eval.json`` (its ``class_names``), None without it.
        per_video: video id -> (predicted, true class) from ``eval.json``; empty in results written
            before the per-video predictions were recorded (no McNemar test then).
        views, centre_top1: with the 30-view test (``test.spatial_crops`` 3), its views (``10x3``)
            and the top-1 of the centre crops alone (the 10-view test, from the same logits);
            ``top1`` is then the 30-view top-1. None otherwise.
        other_evals: top-1 of evaluations on another split or store (``freezeframe evaluate --split``
            / ``--store``), by their tag (e.g. ``split=val``); never mixed into ``top1``.
        config: the full resolved config (used for pairing; not shown).
    """

    name: str
    task: str
    arch: str
    temporal_kernel: int | None
    blocks: int | None
    hidden: int | None
    out_channels: int | None
    pretrained_from: str | None
    seed: int | None
    epochs: int | None
    top1: float | None
    top5: float | None
    final_loss: float | None
    seconds: float | None
    path: Path
    dataset: str | None = None
    num_classes: int | None = None
    complete: bool = True
    other_evals: dict[str, float | None] = field(default_factory=dict)
    views: str | None = None
    centre_top1: float | None = None
    num_videos: int | None = None
    correct: int | None = None
    eval_classes: int | None = None
    per_video: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def classes(self) -> int | None:
        """Number of classes: from ``eval.json`` when the run has one, else ``model.num_classes``."""
        return self.eval_classes if self.eval_classes is not None else self.num_classes

    @property
    def top1_interval(self) -> tuple[float, float] | None:
        """Wilson 95 % interval ``(low, high)`` (fractions) of ``top1`` over ``num_videos``; None without ``eval.json``."""
        if self.correct is None or not self.num_videos:
            return None
        return wilson_interval(self.correct, self.num_videos)

    @property
    def top5_meaningful(self) -> bool:
        """True when the run has a top-5 and more than 5 classes (an unknown class count counts as more)."""
        return self.top5 is not None and (self.classes is None or self.classes > 5)

    @property
    def model_label(self) -> str:
        """Short model description, e.g. ``TMM kt=3`` or ``avgpool`` (see :data:`MODEL_LABELS`)."""
        if self.arch in MODEL_LABELS:
            return MODEL_LABELS.get(self.arch)(self)
        return self.arch

    @property
    def init_label(self) -> str:
        """``scratch`` or the name of the pretraining run (or checkpoint) the run started from."""
        if not self.pretrained_from:
            return "scratch"
        p = Path(self.pretrained_from)
        if p.suffix and p.parent.name:  # a checkpoint file inside a run directory
            return f"{p.parent.name}/{p.name}"
        return p.name or str(p)


#: How each architecture is labelled in tables and charts (``model.arch`` -> label function).
MODEL_LABELS: Registry[Callable[[RunRecord], str]] = Registry("model label")
MODEL_LABELS.add("tmm", lambda r: f"TMM kt={r.temporal_kernel}")
MODEL_LABELS.add("avgpool", lambda r: "avgpool")


def load_run(run_dir: str | Path) -> RunRecord:
    """Read one run directory into a :class:`RunRecord` (only ``config.json`` is required)."""
    run = RunDir(run_dir)
    run_dir = run.path
    cfg = run.read_config()
    summary = run.read_summary() or {}
    eval_json = run.read_eval("multiview")
    metrics = run.read_metrics()
    train_lines = [m for m in metrics if m.get("kind") == "train"]
    eval_lines = [m for m in metrics if m.get("kind") == "eval"]

    top1 = top5 = centre_top1 = None
    views = None
    num_videos = correct = eval_classes = None
    per_video: dict[str, tuple[int, int]] = {}
    if eval_json is not None:
        try:
            res = EvalResult.from_json(eval_json)
        except (ValueError, TypeError, KeyError) as e:
            raise RunDirError(f"{run_dir / 'eval.json'} is invalid ({e}); re-run `freezeframe evaluate` on this run") from e
        top1, top5 = res.top1, res.top5
        num_videos, eval_classes = res.num_videos, res.num_classes
        correct = int(round(res.top1 * res.num_videos))  # top1 = correct / num_videos exactly
        if res.video_ids and len(res.video_ids) == len(res.predictions) == len(res.targets):
            per_video = {v: (p, t) for v, p, t in zip(res.video_ids, res.predictions, res.targets)}
        if res.centre_top1 is not None:
            centre_top1, views = res.centre_top1, f"{res.views // res.spatial_crops}x{res.spatial_crops}"
    if top1 is None:
        top1, top5 = _as_float(summary.get("top1")), _as_float(summary.get("top5"))
    if top1 is None and eval_lines:
        top1, top5 = _as_float(eval_lines[-1].get("top1")), _as_float(eval_lines[-1].get("top5"))

    final_loss = _as_float(summary.get("final_loss"))
    if final_loss is None and train_lines:
        final_loss = _as_float(train_lines[-1].get("loss"))
    seconds = _as_float(summary.get("seconds"))
    if seconds is None and train_lines:
        seconds = _as_float(train_lines[-1].get("time"))
    epochs = _as_int(summary.get("epochs"))
    if epochs is None:
        epochs = _as_int(_get(cfg, "optim", "epochs"))

    other: dict[str, float | None] = {}
    for tag, path in run.tagged_evals().items():
        other[tag] = _as_float((run.read_json(path) or {}).get("top1"))
    store = _get(cfg, "data", "store")
    init = cfg.get("init")
    return RunRecord(
        name=str(cfg.get("name") or summary.get("name") or run_dir.name),
        task=str(cfg.get("task") or summary.get("task") or "?"),
        arch=str(_get(cfg, "model", "arch") or "?"),
        temporal_kernel=_as_int(_get(cfg, "model", "tmm", "temporal_kernel")),
        blocks=_as_int(_get(cfg, "model", "tmm", "blocks")),
        hidden=_as_int(_get(cfg, "model", "tmm", "hidden")),
        out_channels=_as_int(_get(cfg, "model", "tmm", "out_channels")),
        pretrained_from=str(init) if init else None,
        seed=_as_int(cfg.get("seed")),
        epochs=epochs,
        top1=top1,
        top5=top5,
        final_loss=final_loss,
        seconds=seconds,
        path=run_dir,
        dataset=Path(str(store).rstrip("/\\")).stem if store else None,
        num_classes=_as_int(_get(cfg, "model", "num_classes")),
        complete=run.complete,
        other_evals=other,
        views=views,
        centre_top1=centre_top1,
        num_videos=num_videos,
        correct=correct,
        eval_classes=eval_classes,
        per_video=per_video,
        config=cfg,
    )


def _sort_key(r: RunRecord) -> tuple:
    task_order = 0 if r.task == "prp" else 1
    return (
        task_order, r.task, r.dataset or "", r.arch, r.temporal_kernel or 0, r.blocks or 0, r.hidden or 0,
        r.pretrained_from is not None, r.pretrained_from or "", r.seed if r.seed is not None else -1, r.name,
    )


def compare_runs(run_dirs: Iterable[str | Path]) -> list[RunRecord]:
    """Load every run (``run_dirs`` may also name folders of runs) sorted by task, data, model, init, seed."""
    dirs = find_runs(run_dirs)
    if not dirs:
        raise RunDirError("no runs given; pass one or more run directories (or a folder holding them)")
    return sorted((load_run(d) for d in dirs), key=_sort_key)


# --------------------------------------------------------------------------------------------
# Delta-Acc


@dataclass
class DeltaRow:
    """A matched pair of fine-tuning runs differing only by ``init``.

    ``delta_acc`` = top1(pretrained) - top1(scratch) and ``delta_top5`` likewise, as fractions
    (multiply by 100 for percentage points). ``p_value``: exact paired McNemar test of the two
    runs on the same test videos (:func:`mcnemar_p`), None when either ``eval.json`` lacks the
    per-video predictions or the videos differ.
    """

    scratch: RunRecord
    pretrained: RunRecord
    delta_acc: float
    delta_top5: float | None = None
    p_value: float | None = None


def mcnemar_p(a: RunRecord, b: RunRecord) -> float | None:
    """Two-sided exact McNemar p-value of runs ``a`` and ``b`` on the same test videos
    (:func:`train.significance.paired_outcomes`, paired by video id).

    None when either run has no per-video predictions (an ``eval.json`` written before they were
    recorded, or no ``eval.json``), or when the two runs were not tested on the same videos with
    the same labels (nothing to pair).
    """
    if not a.per_video or not b.per_video or a.per_video.keys() != b.per_video.keys():
        return None
    ids = sorted(a.per_video)
    if any(a.per_video[v][1] != b.per_video[v][1] for v in ids):
        return None
    return paired_outcomes([a.per_video[v][0] for v in ids], [b.per_video[v][0] for v in ids],
                           [a.per_video[v][1] for v in ids]).p_value


def _pairing_key(cfg: dict[str, Any], ignore: Sequence[str]) -> str:
    return json.dumps(drop_keys(cfg, ignore), sort_keys=True, default=str)


def delta_acc(records: Sequence[RunRecord], ignore: Sequence[str] = PAIRING_IGNORED_KEYS) -> list[DeltaRow]:
    """Pair each PRP-initialised fine-tuning run with the scratch run(s) of an identical config.

    Args:
        records: any runs; only fine-tuning runs with a top-1 take part.
        ignore: dotted config keys that may differ within a pair (default ``init`` and ``name``).

    Returns:
        One row per (pretrained, scratch) pair, in the order of ``records``. A PRP run without a
        scratch twin is not listed (nothing to compare with).
    """
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        if r.task in DELTA_TASKS and r.top1 is not None:
            groups.setdefault(_pairing_key(r.config, ignore), []).append(r)
    rows: list[DeltaRow] = []
    for r in records:
        if r.task not in DELTA_TASKS or r.top1 is None or r.pretrained_from is None:
            continue
        for s in groups.get(_pairing_key(r.config, ignore), []):
            if s.pretrained_from is not None:
                continue
            d5 = r.top5 - s.top5 if (r.top5 is not None and s.top5 is not None) else None
            rows.append(DeltaRow(scratch=s, pretrained=r, delta_acc=r.top1 - s.top1, delta_top5=d5,
                                 p_value=mcnemar_p(r, s)))
    return rows


def resolvable_difference(n: int, top1: float) -> tuple[float, float]:
    """``(half_width, difference)`` as fractions: the half-width of the Wilson 95 % interval of a
    top-1 of ``top1`` on ``n`` test videos, and the smallest difference two such runs' top-1 can
    show at 95 % (two independent estimates: sqrt(2) x the half-width). Below it, two runs are
    within noise of each other."""
    lo, hi = wilson_interval(int(round(top1 * n)), n)
    half = (hi - lo) / 2
    return half, math.sqrt(2.0) * half


def sample_size_note(records: Sequence[RunRecord]) -> str | None:
    """One paragraph for the top of a report: the test-set size of the evaluated runs and the
    difference it can resolve at their mean top-1 (:func:`resolvable_difference`); None when no
    run has an ``eval.json``."""
    ev = [r for r in records if r.num_videos and r.top1 is not None]
    if not ev:
        return None
    sizes = sorted({int(r.num_videos) for r in ev})  # type: ignore[arg-type]
    n = sizes[0]
    mean = sum(float(r.top1) for r in ev) / len(ev)  # type: ignore[arg-type]
    half, diff = resolvable_difference(n, mean)
    classes = {r.classes for r in ev}
    k = next(iter(classes)) if len(classes) == 1 else None
    chance = f" ({k} classes, chance {100 / k:.1f} %)" if k else ""
    videos = (f"{n} test videos per run" if len(sizes) == 1
              else f"{sizes[0]} to {sizes[-1]} test videos per run (the smallest test set is used below)")
    return (f"**Sample size.** {videos}{chance}. At the runs' mean top-1 ({100 * mean:.1f} %) a Wilson 95 % "
            f"interval on {n} videos is about ±{100 * half:.0f} points, so differences under ~{100 * diff:.0f} "
            f"points between two runs are within noise (√2 × that half-width: two independent estimates at 95 %). "
            "Every top-1 below carries its own interval and every Δ-Acc the exact paired McNemar p on the "
            "same videos.")


# --------------------------------------------------------------------------------------------
# rendering


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _pp(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.2f}"


def format_top1(top1: float | None, interval: tuple[float, float] | None, digits: int = 2) -> str:
    """``55.00 [34, 74]``: top-1 in % with ``digits`` decimals and its interval (fractions) in whole
    percent; the bare top-1 without an interval; ``-`` without a top-1."""
    if top1 is None or (isinstance(top1, float) and math.isnan(top1)):
        return "-"
    cell = f"{100 * top1:.{digits}f}"
    return cell if interval is None else f"{cell} [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]"


def format_p(p: float | None) -> str:
    """A p-value with 3 decimals (``<0.001`` below), ``-`` when there is none."""
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _loss(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {(s % 3600) // 60:02d}m"


def _int(v: int | None) -> str:
    return "-" if v is None else str(v)


#: Every run-table column; ``_run_columns`` drops those a set of runs does not need (top-5 when no
#: run has more than 5 classes, McNemar p without Delta-Acc pairs) and adds the 30-view and
#: other-evaluation columns when some run has them. ``n``: test videos of the run's ``eval.json``.
RUN_COLUMNS = ("run", "task", "dataset", "model", "blocks", "init", "seed", "epochs",
               "top-1 %", "n", "top-5 %", "Δ-Acc (pp)", "McNemar p", "final loss", "time")
DELTA_COLUMNS = ("dataset", "model", "seed", "scratch run", "PRP run", "PRP init",
                 "top-1 scratch %", "top-1 PRP %", "Δ-Acc (pp)", "McNemar p")


#: shown only when a run has evaluations on another split or store
OTHER_EVALS_COLUMN = "other evaluations (top-1 %)"


#: shown only when a run has the 30-view test: its views and the centre-crop-only (10-view) top-1
CROP_COLUMNS = ("views", "top-1 centre crop %")


def _run_columns(records: Sequence[RunRecord], deltas: Sequence[DeltaRow] = ()) -> tuple[str, ...]:
    crops = CROP_COLUMNS if _has_crops(records) else ()
    i = RUN_COLUMNS.index("top-5 %") + 1
    other = (OTHER_EVALS_COLUMN,) if any(r.other_evals for r in records) else ()
    cols = RUN_COLUMNS[:i] + crops + RUN_COLUMNS[i:] + other
    drop = set()
    if not any(r.top5_meaningful for r in records):
        drop.add("top-5 %")  # <= 5 classes everywhere: top-5 is 100 % by construction
    if not deltas:
        drop.add("McNemar p")
    return tuple(c for c in cols if c not in drop)


def _has_crops(records: Sequence[RunRecord]) -> bool:
    return any(r.centre_top1 is not None for r in records)


def _other_evals_cell(r: RunRecord) -> str:
    return ", ".join(f"{tag}: {_pct(v)}" for tag, v in r.other_evals.items()) or "-"


def _run_cells(r: RunRecord, deltas: Sequence[DeltaRow], columns: Sequence[str]) -> list[str]:
    """The cells of ``r`` under ``columns`` (from :func:`_run_columns`)."""
    mine = [d for d in deltas if d.pretrained is r]
    cells = {
        "run": r.name if r.complete else f"{r.name} (running)", "task": r.task, "dataset": r.dataset or "-",
        "model": r.model_label, "blocks": _int(r.blocks), "init": r.init_label, "seed": _int(r.seed),
        "epochs": _int(r.epochs), "top-1 %": format_top1(r.top1, r.top1_interval), "n": _int(r.num_videos),
        "top-5 %": _pct(r.top5) if r.top5_meaningful else "-", "views": r.views or "-",
        "top-1 centre crop %": _pct(r.centre_top1),
        "Δ-Acc (pp)": ", ".join(_pp(d.delta_acc) for d in mine) if mine else "-",
        "McNemar p": ", ".join(format_p(d.p_value) for d in mine) if mine else "-",
        "final loss": _loss(r.final_loss), "time": _duration(r.seconds),
        OTHER_EVALS_COLUMN: _other_evals_cell(r),
    }
    return [cells[c] for c in columns]


def _delta_cells(d: DeltaRow) -> list[str]:
    return [
        d.pretrained.dataset or "-", d.pretrained.model_label, _int(d.pretrained.seed), d.scratch.name,
        d.pretrained.name, d.pretrained.init_label, _pct(d.scratch.top1), _pct(d.pretrained.top1), _pp(d.delta_acc),
        format_p(d.p_value),
    ]


def _fold_shared(columns: Sequence[str], rows: Sequence[list[str]],
                 col: str) -> tuple[list[str], list[list[str]], str | None]:
    """Drop column ``col`` when every row that has a value (not ``-``) has the same one; returns the
    columns, the rows and that value (None: the column stays, or no row had a value)."""
    if col not in columns:
        return list(columns), [list(r) for r in rows], None
    i = list(columns).index(col)
    values = {row[i] for row in rows} - {"-"}
    if len(values) > 1:
        return list(columns), [list(r) for r in rows], None
    cols = [c for j, c in enumerate(columns) if j != i]
    return cols, [[c for j, c in enumerate(row) if j != i] for row in rows], (values.pop() if values else None)


#: Run-table columns that move into the terminal table's title when every run has the same value.
_FOLDABLE = {"dataset": "on {}", "blocks": "{} blocks", "epochs": "{} epochs", "n": "n = {} test videos"}
#: Foldable columns whose missing values (``-``: e.g. a pretraining run has no test videos) do not count.
_FOLD_SKIPS_MISSING = ("n",)
_SHORT = {"top-1 %": "top-1% [95% CI]", "top-5 %": "top-5%", "top-1 centre crop %": "centre%",
          "Δ-Acc (pp)": "Δ pp", "McNemar p": "p", "final loss": "loss", "epochs": "ep",
          "scratch run": "scratch", "top-1 scratch %": "scratch%", "top-1 PRP %": "PRP%", "PRP init": "init"}
_NUMERIC = ("seed", "epochs", "blocks", "n", "McNemar p", "final loss", "time")


def _terminal_table(title: str, columns: Sequence[str], rows: Sequence[list[str]], styles: Sequence[str | None]) -> Table:
    """Compact rich table: constant foldable columns go to the title, numbers never wrap."""
    keep, folded = [], []
    for i, col in enumerate(columns):
        values = {row[i] for row in rows}
        if col in _FOLD_SKIPS_MISSING:
            values.discard("-")
        if col in _FOLDABLE and len(values) == 1 and rows:
            folded.append(_FOLDABLE[col].format(values.pop()))
        elif col in _FOLD_SKIPS_MISSING and not values:
            continue  # nothing to show
        else:
            keep.append(i)
    if folded:
        title += " (" + ", ".join(folded) + ")"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for i in keep:
        col = columns[i]
        numeric = any(t in col for t in ("%", "pp")) or col in _NUMERIC
        width = max([len(row[i]) for row in rows] + [1])
        table.add_column(_SHORT.get(col, col), justify="right" if numeric else "left", no_wrap=numeric,
                         min_width=None if numeric else min(width, 14), overflow="fold")
    for row, style in zip(rows, styles):
        table.add_row(*(row[i] for i in keep), style=style)
    return table


def render_table(records: Sequence[RunRecord], deltas: Sequence[DeltaRow] = ()) -> Table:
    """A rich table with one row per run; PRP-initialised runs show their Delta-Acc vs scratch (in pp).

    Compact for a terminal: short headers; dataset / blocks / epochs move into the title when all
    runs share them.
    """
    columns = _run_columns(records, deltas)
    rows = [_run_cells(r, deltas, columns) for r in records]
    return _terminal_table("freezeframe runs", columns, rows, [None if r.complete else "dim" for r in records])


def render_delta_table(deltas: Sequence[DeltaRow]) -> Table:
    """A rich table with one row per (PRP, scratch) pair; Delta-Acc in percentage points."""
    rows = []
    i = DELTA_COLUMNS.index("Δ-Acc (pp)")
    for d in deltas:
        cells = _delta_cells(d)
        colour = "green" if d.delta_acc > 0 else ("red" if d.delta_acc < 0 else "")
        cells[i] = f"[{colour}]{cells[i]}[/]" if colour else cells[i]
        rows.append(cells)
    return _terminal_table("Δ-Acc = top-1(PRP init) - top-1(scratch)", DELTA_COLUMNS, rows, [None] * len(rows))


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    numeric = [("%" in c or "pp" in c or c in _NUMERIC) for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(records: Sequence[RunRecord], deltas: Sequence[DeltaRow] = ()) -> str:
    """Markdown: the run table and the Delta-Acc table (accuracies in %, Delta-Acc in percentage points)."""
    columns = _run_columns(records, deltas)
    crops = _has_crops(records)
    cols, rows, n = _fold_shared(columns, [_run_cells(r, deltas, columns) for r in records], "n")
    parts = ["## Runs", "", _md_table(cols, rows), ""]
    parts += [("Every evaluated run was tested on the same number of videos, "
               f"**n = {n}**; " if n is not None else "`n`: test videos of the run; ")
              + "`top-1 %` is followed by its Wilson 95 % interval [low, high] (%)"
              + ("; `McNemar p`: exact paired test of the run against its scratch twin on the same test "
                 "videos (`-`: not the PRP side of a pair, or an `eval.json` written before per-video "
                 "predictions were recorded)" if deltas else "")
              + ("" if "top-5 %" in cols else "; no top-5: 5 classes or fewer, where it is 100 % by construction")
              + ".", ""]
    if crops:
        parts += ["`top-1 %` is the test with every view (`views` = clips x spatial crops); `top-1 centre crop %` "
                  "averages the same logits over the centre crops alone (the 10-view test).", ""]
    parts += [
        "## Δ-Acc (pretraining gain)",
        "",
        "Δ-Acc = top-1 of the fine-tuning run initialised from PRP pretraining − top-1 of the same "
        "run from scratch (configs identical except `init`), in percentage points; `McNemar p`: "
        "two-sided exact McNemar test of the pair on the same test videos.",
        "",
    ]
    if deltas:
        parts.append(_md_table(DELTA_COLUMNS, (_delta_cells(d) for d in deltas)))
        mean = sum(d.delta_acc for d in deltas) / len(deltas)
        parts += ["", f"Mean Δ-Acc over {len(deltas)} pair(s): **{_pp(mean)} pp**."]
    else:
        parts.append(
            "_No pairs: no PRP-initialised fine-tuning run has a from-scratch twin with an otherwise "
            "identical config among these runs._"
        )
    return "\n".join(parts) + "\n"


def comparison_rows(records: Sequence[RunRecord]) -> list[ComparisonRow]:
    """Bars for :func:`train.plots.plot_comparison`: fine-tuning runs with a top-1, grouped by model
    (prefixed by dataset when there are several), one series for scratch and one per PRP init."""
    runs = [r for r in records if r.task in DELTA_TASKS and r.top1 is not None]
    several_datasets = len({r.dataset for r in runs}) > 1
    group_of = {id(r): (f"{r.dataset}\n{r.model_label}" if several_datasets else r.model_label) for r in runs}
    inits_per_group: dict[str, set[str]] = {}
    for r in runs:
        if r.pretrained_from:
            inits_per_group.setdefault(group_of[id(r)], set()).add(r.init_label)
    rows = []
    for r in sorted(runs, key=lambda r: r.pretrained_from is not None):  # scratch series first
        g = group_of[id(r)]
        if r.pretrained_from is None:
            series = "scratch"
        elif len(inits_per_group.get(g, ())) > 1:
            series = f"PRP ({r.init_label})"
        else:
            series = "PRP"
        rows.append(ComparisonRow(group=g, series=series, top1=float(r.top1),  # type: ignore[arg-type]
                                  interval=r.top1_interval))
    group_order = list(dict.fromkeys(group_of[id(r)] for r in runs))
    rows.sort(key=lambda row: group_order.index(row.group))
    return rows


def _rel_link(target: Path, base: Path) -> str:
    rel = Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    return f"<{rel}>" if any(c in rel for c in " ()") else rel


def write_report(
    run_dirs: Iterable[str | Path],
    out_md: Path,
    title: str = "freezeframe run report",
    extra_sections: Sequence[str] = (),
    make_plots: bool = True,
) -> Path:
    """Write a Markdown report (tables + Delta-Acc + plots) to ``out_md``.

    The comparison chart is written beside the report as ``<stem>_top1.png``. With ``make_plots``
    each run's missing ``curves.png`` / ``confusion.png`` is drawn into its run directory first
    (a read-only run directory is skipped). Images are linked by paths relative to the report.
    """
    records = compare_runs(run_dirs)
    return _write_report(records, delta_acc(records), Path(out_md), title, extra_sections, make_plots)


def _write_report(
    records: Sequence[RunRecord],
    deltas: Sequence[DeltaRow],
    out_md: Path,
    title: str,
    extra_sections: Sequence[str],
    make_plots: bool,
) -> Path:
    out_md.parent.mkdir(parents=True, exist_ok=True)
    base = out_md.parent
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# {title}", "", f"{len(records)} run(s), generated {when}.", ""]
    note = sample_size_note(records)
    if note:
        parts += [note, ""]
    parts.append(render_markdown(records, deltas))

    rows = comparison_rows(records)
    if rows:
        classes = {r.num_classes for r in records if r.task in DELTA_TASKS and r.top1 is not None}
        chance = 1.0 / classes.pop() if len(classes) == 1 and None not in classes else None
        chart = plots.plot_comparison(rows, out_md.with_name(out_md.stem + "_top1.png"), title=f"{title}: top-1", chance=chance)
        parts += ["## Top-1 comparison", "", f"![top-1 of every fine-tuning run]({_rel_link(chart, base)})", ""]

    run_parts: list[str] = []
    for r in records:
        run = RunDir(r.path)
        curves, confusion = run.curves_png, run.confusion_png
        if make_plots:
            try:
                if not curves.is_file() and any(m.get("kind") in ("train", "eval") for m in read_metrics(r.path)):
                    draw_curves(r.path, r)
                if not confusion.is_file() and run.eval_file("multiview").is_file():
                    plots.plot_confusion(EvalResult.load(run.eval_file("multiview")), confusion, title=r.name)
            except OSError:
                pass  # read-only run directory: link whatever is there
        images = [f"![{kind} of {r.name}]({_rel_link(p, base)})" for kind, p in (("curves", curves), ("confusion", confusion)) if p.is_file()]
        if images:
            run_parts += [f"### {r.name}", "", f"{r.task}, {r.model_label}, init: {r.init_label}, seed {_int(r.seed)}", ""]
            run_parts += images + [""]
    if run_parts:
        parts += ["## Runs in detail", ""] + run_parts
    for section in extra_sections:
        parts += [section.rstrip(), ""]
    out_md.write_text("\n".join(parts).rstrip() + "\n")
    return out_md


def draw_curves(run_dir: str | Path, record: RunRecord | None = None) -> Path:
    """``RUN/curves.png`` titled with the run's name, task, model, init and seed."""
    rec = record or load_run(run_dir)
    init = "scratch" if rec.pretrained_from is None else f"init {rec.init_label}"
    return plots.plot_curves(run_dir, title=f"{rec.name}  ({rec.task}, {rec.model_label}, {init}, seed {rec.seed})")


def report_main(run_dirs: list[Path], out: Path | None = None) -> int:
    """CLI entry: print the run table (and the Delta-Acc table); write the Markdown report to ``out`` if given."""
    console = Console()
    records = compare_runs(run_dirs)
    deltas = delta_acc(records)
    console.print(render_table(records, deltas))
    if deltas:
        console.print(render_delta_table(deltas))
    note = sample_size_note(records)
    if note:
        console.print(note.replace("**", ""), highlight=False)
    if out is not None:
        path = _write_report(records, deltas, Path(out), "freezeframe run report", (), True)
        console.print(f"wrote {path}")
    return 0
