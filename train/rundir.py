"""One owner of a run directory: its file names, reading and writing them, checkpoints.

Layout (``RUN/``)::

    config.json          the resolved TrainConfig (train.config.load_train_config reads it back)
    provenance.json      store, environment, world size, effective batch and lr
    metrics.jsonl        one JSON object per line: {"kind": "train" | "eval", "epoch", "step", ...}
    checkpoints/last.pt  model + optimiser + torch RNG + task state + step (resume point)
    checkpoints/final.pt the same, written when the run ends
    summary.json         written last: the run is complete when it exists
    eval.json            the multi-view test (``eval-<name>.json`` for other evaluations)
    curves.png, confusion.png

Every JSON file is published atomically (``pipeline.fileio``); checkpoints too. Resuming
refuses a directory whose run has another content config (runtime knobs may differ).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

import torch

from pipeline.config import config_hash, diff_dicts
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.fileio import atomic_write, atomic_write_json, atomic_write_lines

__all__ = ["RunDir", "RunDirError", "MetricsLog", "find_runs", "resolve_init", "load_init"]

#: evaluations whose result file keeps its historical name
_EVAL_FILES = {"multiview": "eval.json"}


class RunDirError(FreezeframeError):
    """A run directory is missing or unreadable."""


class MetricsLog:
    """Appends metric lines to ``metrics.jsonl`` (one writer: rank 0), flushed after each line."""

    def __init__(self, path: Path) -> None:
        self._f: IO[str] = open(path, "a")

    def write(self, row: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(dict(row)) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class RunDir:
    """A run directory ``path`` (need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- file names ---------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def provenance_file(self) -> Path:
        return self.path / "provenance.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def final(self) -> Path:
        return self.checkpoints / "final.pt"

    @property
    def curves_png(self) -> Path:
        return self.path / "curves.png"

    @property
    def confusion_png(self) -> Path:
        return self.path / "confusion.png"

    def eval_file(self, name: str) -> Path:
        """``eval-<name>.json`` (``eval.json`` for the multi-view test)."""
        return self.path / _EVAL_FILES.get(name, f"eval-{name}.json")

    @property
    def complete(self) -> bool:
        """True when ``summary.json`` exists (written last)."""
        return self.summary_file.is_file()

    # ---- writing ------------------------------------------------------------------------
    def write_config(self, cfg: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.config_file, cfg)

    def write_provenance(self, prov: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.provenance_file, prov)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.summary_file, summary)

    def write_eval(self, name: str, result: Any) -> Path:
        """An evaluation's output (anything with ``to_json()``) as its result file."""
        return atomic_write_json(self.eval_file(name), result.to_json(), indent=1)

    def open_metrics(self) -> MetricsLog:
        self.path.mkdir(parents=True, exist_ok=True)
        return MetricsLog(self.metrics_file)

    def truncate_metrics(self, step: int, total_steps: int) -> None:
        """Drop metric lines written after the checkpoint we resume from, and the final
        evaluation line (it is redone when the run ends), so that no line appears twice."""
        if not self.metrics_file.exists():
            return

        def keep(m: dict) -> bool:
            return m["step"] <= step and not (m["kind"] == "eval" and m["step"] >= total_steps)

        lines = [line for line in self.metrics_file.read_text().splitlines() if line.strip()]
        atomic_write_lines(self.metrics_file, [line for line in lines if keep(json.loads(line))])

    def save_checkpoint(self, path: Path, state: Mapping[str, Any]) -> Path:
        """``state`` (model, optimiser, rng, task state, step, config...) written atomically."""
        return atomic_write(path, lambda f: torch.save(dict(state), f))

    # ---- resume -------------------------------------------------------------------------
    def resume_state(self, content: Mapping[str, Any]) -> dict[str, Any] | None:
        """``checkpoints/last.pt`` if it exists and was written by a run with the same ``content``
        config (the config without runtime knobs); None for a fresh directory."""
        if not self.last.exists():
            return None
        state = torch.load(self.last, map_location="cpu", weights_only=False)
        if state["config_hash"] != config_hash(dict(content)):
            diffs = diff_dicts(state["content"], content, have_name="run has", want_name="this command asks")
            raise ConfigMismatchError(
                f"{self.path} holds a run with a different config; use a new run directory (--run-dir) "
                "or delete it to start over:\n" + "\n".join(f"  - {d}" for d in diffs))
        return state

    # ---- reading back -------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """``config.json`` as a dict."""
        path = self.config_file
        if not path.is_file():
            raise RunDirError(
                f"{self.path} is not a run directory (no config.json); pass directories written by "
                "`freezeframe pretrain` / `freezeframe finetune`, or a folder that contains them")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path} is not valid JSON ({e}); the run was interrupted while writing it, re-run it") from e
        if not isinstance(cfg, dict):
            raise RunDirError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
        return cfg

    def read_json(self, path: Path) -> Any | None:
        """A JSON file of the run (None when absent)."""
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path} is not valid JSON ({e}); delete it and re-run the step that writes it") from e

    def read_summary(self) -> dict[str, Any] | None:
        return self.read_json(self.summary_file)

    def read_eval(self, name: str) -> dict[str, Any] | None:
        return self.read_json(self.eval_file(name))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl`` (``[]`` when absent).

        A truncated last line (a run still writing, or killed mid-write) is skipped; a broken line
        anywhere else is an error."""
        path = self.metrics_file
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()
        out: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    break
                raise RunDirError(f"{path}:{i + 1} is not valid JSON ({e}); the metrics log is corrupt") from e
            if isinstance(row, dict):
                out.append(row)
        return out


def resolve_init(init: str) -> Path:
    """A run directory (its final, else last checkpoint) or a checkpoint file."""
    p = Path(init)
    run = RunDir(p)
    for cand in (p, run.final, run.last):
        if cand.is_file():
            return cand
    raise FreezeframeError(f"no checkpoint at {init}: give a pretraining run directory or a .pt file")


def load_init(init: str) -> dict[str, Any]:
    """The checkpoint ``init`` points at (see :func:`resolve_init`), on the CPU."""
    return torch.load(resolve_init(init), map_location="cpu", weights_only=False)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Expand the given paths into run directories.

    A path holding ``config.json`` is a run; any other directory is searched (recursively) for
    run directories, e.g. ``runs/``. Duplicates are dropped, order is kept.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if RunDir(p).config_file.is_file():
            runs = [p]
        elif p.is_dir():
            runs = sorted({c.parent for c in p.rglob("config.json")})
            runs = [r for r in runs if not any(o != r and o in r.parents for o in runs)]  # no nested runs
            if not runs:
                raise RunDirError(f"no run directories (folders with a config.json) under {p}")
        else:
            raise RunDirError(f"{p} does not exist; pass run directories written by `freezeframe pretrain/finetune`")
        for r in runs:
            if r not in found:
                found.append(r)
    return found
