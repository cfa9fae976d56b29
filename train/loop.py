"""The stage-2 training loop, one function for every task.

Read :func:`fit` top to bottom to see the whole thing (nanoGPT style): set up ranks, open the
store, let the task check the config and build its data and modules, make the optimiser,
resume if a checkpoint exists, then loop over epochs and steps with a warmup+cosine learning
rate, checkpoints and metric lines, and run the task's evaluations at the end. What differs
between tasks (data, modules, loss, extra state) is asked of the task (``train.tasks``); the
loop never names one. Files are written through :class:`train.rundir.RunDir`.

Killing a run at any point and rerunning the same command resumes from
``checkpoints/last.pt`` and ends with the same weights as an uninterrupted run (items are
seeded by (seed, epoch, index), the sampler by (seed, epoch); the torch RNG and the task's
state are checkpointed).
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pipeline.config import config_hash, to_dict
from pipeline.errors import FreezeframeError
from pipeline.heap import retain_freed_memory
from pipeline.provenance import environment
from train import distributed as D
from train.config import TrainConfig, content_of
from train.schema import OptimConfig
from train.data import collate, open_training_store, to_model_dtype
from train.evals import get_evaluation
from train.models import arch_signature, check_input_channels
from train.progress import TrainProgress
from train.report import draw_curves
from train.rundir import RunDir, store_identity
from train.schema import peak_lr as scaled_lr
from train.schema import per_rank_batch as batch_per_rank
from train.tasks import get_task

__all__ = ["fit", "RunResult", "lr_at", "SkipSampler", "DivergedError"]


class DivergedError(FreezeframeError):
    """The loss became NaN or inf: the run stops instead of training garbage."""


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup ``peak * (step + 1) /
    warmup_steps`` (the first step already learns: never an lr of 0), then cosine from ``peak``
    at ``warmup_steps`` towards ``floor`` at ``total_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class SkipSampler(Sampler[int]):
    """Yields a base sampler's indices after skipping the first ``skip`` (mid-epoch resume)."""

    def __init__(self, base: Sampler[int], skip: int = 0) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        for i, idx in enumerate(self.base):
            if i >= self.skip:
                yield idx

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one group, or with ``optim.decay_matrices_only`` weight
    decay on parameters with 2+ dimensions (weight matrices) and none on biases and norms
    (timm's ``param_groups_weight_decay``, as MAE-style recipes do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not optim.decay_matrices_only:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) tuple/list/dict batch moved to ``device`` (asynchronously from
    pinned memory on CUDA); float16 tensors (store features kept in their storage dtype by the
    datasets, :func:`train.data.to_model_dtype`) are cast to float32 there, on the device."""
    if isinstance(batch, torch.Tensor):
        return to_model_dtype(batch.to(device, non_blocking=True))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batches(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches; a FreezeframeError raised in a DataLoader worker is re-raised with
    its own one-line message (not the worker's traceback text torch wraps it in)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except FreezeframeError as e:
            msg = str(e)
            marker = f"{type(e).__name__}: "
            if "Original Traceback" in msg and marker in msg:
                msg = msg.rsplit(marker, 1)[1].strip()
            raise type(e)(msg) from None
        yield batch


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    top1: float | None = None
    top5: float | None = None
    evals: dict[str, float] = field(default_factory=dict)  # headline numbers of the final evaluations


def fit(cfg: TrainConfig, console: Any = None) -> RunResult:
    """Train one run described by ``cfg`` (any registered task); resumable.

    A run directory is trained by one process at a time (``RunDir.lock``, held by rank 0 from
    the first write to the end); a finished run rerun with the same config prints its summary
    and returns it without touching a file."""
    with ExitStack() as held:
        return _fit(cfg, console, held)


def _finished(run: RunDir, summary: dict[str, Any], con: Any) -> RunResult:
    """The result of a finished run, read back from its ``summary.json`` (printed too)."""
    con.log(f"{run.path} is finished: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    known = {"name", "task", "epochs", "steps", "seconds", "final_loss", "skipped_videos"}
    evals = {k: float(v) for k, v in summary.items() if k not in known and isinstance(v, (int, float))}
    return RunResult(run.path, int(summary["steps"]), float(summary["final_loss"]), evals.get("top1"),
                     evals.get("top5"), evals)


def _fit(cfg: TrainConfig, console: Any, held: ExitStack) -> RunResult:
    con = console or Console(stderr=True)
    dinfo = D.setup(cfg.device)
    retain_freed_memory()  # each step frees and reallocates the same large temporaries: reuse their pages
    run = RunDir(cfg.run_dir or f"runs/{cfg.name or cfg.task}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    # ---- task and data: refusals first ---------------------------------------------------
    store = open_training_store(cfg)
    task = get_task(cfg.task)(cfg, store, dinfo.device)
    evaluations = [get_evaluation(name) for name in task.evaluations]
    if task.uses_model_config:
        check_input_channels(cfg.model, store.feature_shape[2])
    for ev in evaluations:
        ev.preflight(store, cfg)
    task.preflight()
    train_set: Any = task.train_dataset(cfg.seed)
    skipped: list[str] = []
    if cfg.data.skip_bad_videos:
        if not hasattr(train_set, "drop_bad_videos"):
            raise FreezeframeError(f"task {cfg.task!r} cannot leave bad videos out (its dataset has no "
                                   "drop_bad_videos); unset data.skip_bad_videos")
        skipped = train_set.drop_bad_videos()
        if skipped:
            con.log(f"[yellow]left out {len(skipped)} training video(s) with NaN/inf features: "
                    f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")
    per_rank_batch = batch_per_rank(cfg.optim, dinfo.world)
    if len(train_set) < per_rank_batch * dinfo.world:
        per_rank_batch = max(1, len(train_set) // dinfo.world)
        con.log(f"[yellow]batch_size lowered to {per_rank_batch} videos per rank: the split has only {len(train_set)} videos")
    # a dataset whose order is the data (clip streams in time order) says shuffle = False
    base_sampler = DistributedSampler(train_set, num_replicas=dinfo.world, rank=dinfo.rank,
                                      shuffle=getattr(train_set, "shuffle", True), seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(base_sampler) // per_rank_batch
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # ---- a finished run is not trained again ----------------------------------------------
    cfg_dict, content = to_dict(cfg), content_of(cfg)
    if run.complete:
        done = run.resume_state(content)  # refuses another config
        summary = run.read_summary() or {}
        if done is not None and int(done["step"]) >= total_steps and "steps" in summary:
            D.teardown()
            return _finished(run, summary, con)

    # ---- model and optimiser ------------------------------------------------------------
    model: nn.Module = task.build().to(dinfo.device)
    if dinfo.enabled:
        model = D.convert_sync_batchnorm(model, dinfo.device)
        model = DistributedDataParallel(model, device_ids=[dinfo.device.index] if dinfo.device.type == "cuda" else None)
    peak_lr = scaled_lr(cfg.optim, per_rank_batch, dinfo.world)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim), lr=peak_lr, betas=cfg.optim.betas,
                            weight_decay=cfg.optim.weight_decay)
    # the TMM and head run in float32 unless amp asks for bf16 autocast (the frozen image model's
    # precision was the extraction's: the store holds its features in the store's dtype)
    amp = torch.autocast(dinfo.device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()

    # ---- run directory, resume ------------------------------------------------------------
    if dinfo.is_main:
        held.enter_context(run.lock())  # one process per run directory, from the first write on
    step = 0
    best: dict[str, Any] = {}
    identity = store_identity(store)
    state = run.resume_state(content, identity, con.log)
    if state is not None:
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        task.load_state_dict(state["task"])
        step = int(state["step"])
        best = dict(state.get("best") or {})
        con.log(f"resuming {run.path} from step {step}/{total_steps}")
    if dinfo.is_main:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        run.write_config(cfg_dict)
        run.write_provenance({"store": str(store.path), "store_header": store.header, "environment": environment(),
                              "world_size": dinfo.world, "device": str(dinfo.device),
                              "torch_threads": torch.get_num_threads(), "peak_lr": peak_lr,
                              "precision": "bfloat16 autocast" if cfg.amp else "float32",
                              "per_rank_batch": per_rank_batch, "steps_per_epoch": steps_per_epoch})
        run.truncate_metrics(step, total_steps)

    def checkpoint(full: bool = True) -> dict[str, Any]:
        """The checkpoint state (tensors and plain data only); ``full``: with the optimiser and
        the torch RNG (what resuming needs), else the model and what describes it (final.pt)."""
        state = {
            "model": _unwrap(model).state_dict(), "step": step, "task": task.state_dict(), "config": cfg_dict,
            "content": content, "config_hash": config_hash(content), "arch": arch_signature(cfg.model),
            "store_content_hash": store.header.get("content_hash"), "store": identity, "total_steps": total_steps,
            "finished": step >= steps_per_epoch * cfg.optim.epochs,  # max_steps stops do not finish a run
            "best": best}
        if full:
            state.update(optimizer=opt.state_dict(), torch_rng=torch.get_rng_state())
        return state

    def save(path: Path, full: bool = True) -> None:
        if dinfo.is_main:
            run.save_checkpoint(path, checkpoint(full))
        D.barrier()

    def evaluate() -> list[tuple[Any, Any]]:
        """(evaluation, output) for each evaluation; a ``distributed`` one runs on every rank (each
        on its share of the videos), the others on rank 0 (output None on the other ranks)."""
        outs = []
        for ev in evaluations:
            runs_here = getattr(ev, "distributed", False) or dinfo.is_main
            outs.append((ev, ev.run(_unwrap(model), store, cfg, dinfo.device) if runs_here else None))
        D.barrier()
        return outs

    def numbers_of(outs: list[tuple[Any, Any]]) -> dict[str, float]:
        numbers: dict[str, float] = {}
        for _, res in outs:
            if res is not None:
                numbers.update(res.summary())
        return numbers

    def keep_best(numbers: dict[str, float]) -> None:
        """``checkpoints/best.pt`` (model only) when ``best_metric`` improved (``*loss*`` metrics: lower is better)."""
        nonlocal best
        key = cfg.best_metric
        if not key or key not in numbers or not dinfo.is_main:
            return
        value, lower = float(numbers[key]), "loss" in key
        if best and (value >= best["value"] if lower else value <= best["value"]):
            return
        best = {"metric": key, "value": value, "step": step}
        run.save_checkpoint(run.best, checkpoint(full=False))
        progress.note(f"best {key} {value:.4g} at step {step}: {run.best}")

    # ---- loop -----------------------------------------------------------------------------
    # Inside the loop only the task's steps draw from the global torch RNG (dropout, masks...):
    # the DataLoader gets its own generator per epoch, so a run resumed mid-epoch (a new loader)
    # continues the checkpointed RNG stream exactly where the uninterrupted run was.
    warmup_steps = int(cfg.optim.warmup_epochs * steps_per_epoch)
    schedule_steps = steps_per_epoch * cfg.optim.epochs  # max_steps stops early, it does not rescale the lr
    t_start = time.monotonic()
    loss_value = float("nan")
    metrics = run.open_metrics(start_step=step) if dinfo.is_main else None
    progress = TrainProgress(con, total_steps, steps_per_epoch, cfg.optim.epochs, step, enabled=dinfo.is_main)
    held.enter_context(progress)
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        train_set.set_epoch(epoch)
        base_sampler.set_epoch(epoch)
        loader = DataLoader(
            train_set, batch_size=per_rank_batch, sampler=SkipSampler(base_sampler, in_epoch * per_rank_batch),
            num_workers=cfg.data.workers, pin_memory=dinfo.device.type == "cuda", drop_last=True,
            persistent_workers=False, multiprocessing_context="fork" if cfg.data.workers else None,
            prefetch_factor=cfg.data.prefetch_factor if cfg.data.workers else None,
            collate_fn=collate,  # a batch the dataset read as one tensor is handed over without a copy
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))  # not the global RNG: see below
        model.train()
        for batch in _batches(loader):
            batch = _to_device(batch, dinfo.device)
            lr = lr_at(step, schedule_steps, warmup_steps, peak_lr, cfg.optim.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with amp:
                out = task.step(model, batch)
            loss = out["loss"]
            loss_value = float(D.all_reduce_mean(loss.detach()))
            if not math.isfinite(loss_value):
                raise DivergedError(
                    f"the loss is {loss_value} at step {step + 1} (epoch {step // steps_per_epoch + 1}, lr {lr:.3g}) "
                    f"of {run.path}; the batch's features were finite (every item is checked), so training "
                    "diverged: lower optim.base_lr, set optim.grad_clip, or check the task's loss. Nothing "
                    "was saved after the last good checkpoint")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            step += 1
            task.after_step(model, step)
            if step % cfg.log_every == 0 or step % steps_per_epoch == 0 or step == total_steps:
                # every scalar of the step averaged over ranks, like the loss (all ranks take part)
                extra = {k: float(D.all_reduce_mean(torch.as_tensor(v, dtype=torch.float32, device=dinfo.device)
                                                    .detach())) for k, v in out.items() if k != "loss"}
                scalars = {"loss": loss_value, **extra, "lr": lr}
                progress.update(step, scalars)
                if metrics:
                    metrics.write({"kind": "train", "epoch": step / steps_per_epoch, "step": step, **scalars,
                                   "time": round(time.monotonic() - t_start, 3)})
            if step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0:
                save(run.last)
            if step % steps_per_epoch == 0 and cfg.keep_last and dinfo.is_main:
                run.save_snapshot(checkpoint(), step // steps_per_epoch, cfg.keep_last)
            if step >= total_steps:
                break
        if evaluations and cfg.eval_every and (step // steps_per_epoch) % cfg.eval_every == 0 \
                and step < total_steps:
            numbers = numbers_of(evaluate())
            keep_best(numbers)
            if metrics:
                metrics.write({"kind": "eval", "epoch": step / steps_per_epoch, "step": step, **numbers})
            progress.note(f"evaluation at step {step}: {numbers}")
    progress.close()
    outs = evaluate() if evaluations else []
    result = RunResult(run.path, step, loss_value)
    result.evals.update(numbers_of(outs))
    keep_best(result.evals)
    save(run.last)
    save(run.final, full=False)
    if dinfo.is_main:
        run.export_model(_unwrap(model).state_dict(), {"task": cfg.task, "step": str(step), "config": cfg_dict})

    # ---- evaluations and summary ---------------------------------------------------------
    if metrics:
        summary: dict[str, Any] = {"name": cfg.name or run.path.name, "task": cfg.task, "epochs": cfg.optim.epochs,
                                   "steps": step, "seconds": round(time.monotonic() - t_start, 2),
                                   "final_loss": loss_value}
        if skipped:
            summary["skipped_videos"] = len(skipped)
        for ev, res in outs:
            run.write_eval(ev.name, res)
            ev.plot(res, run)
        if evaluations:
            metrics.write({"kind": "eval", "epoch": step / max(1, steps_per_epoch), "step": step, **result.evals})
        summary.update(result.evals)
        result.top1, result.top5 = result.evals.get("top1"), result.evals.get("top5")
        metrics.close()
        run.write_summary(summary)
        draw_curves(run.path)
    D.teardown()
    return result
