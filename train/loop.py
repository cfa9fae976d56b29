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
from contextlib import nullcontext
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
from pipeline.provenance import environment
from train import distributed as D
from train.config import TrainConfig, content_of
from train.data import open_training_store
from train.evals import get_evaluation
from train.models import arch_signature, check_input_channels
from train.report import draw_curves
from train.rundir import RunDir
from train.schema import peak_lr as scaled_lr
from train.schema import per_rank_batch as batch_per_rank
from train.tasks import get_task

__all__ = ["fit", "RunResult", "lr_at", "SkipSampler"]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine down to ``floor``."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) tuple/list/dict batch moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    top1: float | None = None
    top5: float | None = None
    evals: dict[str, float] = field(default_factory=dict)  # headline numbers of the final evaluations


def fit(cfg: TrainConfig, console: Any = None) -> RunResult:
    """Train one run described by ``cfg`` (any registered task); resumable."""
    con = console or Console(stderr=True)
    dinfo = D.setup(cfg.device)
    run = RunDir(cfg.run_dir or f"runs/{cfg.name or cfg.task}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    # ---- task and data: refusals first ---------------------------------------------------
    store = open_training_store(cfg)
    task = get_task(cfg.task)(cfg, store, dinfo.device)
    evaluations = [get_evaluation(name) for name in task.evaluations]
    check_input_channels(cfg.model, store.feature_shape[2])
    for ev in evaluations:
        ev.preflight(store, cfg)
    task.preflight()
    train_set: Any = task.train_dataset(cfg.seed)
    per_rank_batch = batch_per_rank(cfg.optim, dinfo.world)
    if len(train_set) < per_rank_batch * dinfo.world:
        per_rank_batch = max(1, len(train_set) // dinfo.world)
        con.log(f"[yellow]batch_size lowered to {per_rank_batch} videos per rank: the split has only {len(train_set)} videos")
    base_sampler = DistributedSampler(train_set, num_replicas=dinfo.world, rank=dinfo.rank,
                                      shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(base_sampler) // per_rank_batch
    total_steps = steps_per_epoch * cfg.optim.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # ---- model and optimiser ------------------------------------------------------------
    model: nn.Module = task.build().to(dinfo.device)
    if dinfo.enabled:
        model = D.convert_sync_batchnorm(model, dinfo.device)
        model = DistributedDataParallel(model, device_ids=[dinfo.device.index] if dinfo.device.type == "cuda" else None)
    peak_lr = scaled_lr(cfg.optim, per_rank_batch, dinfo.world)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    # the TMM and head run in float32 unless amp asks for bf16 autocast (the frozen image model's
    # precision was the extraction's: the store holds its features in the store's dtype)
    amp = torch.autocast(dinfo.device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()

    # ---- run directory, resume ------------------------------------------------------------
    cfg_dict, content = to_dict(cfg), content_of(cfg)
    step = 0
    state = run.resume_state(content)
    if state is not None:
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        task.load_state_dict(state["task"])
        step = int(state["step"])
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

    def save(path: Path) -> None:
        if dinfo.is_main:
            run.save_checkpoint(path, {
                "model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state(), "task": task.state_dict(), "config": cfg_dict,
                "content": content, "config_hash": config_hash(content), "arch": arch_signature(cfg.model),
                "store_content_hash": store.header.get("content_hash")})
        D.barrier()

    def evaluate() -> dict[str, float]:
        numbers: dict[str, float] = {}
        for ev in evaluations:
            numbers.update(ev.run(_unwrap(model), store, cfg, dinfo.device).summary())
        return numbers

    # ---- loop -----------------------------------------------------------------------------
    # Inside the loop only the task's steps draw from the global torch RNG (dropout, masks...):
    # the DataLoader gets its own generator per epoch, so a run resumed mid-epoch (a new loader)
    # continues the checkpointed RNG stream exactly where the uninterrupted run was.
    warmup_steps = int(cfg.optim.warmup_epochs * steps_per_epoch)
    schedule_steps = steps_per_epoch * cfg.optim.epochs  # max_steps stops early, it does not rescale the lr
    t_start = time.monotonic()
    loss_value = float("nan")
    metrics = run.open_metrics() if dinfo.is_main else None
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        train_set.set_epoch(epoch)
        base_sampler.set_epoch(epoch)
        loader = DataLoader(
            train_set, batch_size=per_rank_batch, sampler=SkipSampler(base_sampler, in_epoch * per_rank_batch),
            num_workers=cfg.data.workers, pin_memory=dinfo.device.type == "cuda", drop_last=True,
            persistent_workers=False, multiprocessing_context="fork" if cfg.data.workers else None,
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))  # not the global RNG: see below
        model.train()
        for batch in loader:
            batch = _to_device(batch, dinfo.device)
            lr = lr_at(step, schedule_steps, warmup_steps, peak_lr, cfg.optim.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with amp:
                out = task.step(model, batch)
            loss = out["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            step += 1
            task.after_step(model, step)
            loss_value = float(D.all_reduce_mean(loss.detach()))
            if metrics and (step % cfg.log_every == 0 or step % steps_per_epoch == 0 or step == total_steps):
                extra = {k: float(v) for k, v in out.items() if k != "loss"}
                metrics.write({"kind": "train", "epoch": step / steps_per_epoch, "step": step, "loss": loss_value,
                               **extra, "lr": lr, "time": round(time.monotonic() - t_start, 3)})
            if step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0:
                save(run.last)
            if step >= total_steps:
                break
        if evaluations and cfg.eval_every and (step // steps_per_epoch) % cfg.eval_every == 0 \
                and step < total_steps and metrics:
            metrics.write({"kind": "eval", "epoch": step / steps_per_epoch, "step": step, **evaluate()})
    save(run.last)
    save(run.final)

    # ---- evaluations and summary ---------------------------------------------------------
    result = RunResult(run.path, step, loss_value)
    if metrics:
        summary: dict[str, Any] = {"name": cfg.name or run.path.name, "task": cfg.task, "epochs": cfg.optim.epochs,
                                   "steps": step, "seconds": round(time.monotonic() - t_start, 2),
                                   "final_loss": loss_value}
        for ev in evaluations:
            res = ev.run(_unwrap(model), store, cfg, dinfo.device)
            run.write_eval(ev.name, res)
            ev.plot(res, run)
            result.evals.update(res.summary())
        if evaluations:
            metrics.write({"kind": "eval", "epoch": step / max(1, steps_per_epoch), "step": step, **result.evals})
        summary.update(result.evals)
        result.top1, result.top5 = result.evals.get("top1"), result.evals.get("top5")
        metrics.close()
        run.write_summary(summary)
        draw_curves(run.path)
    D.teardown()
    return result
