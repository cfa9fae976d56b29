"""PNG plots of stage-2 runs: training curves, confusion matrices, top-1 comparison bars.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch, no figure left open), and written atomically (temporary file, then rename).
Accuracies are fractions in [0, 1] in the inputs and drawn as percentages.

X axis of the curves: epochs completed, counted from the first logged epoch (so 0-based and
1-based engines draw the same picture). A training line is drawn at ``epoch + (i + 1) / n``
(its position within the epoch), per-epoch means at the epoch's centre, and an eval line with
epoch ``e`` at the end of epoch ``e``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from train.metrics import EvalResult
from train.rundir import RunDir, RunDirError

__all__ = ["AblationPoint", "ComparisonRow", "plot_ablation", "plot_curves", "plot_confusion", "plot_comparison",
           "plot_metric_pairs"]

TRAIN_COLOUR = "tab:blue"
EVAL_COLOUR = "tab:orange"
LR_COLOUR = "tab:green"
SERIES_COLOURS = ("0.55", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    tmp.replace(path)
    return path


def _finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = np.isfinite(y)
    return x[ok], y[ok]


def _values(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in rows], dtype=np.float64)


def _train_positions(train: Sequence[dict[str, Any]], e0: int) -> tuple[np.ndarray, np.ndarray]:
    """x (epochs completed) of every training line, and the epoch (relative to e0) of each."""
    epochs = np.array([int(r.get("epoch", 0)) - e0 for r in train])
    x = np.empty(len(train), dtype=np.float64)
    for e in np.unique(epochs):
        idx = np.flatnonzero(epochs == e)
        x[idx] = e + (np.arange(len(idx)) + 1) / len(idx)
    return x, epochs


def _epoch_means(epochs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs, ms = [], []
    for e in np.unique(epochs):
        v = y[(epochs == e) & np.isfinite(y)]
        if v.size:
            xs.append(e + 0.5)
            ms.append(v.mean())
    return np.array(xs), np.array(ms)


def plot_curves(run_dir: str | Path, path: str | Path | None = None, title: str | None = None) -> Path:
    """Draw ``RUN/curves.png`` (or ``path``): loss and accuracy vs epoch, learning rate below.

    Training values are drawn faint per logged step, with per-epoch means on top; eval lines
    (``kind == "eval"``) add eval loss and top-1. ``title`` defaults to the run's name and task
    (``train.report.draw_curves`` passes the report's description of the run). Returns the PNG path.
    """
    run = RunDir(run_dir)
    cfg = run.read_config()
    metrics = run.read_metrics()
    train = sorted((m for m in metrics if m.get("kind") == "train"), key=lambda m: (m.get("epoch", 0), m.get("step", 0)))
    evals = sorted((m for m in metrics if m.get("kind") == "eval"), key=lambda m: (m.get("epoch", 0), m.get("step", 0)))
    if not train and not evals:
        raise RunDirError(f"{run_dir} has no training or eval lines in metrics.jsonl yet; plot it after the first epoch")
    e0 = min(int(m.get("epoch", 0)) for m in (train or evals))
    name = str(cfg.get("name") or run.path.name)
    if title is None:
        title = f"{name}  ({cfg.get('task', '?')}, seed {cfg.get('seed')})"

    fig = _figure(11.0, 6.5)
    gs = fig.add_gridspec(2, 2, height_ratios=(3.0, 1.1))
    ax_loss = fig.add_subplot(gs[0, 0])
    ax_acc = fig.add_subplot(gs[0, 1], sharex=ax_loss)
    ax_lr = fig.add_subplot(gs[1, :], sharex=ax_loss)

    if train:
        x, ep = _train_positions(train, e0)
        for ax, key, scale, label in ((ax_loss, "loss", 1.0, "train loss"), (ax_acc, "acc", 100.0, "train acc")):
            y = _values(train, key) * scale
            ax.scatter(*_finite(x, y), s=10, alpha=0.35, color=TRAIN_COLOUR, linewidths=0, label=f"{label} (steps)")
            mx, my = _epoch_means(ep, y)
            if mx.size:
                ax.plot(mx, my, "-o", ms=3.5, lw=1.6, color=TRAIN_COLOUR, label=f"{label} (epoch mean)")
        lr = _values(train, "lr")
        ax_lr.plot(*_finite(x, lr), lw=1.3, color=LR_COLOUR)
    if evals:
        xe = np.array([int(m.get("epoch", 0)) - e0 + 1.0 for m in evals])
        for ax, key, scale, label in ((ax_loss, "loss", 1.0, "eval loss"), (ax_acc, "top1", 100.0, "eval top-1")):
            xs, ys = _finite(xe, _values(evals, key) * scale)
            if ys.size:
                ax.plot(xs, ys, "s--", ms=4.5, lw=1.4, color=EVAL_COLOUR, label=label)
                ax.annotate(f"{ys[-1]:.3g}" if key == "loss" else f"{ys[-1]:.1f}%", (xs[-1], ys[-1]),
                            textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8, color=EVAL_COLOUR)

    fig.suptitle(title, fontsize=12)
    ax_loss.set_title(f"{name}: loss", fontsize=10)
    ax_acc.set_title(f"{name}: accuracy", fontsize=10)
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_ylim(bottom=0)
    if ax_acc.get_ylim()[1] > 100:
        ax_acc.set_ylim(top=101)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    x_end = max([*(x.tolist() if train else []), *(xe.tolist() if evals else []), 1.0])
    ax_lr.set_xlim(min(0.0, ax_lr.get_xlim()[0]), x_end + 0.08 * x_end)
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.tick_params(labelbottom=True)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    return _save(fig, run.curves_png if path is None else path)


def plot_confusion(result: EvalResult, path: str | Path, title: str | None = None) -> Path:
    """Row-normalised confusion matrix (rows = true class) with class names; counts in the cells when K <= 20.

    Classes without test videos are drawn grey. The title states top-1 / top-5 and N videos x views.
    """
    conf = result.confusion_array()
    k = conf.shape[0]
    support = conf.sum(axis=1, keepdims=True).astype(np.float64)
    norm = np.full(conf.shape, np.nan)
    np.divide(conf, support, out=norm, where=support > 0)

    side = min(max(5.0, 0.42 * k + 3.0), 13.0)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")

    if k <= 60:
        names = [n if len(n) <= 22 else n[:21] + "…" for n in result.class_names]
        ax.set_xticks(range(k), names, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center",
                      fontsize=8 if k <= 30 else 6)
        ax.set_yticks(range(k), names, fontsize=8 if k <= 30 else 6)
    if k <= 20:
        size = 9 if k <= 10 else 7
        for t in range(k):
            for p in range(k):
                v = norm[t, p]
                colour = "white" if np.isfinite(v) and v > 0.55 else ("0.35" if conf[t, p] == 0 else "black")
                ax.text(p, t, str(conf[t, p]), ha="center", va="center", fontsize=size, color=colour)
    suffix = "" if k <= 60 else " (index)"
    ax.set_xlabel("predicted class" + suffix)
    ax.set_ylabel("true class" + suffix)
    head = f"{title}: " if title else ""
    ax.set_title(
        f"{head}top-1 {100 * result.top1:.1f}%" + (f", top-5 {100 * result.top5:.1f}%" if k > 5 else "") + "\n"
        f"{result.num_videos} videos x {result.views} view(s), rows normalised",
        fontsize=10,
    )
    return _save(fig, path)


@dataclass
class ComparisonRow:
    """One bar of :func:`plot_comparison`.

    Attributes:
        group: x-axis group, e.g. ``"TMM kt=3"`` (a ``\\n`` makes a two-line label).
        series: bar within the group, e.g. ``"scratch"`` or ``"PRP"`` (one colour per series).
        top1: accuracy, fraction in [0, 1]. Several rows with the same group and series (seeds)
            are drawn as their mean with the individual values as dots.
        interval: optional (low, high) fractions, e.g. a Wilson 95 % interval
            (``train.significance.wilson_interval``), drawn as an error bar on a one-row bar.
    """

    group: str
    series: str
    top1: float
    interval: tuple[float, float] | None = None


def plot_comparison(
    rows: Sequence[ComparisonRow], path: str | Path, title: str = "top-1 accuracy", chance: float | None = None
) -> Path:
    """Grouped bar chart of top-1 (%) per group and series, value on each bar, dashed chance line if given."""
    if not rows:
        raise ValueError("plot_comparison needs at least one row")
    groups = list(dict.fromkeys(r.group for r in rows))
    series = list(dict.fromkeys(r.series for r in rows))
    values: dict[tuple[str, str], list[float]] = {}
    intervals: dict[tuple[str, str], list[tuple[float, float] | None]] = {}
    for r in rows:
        values.setdefault((r.group, r.series), []).append(100.0 * float(r.top1))
        intervals.setdefault((r.group, r.series), []).append(r.interval)

    n_s = len(series)
    width = 0.8 / n_s
    fig = _figure(max(6.0, 1.6 + len(groups) * (0.6 + 0.55 * n_s)), 4.8)
    ax = fig.add_subplot()
    top = 0.0
    for j, s in enumerate(series):
        colour = SERIES_COLOURS[j % len(SERIES_COLOURS)]
        xs, means = [], []
        for i, g in enumerate(groups):
            v = values.get((g, s))
            if not v:
                continue
            x = i + (j - (n_s - 1) / 2) * width
            xs.append(x)
            means.append(float(np.mean(v)))
            if len(v) > 1:
                ax.scatter([x] * len(v), v, s=12, color="black", zorder=3, linewidths=0)
            elif intervals[(g, s)][0] is not None:
                lo, hi = (100.0 * b for b in intervals[(g, s)][0])  # type: ignore[union-attr]
                ax.errorbar([x], v, yerr=[[max(0.0, v[0] - lo)], [max(0.0, hi - v[0])]], fmt="none", ecolor="black", elinewidth=1,
                            capsize=3, zorder=3)
                top = max(top, hi)
            top = max(top, max(v))
        bars = ax.bar(xs, means, width=width * 0.92, color=colour, label=s, edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8, padding=2)
    if chance is not None:
        ax.axhline(100.0 * chance, ls="--", lw=1.1, color="black", label=f"chance ({100 * chance:.1f}%)")
        top = max(top, 100.0 * chance)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, min(100.0, top * 1.12 + 4.0) if top < 95 else 105.0)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


@dataclass
class AblationPoint:
    """One row of an ablation table as a chart point: its label, cost and accuracies.

    Attributes:
        label: the row's values of the table's keys (e.g. ``"2"`` for spatial_pool=2).
        macs: multiply-accumulates per clip (0: no TMM); params: trainable parameters.
        top1_scratch, top1_prp: fractions in [0, 1], None when the run has not evaluated.
        interval_scratch, interval_prp: optional (low, high) fractions, e.g. Wilson 95 %
            (``train.significance.wilson_interval``), drawn as error bars on the points.
    """

    label: str
    macs: int
    params: int
    top1_scratch: float | None
    top1_prp: float | None
    interval_scratch: tuple[float, float] | None = None
    interval_prp: tuple[float, float] | None = None


def plot_ablation(points: Sequence[AblationPoint], path: str | Path, title: str = "ablation") -> Path:
    """Top-1 (%) against GMACs per clip (log axis; a model without TMM sits at the left edge),
    scratch and PRP-initialised as two series, each point labelled with its row and drawn with
    its interval as a vertical error bar when it has one (the PRP series is nudged right by 6 %
    so overlapping bars stay readable)."""
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    positive = [p.macs for p in points if p.macs > 0]
    floor = (min(positive) / 4 if positive else 1e6) / 1e9
    for series, colour, nudge, get in (
            ("scratch", SERIES_COLOURS[1], 1.0, lambda p: (p.top1_scratch, p.interval_scratch)),
            ("PRP", SERIES_COLOURS[2], 1.06, lambda p: (p.top1_prp, p.interval_prp))):
        pts = [(nudge * max(p.macs / 1e9, floor), 100 * get(p)[0], get(p)[1], p.label) for p in points
               if get(p)[0] is not None]
        if not pts:
            continue
        ax.scatter([x for x, _, _, _ in pts], [y for _, y, _, _ in pts], color=colour, label=series, zorder=3)
        bars = [(x, y, iv) for x, y, iv, _ in pts if iv is not None]
        if bars:
            ax.errorbar([x for x, _, _ in bars], [y for _, y, _ in bars],
                        yerr=[[max(0.0, y - 100 * iv[0]) for _, y, iv in bars],
                              [max(0.0, 100 * iv[1] - y) for _, y, iv in bars]],
                        fmt="none", ecolor=colour, elinewidth=1, capsize=3, zorder=2)
        for x, y, _, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("TMM GMACs per clip (log)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_metric_pairs(points: dict[str, dict[str, tuple[float, float, float]]], path: str | Path,
                      per_video: dict[str, dict[str, Sequence[float]]] | None = None,
                      title: str | None = None) -> Path:
    """One panel per metric: each representation's value with its interval, side by side.

    ``points``: metric -> representation -> ``(value, low, high)``; ``per_video``: metric ->
    representation -> per-video values, drawn as jittered dots behind (optional).
    """
    metrics = list(points)
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = _figure(3.0 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, metrics):
        reps = list(points[metric])
        for i, rep in enumerate(reps):
            colour = SERIES_COLOURS[(i + 1) % len(SERIES_COLOURS)]
            dots = (per_video or {}).get(metric, {}).get(rep)
            if dots is not None:
                y = np.asarray(dots, dtype=float)
                y = y[np.isfinite(y)]
                ax.scatter(i + rng.uniform(-0.18, 0.18, len(y)), y, s=6, alpha=0.3, color=colour, linewidths=0)
            v, lo, hi = points[metric][rep]
            ax.errorbar([i], [v], yerr=[[v - lo], [hi - v]], fmt="o", color="black", capsize=4, markersize=5)
        ax.set_xticks(range(len(reps)), reps)
        ax.set_xlim(-0.6, len(reps) - 0.4)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
