"""What a training run shows while it runs (rank 0 only).

On a terminal: a rich progress bar over the run's steps with the epoch, step, loss, learning
rate and rate (steps/s). Elsewhere (a log file, a Slurm job, a pipe): one plain line per
epoch, so logs stay readable. The metric files (``metrics.jsonl``, ``metrics.csv``,
TensorBoard) are :class:`train.rundir.MetricsLog`'s job, not this module's.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["TrainProgress", "format_scalars"]


def format_scalars(values: Mapping[str, float]) -> str:
    """``loss 0.6931 acc 0.500`` (4 significant digits; lr in scientific notation)."""
    parts = []
    for k, v in values.items():
        parts.append(f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.4g}")
    return " ".join(parts)


class TrainProgress:
    """Progress of one run from ``start_step`` to ``total_steps`` (steps are optimiser steps).

    ``enabled`` False (other ranks) makes every call a no-op. ``live``: None decides from the
    console (a terminal gets the bar, anything else the per-epoch lines).
    """

    def __init__(self, console: Console, total_steps: int, steps_per_epoch: int, epochs: int, start_step: int = 0,
                 *, enabled: bool = True, live: bool | None = None) -> None:
        self.con, self.total, self.per_epoch, self.epochs = console, total_steps, steps_per_epoch, epochs
        self.enabled = enabled
        self.live = console.is_terminal if live is None else live
        self.start_step = start_step
        self.t0 = time.monotonic()
        self._epoch_t0, self._epoch_step0 = self.t0, start_step
        self._bar: Progress | None = None
        if self.enabled and self.live:
            self._bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[scalars]}"), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                            epoch=self._epoch_text(start_step), scalars="", rate="")
            self._bar.start()

    def _epoch_text(self, step: int) -> str:
        return f"{min(self.epochs, step // max(1, self.per_epoch) + 1)}/{self.epochs}"

    def rate(self) -> float:
        """Steps per second since this process started training."""
        return (self._last_step - self.start_step) / max(1e-9, time.monotonic() - self.t0)

    def update(self, step: int, scalars: Mapping[str, float]) -> None:
        """After optimiser step ``step`` (1-based count of finished steps) with its logged scalars."""
        if not self.enabled:
            return
        self._last_step = step
        if self._bar is not None:
            self._bar.update(self._task, completed=step, epoch=self._epoch_text(step - 1),
                             scalars=format_scalars(scalars), rate=f"{self.rate():.2f} step/s")
        if step % self.per_epoch == 0 or step == self.total:
            now = time.monotonic()
            rate = (step - self._epoch_step0) / max(1e-9, now - self._epoch_t0)
            self._epoch_t0, self._epoch_step0 = now, step
            if self._bar is None:
                epoch = (step - 1) // max(1, self.per_epoch) + 1
                self.con.log(f"epoch {epoch}/{self.epochs} step {step}/{self.total} {format_scalars(scalars)} "
                             f"{rate:.2f} step/s")

    def note(self, text: str) -> None:
        """A line above the bar (or in the log): evaluations, checkpoints of note."""
        if self.enabled:
            self.con.log(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "TrainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
