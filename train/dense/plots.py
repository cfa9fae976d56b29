"""PNG figures of dense evaluations: scores with intervals per method, and a strip of masks.

Built like :mod:`train.plots` (matplotlib object API on an Agg canvas, atomic PNG writes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.labels import voc_palette
from train.plots import SERIES_COLOURS, _figure, _save

__all__ = ["plot_scores", "plot_mask_strip"]


def plot_scores(
    scores: Mapping[str, Mapping[str, Sequence[float]]],
    intervals: Mapping[str, Mapping[str, tuple[float, float]]],
    path: str | Path,
    title: str,
) -> Path:
    """Grouped bars: one group per metric (``J``, ``F``, ``J&F``), one bar per method.

    Args:
        scores: ``method -> metric -> per-item values`` (fractions; e.g. one per sequence): the
            bar is their mean, each item a dot.
        intervals: ``method -> metric -> (low, high)`` drawn as an error bar (e.g. a bootstrap
            interval of that mean).
    """
    methods = list(scores)
    metrics = list(dict.fromkeys(m for s in scores.values() for m in s))
    width = 0.8 / max(1, len(methods))
    fig = _figure(max(6.0, 2.0 + len(metrics) * (0.6 + 0.6 * len(methods))), 4.6)
    ax = fig.add_subplot()
    for j, name in enumerate(methods):
        xs, means, lo, hi = [], [], [], []
        for i, metric in enumerate(metrics):
            vals = 100.0 * np.asarray(scores[name][metric], dtype=float)
            x = i + (j - (len(methods) - 1) / 2) * width
            xs.append(x)
            means.append(float(vals.mean()))
            a, b = intervals[name][metric]
            lo.append(means[-1] - 100.0 * a)
            hi.append(100.0 * b - means[-1])
            ax.scatter(x + np.linspace(-0.25, 0.25, len(vals)) * width, vals, s=9, color="black", zorder=3,
                       linewidths=0, alpha=0.6)
        bars = ax.bar(xs, means, width=width * 0.92, color=SERIES_COLOURS[j % len(SERIES_COLOURS)], label=name,
                      edgecolor="black", linewidth=0.4, yerr=[lo, hi], capsize=3, error_kw={"elinewidth": 1.0})
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8, padding=2)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _overlay(frame: np.ndarray, labels: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``(H, W, 3)`` uint8 frame in grey (so colours are labels only, not textures) with label ids
    ``(H, W)`` tinted by the DAVIS palette (0: none)."""
    palette = np.asarray(voc_palette(), dtype=np.float64).reshape(-1, 3)
    out = np.repeat(frame.astype(np.float64).mean(-1, keepdims=True), 3, axis=-1)
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * palette[labels[fg]]
    return out.round().astype(np.uint8)


def plot_mask_strip(
    frames: Sequence[np.ndarray], rows: Mapping[str, Sequence[np.ndarray]], frame_names: Sequence[str],
    path: str | Path, title: str,
) -> Path:
    """A grid of frames (columns) x methods (rows): each method's label maps over the frames.

    Args:
        frames: ``(H, W, 3)`` uint8 images, one per column.
        rows: ``method -> (H, W)`` label maps, one per column (e.g. ground truth first).
    """
    n_rows, n_cols = len(rows), len(frames)
    h, w = frames[0].shape[:2]
    fig = _figure(1.0 + 2.2 * n_cols * w / max(h, w) * 1.2, 0.6 + 2.2 * n_rows * h / max(h, w) * 1.2)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (name, maps) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.imshow(_overlay(frames[c], maps[c]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {frame_names[c]}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
