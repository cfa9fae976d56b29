"""One owner of a run directory: its file names, reading and writing them, checkpoints.

Layout (``RUN/``)::

    config.json          the resolved TrainConfig (train.config.load_train_config reads it back)
    provenance.json      store, environment, world size, effective batch and lr
    metrics.jsonl        one JSON object per line: {"kind": "train" | "eval", "epoch", "step", ...}
    checkpoints/last.pt  model + optimiser + torch RNG + task state + step (resume point)
    checkpoints/prev.pt  the previous last.pt (resume falls back to it when last.pt is damaged)
    checkpoints/final.pt the model (no optimiser) and what describes it, written when the run ends
    checkpoints/best.pt  the same at the best evaluation so far (``best_metric``)
    checkpoints/epoch-<e>.pt  full end-of-epoch checkpoints, the last ``keep_last`` kept
    model.safetensors    the final model's state_dict alone (when ``safetensors`` is installed)
    metrics.csv          the train lines of metrics.jsonl as a table; tb/: TensorBoard (when installed)
    run.lock             flock held by the process training in this directory (one at a time)
    summary.json         written last: the run is complete when it exists
    eval.json            the multi-view test (``eval-<name>.json`` for other evaluations)
    curves.png, confusion.png

Every JSON file is published atomically (``pipeline.fileio``); checkpoints too, and hold only
tensors and plain data (read with ``torch.load(weights_only=True)``). Resuming refuses a
directory whose run has another content config (runtime knobs may differ) or was trained on a
store with other features or videos.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping

import torch

from pipeline.config import config_hash, diff_dicts, drop_keys
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.fileio import atomic_write, atomic_write_json, atomic_write_lines
from pipeline.store import FeatureStore, file_lock

__all__ = ["RunDir", "RunDirError", "MetricsLog", "find_runs", "resolve_init", "load_init", "load_checkpoint",
           "store_identity", "check_init_source", "FEATURE_KEYS"]

#: store header ``content`` keys that decide what a feature means (a model trained on one store
#: only transfers to another whose features agree on these)
FEATURE_KEYS = ("backbone", "weights_sha256", "preprocess", "geometry", "feature_shape", "spatial_pool",
                "channel_pool")


def store_identity(store: FeatureStore) -> dict[str, Any]:
    """What a checkpoint records about its store: the content hash, the :data:`FEATURE_KEYS`, the
    number of videos stored (a store still being extracted grows) and the sha256 of the split
    table applied (``data.splits``; None: the store's own splits)."""
    content = store.content
    return {"content_hash": store.header.get("content_hash"), **{k: content.get(k) for k in FEATURE_KEYS},
            "videos_stored": len(store), "split_table": store.split_table}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint on the CPU, read with ``weights_only=True`` (tensors and plain data only:
    a crafted file cannot run code). A truncated or damaged file raises :class:`RunDirError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunDirError(f"no checkpoint at {path}") from None
    except Exception as e:  # truncated zip, bad pickle, refused global: all mean "not usable"
        raise RunDirError(f"checkpoint {path} is damaged or not a freezeframe checkpoint "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict):
        raise RunDirError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    return state

#: evaluations whose result file keeps its historical name
_EVAL_FILES = {"multiview": "eval.json"}


class RunDirError(FreezeframeError):
    """A run directory is missing or unreadable."""


def append_csv(path: Path, row: Mapping[str, Any]) -> None:
    """Append ``row`` (without ``kind``) to a CSV file whose columns are its header line (the
    first row's keys when the file is new); keys not in the header are left out."""
    columns: list[str] = []
    if path.exists():
        with open(path, newline="") as f:
            columns = next(csv.reader(f), [])
    new = not columns
    if new:
        columns = [k for k in row if k != "kind"]
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
        if new:
            w.writeheader()
        w.writerow({k: v for k, v in row.items() if k != "kind"})


class MetricsLog:
    """Appends metric lines to ``metrics.jsonl`` (one writer: rank 0), flushed after each line;
    train lines also to ``metrics.csv`` (columns of the first train line), and every number to
    TensorBoard (``tb/``, tag ``<kind>/<key>``) when the ``tensorboard`` package is installed."""

    def __init__(self, path: Path, csv_path: Path | None = None, tb_dir: Path | None = None,
                 start_step: int = 0) -> None:
        self._f: IO[str] = open(path, "a")
        self._csv_path = csv_path
        self._tb = None
        if tb_dir is not None and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency

            self._tb = SummaryWriter(str(tb_dir), purge_step=start_step or None)

    def write(self, row: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(dict(row)) + "\n")
        self._f.flush()
        if self._csv_path is not None and row.get("kind") == "train":
            append_csv(self._csv_path, row)
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, int(row.get("step", 0)))

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


class _RunFile:
    """A read-only attribute of :class:`RunDir`: the path of one of its files (or folders),
    ``parts`` below the run directory."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, run: "RunDir | None", owner: type | None = None) -> Path:
        if run is None:
            return self  # type: ignore[return-value]  # class attribute access (introspection)
        return run.path.joinpath(*self.parts)

    def __set__(self, run: "RunDir", value: object) -> None:
        raise AttributeError(f"RunDir.{self.name} is a fixed file name")


class RunDir:
    """A run directory ``path`` (need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- file names ---------------------------------------------------------------------
    config_file = _RunFile("config.json")
    provenance_file = _RunFile("provenance.json")
    metrics_file = _RunFile("metrics.jsonl")
    summary_file = _RunFile("summary.json")
    metrics_csv = _RunFile("metrics.csv")
    safetensors_file = _RunFile("model.safetensors")
    lock_file = _RunFile("run.lock")
    curves_png = _RunFile("curves.png")
    confusion_png = _RunFile("confusion.png")
    checkpoints = _RunFile("checkpoints")
    last = _RunFile("checkpoints", "last.pt")
    prev = _RunFile("checkpoints", "prev.pt")
    final = _RunFile("checkpoints", "final.pt")
    best = _RunFile("checkpoints", "best.pt")

    def snapshot(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:04d}.pt"

    def eval_file(self, name: str, tag: str | None = None) -> Path:
        """``eval-<name>.json`` (``eval.json`` for the multi-view test); with ``tag`` (an evaluation
        on another split or store) ``eval-<name>@<tag>.json``, never the run's own result file."""
        if tag:
            safe = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in tag)
            return self.path / f"eval-{name}@{safe}.json"
        return self.path / _EVAL_FILES.get(name, f"eval-{name}.json")

    def tagged_evals(self) -> dict[str, Path]:
        """Tag -> file of every evaluation written under its own name (``eval-<name>@<tag>.json``)."""
        return {p.stem.split("@", 1)[1]: p for p in sorted(self.path.glob("eval-*@*.json"))}

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``run.lock`` (one training process per run directory); refuse at once when
        another live process holds it (the lock dies with its holder, even on SIGKILL)."""
        with file_lock(self.lock_file) as held:
            if not held:
                raise RunDirError(f"{self.path} is being trained by another process now (it holds {self.lock_file}); "
                                  "wait for it to finish, or use another --run-dir")
            yield

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

    def write_eval(self, name: str, result: Any, tag: str | None = None,
                   where: Mapping[str, Any] | None = None) -> Path:
        """An evaluation's output (anything with ``to_json()``) as its result file; ``tag`` names
        an evaluation on another split or store (see :meth:`eval_file`), ``where`` (store, split)
        is recorded in the file under ``"evaluated_on"``."""
        obj = result.to_json()
        if where:
            obj = {**obj, "evaluated_on": dict(where)}
        return atomic_write_json(self.eval_file(name, tag), obj, indent=1)

    def open_metrics(self, start_step: int = 0) -> MetricsLog:
        self.path.mkdir(parents=True, exist_ok=True)
        return MetricsLog(self.metrics_file, self.metrics_csv, self.path / "tb", start_step)

    def truncate_metrics(self, step: int, total_steps: int) -> None:
        """Drop metric lines written after the checkpoint we resume from, and the final
        evaluation line (it is redone when the run ends), so that no line appears twice."""
        if not self.metrics_file.exists():
            return

        def keep(m: dict) -> bool:
            return m["step"] <= step and not (m["kind"] == "eval" and m["step"] >= total_steps)

        # a torn last line (killed mid-write) is dropped by read_metrics
        rows = [m for m in self.read_metrics() if keep(m)]
        atomic_write_lines(self.metrics_file, [json.dumps(m) for m in rows])
        self.metrics_csv.unlink(missing_ok=True)  # rebuilt from the lines kept
        for m in rows:
            if m.get("kind") == "train":
                append_csv(self.metrics_csv, m)

    def save_checkpoint(self, path: Path, state: Mapping[str, Any]) -> Path:
        """``state`` (tensors and plain data: model, optimiser, rng, task state, step, config...)
        written atomically; the ``last.pt`` it replaces is kept as ``prev.pt``."""
        if Path(path) == self.last and self.last.exists():
            os.replace(self.last, self.prev)
        return atomic_write(path, lambda f: torch.save(dict(state), f))

    def save_snapshot(self, state: Mapping[str, Any], epoch: int, keep: int) -> Path:
        """A full checkpoint of the end of ``epoch`` (``epoch-<e>.pt``); only the ``keep`` latest stay."""
        path = atomic_write(self.snapshot(epoch), lambda f: torch.save(dict(state), f))
        for old in sorted(self.checkpoints.glob("epoch-*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def export_model(self, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path | None:
        """The model's weights alone as ``model.safetensors`` (``metadata`` as JSON strings), when
        the ``safetensors`` package is installed (it comes with timm); None otherwise."""
        if importlib.util.find_spec("safetensors") is None:
            return None
        from safetensors.torch import save  # lazy: optional at run time

        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        return atomic_write(self.safetensors_file, lambda f: f.write(save(tensors, metadata=meta)))

    # ---- resume -------------------------------------------------------------------------
    def latest_checkpoint(self, log: Callable[[str], Any] | None = None) -> dict[str, Any] | None:
        """``last.pt``, or ``prev.pt`` (with a warning through ``log``) when ``last.pt`` is damaged
        or missing (a kill between the two renames of :meth:`save_checkpoint`); None when the
        directory has neither."""
        if not self.last.exists() and not self.prev.exists():
            return None
        try:
            return load_checkpoint(self.last)
        except RunDirError as e:
            if not self.prev.exists():
                raise RunDirError(f"{e}; there is no previous checkpoint to fall back to: delete {self.checkpoints} "
                                  "to start the run over") from None
            try:
                state = load_checkpoint(self.prev)
            except RunDirError as e2:
                raise RunDirError(f"{e}; the previous one too ({e2}); delete {self.checkpoints} to start the run "
                                  "over") from None
            if log:
                log(f"[yellow]warning: {e}; resuming from the previous checkpoint {self.prev} (step {state.get('step')})")
            return state

    def resume_state(self, content: Mapping[str, Any], store: Mapping[str, Any] | None = None,
                     log: Callable[[str], Any] | None = None) -> dict[str, Any] | None:
        """The latest good checkpoint (:meth:`latest_checkpoint`) if it was written by a run with
        the same ``content`` config (the config without runtime knobs) and, when ``store`` (a
        :func:`store_identity`) is given, on a store with the same content and videos; None for
        a fresh directory. Differences are refused with every differing key listed."""
        state = self.latest_checkpoint(log)
        if state is None:
            return None
        if state["config_hash"] != config_hash(dict(content)):
            diffs = diff_dicts(state["content"], content, have_name="run has", want_name="this command asks")
            old_epochs = state["content"].get("optim", {}).get("epochs")
            new_epochs = content.get("optim", {}).get("epochs")
            same_but_epochs = config_hash(drop_keys(state["content"], ["optim.epochs"])) == \
                config_hash(drop_keys(dict(content), ["optim.epochs"]))
            if same_but_epochs and isinstance(old_epochs, int) and isinstance(new_epochs, int) and new_epochs > old_epochs:
                if log:  # more epochs: the run goes on; the cosine is stretched to the new length from here
                    log(f"extending {self.path} from {old_epochs} to {new_epochs} epochs (the cosine learning rate "
                        f"is recomputed for {new_epochs} epochs from step {state['step']} on)")
                return state
            raise ConfigMismatchError(
                f"{self.path} holds a run with a different config; use a new run directory (--run-dir) "
                "or delete it to start over:\n" + "\n".join(f"  - {d}" for d in diffs))
        if store is not None:
            saved = state.get("store") or ({"content_hash": state["store_content_hash"]}
                                           if state.get("store_content_hash") else {})
            diffs = diff_dicts(saved, {k: store.get(k) for k in saved}, have_name="the run was trained on",
                               want_name="the store now has")
            if diffs:
                raise ConfigMismatchError(
                    f"{self.path} was trained on a store that has changed since (re-extracted or still being "
                    "extracted); resuming would mix features. Train in a new run directory (--run-dir), or "
                    "restore the store:\n" + "\n".join(f"  - {d}" for d in diffs))
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
    """The checkpoint ``init`` points at (see :func:`resolve_init`), on the CPU (``weights_only``)."""
    return load_checkpoint(resolve_init(init))


def check_init_source(init: str, store: Mapping[str, Any] | None = None, *, allow_unfinished: bool = False,
                      allow_other_store: bool = False) -> dict[str, Any]:
    """The checkpoint ``init`` points at, refused (before any work) when its run did not finish
    training (unless ``allow_unfinished``) or was trained on features that differ from ``store``
    (a :func:`store_identity`) in backbone, weights, preprocessing, geometry, pooling or
    channels (unless ``allow_other_store``)."""
    path = resolve_init(init)
    state = load_checkpoint(path)
    # checkpoints say whether their run finished; older ones only by being final.pt
    finished = bool(state["finished"]) if "finished" in state else path.name == "final.pt"
    if not finished and not allow_unfinished:
        raise FreezeframeError(
            f"init {init}: that run did not finish training (checkpoint {path.name} at step {state.get('step')}); "
            "finish it first (rerun its command), or set init_unfinished=true to start from it anyway")
    saved = state.get("store")
    if store is not None and saved and not allow_other_store:
        diffs = diff_dicts({k: saved.get(k) for k in FEATURE_KEYS}, {k: store.get(k) for k in FEATURE_KEYS},
                           have_name="init was trained on", want_name="this store has")
        if diffs:
            raise ConfigMismatchError(
                f"init {init} was trained on features of another kind than this store's; its weights would "
                "not mean the same thing here. Use a store extracted with the same settings, or set "
                "init_other_store=true for a deliberate transfer:\n" + "\n".join(f"  - {d}" for d in diffs))
    return state


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
