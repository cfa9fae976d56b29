"""The stage-2 training loop: PRP pretraining and fine-tuning on cached features.

Read :func:`train` top to bottom to see the whole thing (nanoGPT style): set up ranks,
open the store, build data, model and optimiser, resume if a checkpoint exists, then loop
over epochs and steps with a warmup+cosine learning rate, checkpoints, metric lines, and
(fine-tuning) a multi-view test evaluation at the end.

A run directory holds ``config.json``, ``provenance.json``, ``metrics.jsonl``,
``checkpoints/{last,final}.pt``, ``summary.json``, ``curves.png`` and, after fine-tuning,
``eval.json`` and ``confusion.png``. Killing a run at any point and rerunning the same
command resumes from ``checkpoints/last.pt`` and ends with the same weights as an
uninterrupted run (items are seeded by (seed, epoch, index); the sampler by (seed, epoch)).
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from pipeline.config import config_hash, to_dict
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.provenance import environment
from pipeline.store import FeatureStore, open_store
from train import distributed as D
from train.config import TrainConfig
from train.data import ClipDataset, PRPDataset, TestViewDataset, flatten_clips
from train.models import VideoModel, arch_signature, build_model, check_arch_compatible, check_input_channels

TASKS = ("prp", "finetune")


# --------------------------------------------------------------------------------------
# small pieces
# --------------------------------------------------------------------------------------
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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def resolve_init_checkpoint(init: str) -> Path:
    """A pretraining run directory (its final or last checkpoint) or a checkpoint file."""
    p = Path(init)
    for cand in (p, p / "checkpoints" / "final.pt", p / "checkpoints" / "last.pt"):
        if cand.is_file():
            return cand
    raise FreezeframeError(f"no checkpoint at {init}: give a pretraining run directory or a .pt file")


def open_training_store(cfg: TrainConfig) -> FeatureStore:
    if not cfg.data.store:
        raise FreezeframeError("no feature store given: set data.store (or --store) to a store made by `freezeframe extract`")
    store = open_store(cfg.data.store)
    mode = cfg.data.in_memory
    if mode == "yes" or (mode == "auto" and _store_bytes(store) < cfg.data.in_memory_max_gb * 2**30):
        store.load_into_memory()
    return store


def _store_bytes(store: FeatureStore) -> int:
    h, w, c = store.feature_shape
    item = {"float16": 2, "float32": 4, "int8": 1}[store.dtype.feature_dtype]
    frames = sum(int(m["num_frames"]) for m in store.markers.values())
    return frames * h * w * c * item


# --------------------------------------------------------------------------------------
# refusals: everything that can be checked before training starts
# --------------------------------------------------------------------------------------
def preflight(cfg: TrainConfig, store: FeatureStore) -> None:
    """Refuse, with a message saying what to change, a run that cannot work."""
    if cfg.task not in TASKS:
        raise FreezeframeError(f"unknown task {cfg.task!r}; choose one of {TASKS}")
    check_input_channels(cfg.model, store.feature_shape[2])
    if cfg.task == "prp" and cfg.model.num_classes != len(cfg.prp.rates):
        raise ConfigMismatchError(
            f"PRP has {len(cfg.prp.rates)} rate classes but model.num_classes={cfg.model.num_classes}; "
            f"set model.num_classes={len(cfg.prp.rates)}")
    if cfg.task == "finetune":
        TestViewDataset(store, cfg.data.test_split, cfg.test)  # refuses an empty test split now, not after training
        for split in (cfg.data.train_split, cfg.data.test_split):
            labels = {store.meta(v).label for v in store.split_ids(split)}
            if None in labels:
                raise FreezeframeError(f"split {split!r} has unlabelled videos; fine-tuning needs labels")
            if labels and max(labels) >= cfg.model.num_classes:  # type: ignore[type-var]
                raise ConfigMismatchError(
                    f"the store has labels up to {max(labels)} but model.num_classes={cfg.model.num_classes}; "  # type: ignore[type-var]
                    f"set model.num_classes={max(labels) + 1}")  # type: ignore[operator]
    if cfg.init:
        if cfg.task != "finetune":
            raise FreezeframeError("init (a pretraining checkpoint) is for fine-tuning runs")
        ckpt = torch.load(resolve_init_checkpoint(cfg.init), map_location="cpu", weights_only=False)
        check_arch_compatible(ckpt["arch"], arch_signature(cfg.model), new_head=True)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    steps: int
    final_loss: float
    top1: float | None = None
    top5: float | None = None


def train(cfg: TrainConfig, console: Any = None) -> RunResult:
    """Train one run described by ``cfg`` (PRP pretraining or fine-tuning); resumable."""
    from rich.console import Console

    con = console or Console(stderr=True)
    dinfo = D.setup(cfg.device)
    run_dir = Path(cfg.run_dir or f"runs/{cfg.name or cfg.task}")
    ckpt_dir = run_dir / "checkpoints"
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    # ---- data -------------------------------------------------------------------------
    store = open_training_store(cfg)
    preflight(cfg, store)
    if cfg.task == "prp":
        train_set: Any = PRPDataset(store, cfg.data.train_split, cfg.prp, cfg.seed, cfg.data.augment)
    else:
        train_set = ClipDataset(store, cfg.data.train_split, cfg.clip, cfg.seed, cfg.data.augment)
    per_rank_batch = cfg.optim.batch_size
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
    model: nn.Module = build_model(cfg.model)
    if cfg.init:
        ckpt = torch.load(resolve_init_checkpoint(cfg.init), map_location="cpu", weights_only=False)
        pre = build_model(_model_cfg_from(ckpt))
        pre.load_state_dict(ckpt["model"])
        model.tmm.load_state_dict(pre.tmm.state_dict())  # the head starts fresh (reset_head)
    model = model.to(dinfo.device)
    if dinfo.enabled:
        model = D.convert_sync_batchnorm(model, dinfo.device)
        model = DistributedDataParallel(model, device_ids=[dinfo.device.index] if dinfo.device.type == "cuda" else None)
    peak_lr = cfg.optim.base_lr * per_rank_batch * dinfo.world / 64
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (dinfo.device.type == "cuda" and cfg.amp) else nullcontext()

    # ---- run directory, resume ------------------------------------------------------------
    cfg_dict = to_dict(cfg)
    step = 0
    last = ckpt_dir / "last.pt"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        if state["config_hash"] != config_hash(_resume_key(cfg_dict)):
            diffs = _config_diffs(_resume_key(state["config"]), _resume_key(cfg_dict))
            raise ConfigMismatchError(
                f"{run_dir} holds a run with a different config; use a new run directory (--run-dir) "
                "or delete it to start over:\n" + "\n".join(f"  - {d}" for d in diffs))
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        con.log(f"resuming {run_dir} from step {step}/{total_steps}")
    if dinfo.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg_dict, indent=2))
        (run_dir / "provenance.json").write_text(json.dumps(
            {"store": str(store.path), "store_header": store.header, "environment": environment(),
             "world_size": dinfo.world, "device": str(dinfo.device), "torch_threads": torch.get_num_threads(),
             "peak_lr": peak_lr,
             "per_rank_batch": per_rank_batch, "steps_per_epoch": steps_per_epoch}, indent=2, default=str))
        _truncate_metrics(run_dir / "metrics.jsonl", step, total_steps)

    def save(path: Path) -> None:
        if dinfo.is_main:
            _atomic_torch_save({
                "model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state(), "config": cfg_dict, "config_hash": config_hash(_resume_key(cfg_dict)),
                "arch": arch_signature(cfg.model), "store_content_hash": store.header.get("content_hash"),
            }, path)
        D.barrier()

    # ---- loop -----------------------------------------------------------------------------
    warmup_steps = int(cfg.optim.warmup_epochs * steps_per_epoch)
    t_start = time.monotonic()
    loss_value = float("nan")
    metrics = open(run_dir / "metrics.jsonl", "a") if dinfo.is_main else None
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        train_set.set_epoch(epoch)
        base_sampler.set_epoch(epoch)
        loader = DataLoader(
            train_set, batch_size=per_rank_batch, sampler=SkipSampler(base_sampler, in_epoch * per_rank_batch),
            num_workers=cfg.data.workers, pin_memory=dinfo.device.type == "cuda", drop_last=True,
            persistent_workers=False, multiprocessing_context="fork" if cfg.data.workers else None)
        model.train()
        for batch in loader:
            x, y = flatten_clips(batch) if cfg.task == "prp" else batch
            x = x.to(dinfo.device, non_blocking=True)
            y = y.to(dinfo.device, non_blocking=True)
            lr = lr_at(step, total_steps if cfg.max_steps is None else steps_per_epoch * cfg.optim.epochs,
                       warmup_steps, peak_lr, cfg.optim.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with amp:
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            step += 1
            loss_value = float(D.all_reduce_mean(loss.detach()))
            if metrics and (step % cfg.log_every == 0 or step % steps_per_epoch == 0 or step == total_steps):
                acc = float((logits.argmax(1) == y).float().mean())
                metrics.write(json.dumps({"kind": "train", "epoch": step / steps_per_epoch, "step": step,
                                          "loss": loss_value, "acc": acc, "lr": lr,
                                          "time": round(time.monotonic() - t_start, 3)}) + "\n")
                metrics.flush()
            if step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0:
                save(last)
            if step >= total_steps:
                break
        if cfg.task == "finetune" and cfg.eval_every and (step // steps_per_epoch) % cfg.eval_every == 0 \
                and step < total_steps and dinfo.is_main:
            res = evaluate_model(_unwrap(model), store, cfg, dinfo.device)
            metrics.write(json.dumps({"kind": "eval", "epoch": step / steps_per_epoch, "step": step,  # type: ignore[union-attr]
                                      "top1": res.top1, "top5": res.top5}) + "\n")
    save(last)
    save(ckpt_dir / "final.pt")

    # ---- evaluation and summary ----------------------------------------------------------
    result = RunResult(run_dir, step, loss_value)
    if dinfo.is_main:
        summary: dict[str, Any] = {"name": cfg.name or run_dir.name, "task": cfg.task, "epochs": cfg.optim.epochs,
                                   "steps": step, "seconds": round(time.monotonic() - t_start, 2),
                                   "final_loss": loss_value}
        if cfg.task == "finetune":
            from train.plots import plot_confusion

            res = evaluate_model(_unwrap(model), store, cfg, dinfo.device)
            (run_dir / "eval.json").write_text(json.dumps(res.to_json(), indent=2))
            metrics.write(json.dumps({"kind": "eval", "epoch": step / max(1, steps_per_epoch), "step": step,  # type: ignore[union-attr]
                                      "top1": res.top1, "top5": res.top5}) + "\n")
            plot_confusion(res, run_dir / "confusion.png")
            summary.update(top1=res.top1, top5=res.top5)
            result.top1, result.top5 = res.top1, res.top5
        metrics.close()  # type: ignore[union-attr]
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        from train.plots import plot_curves

        plot_curves(run_dir)
    D.teardown()
    return result


@torch.no_grad()
def evaluate_model(model: VideoModel, store: FeatureStore, cfg: TrainConfig, device: torch.device) -> Any:
    """Multi-view test: logits of every view (num_clips x spatial views) averaged per video."""
    from train.metrics import evaluate_logits

    ds = TestViewDataset(store, cfg.data.test_split, cfg.test)
    loader = DataLoader(ds, batch_size=8, num_workers=0)
    was_training = model.training
    model.eval()
    all_logits, all_targets = [], []
    for x, y in loader:  # x: (B, V, T, H, W, C)
        b, v = x.shape[:2]
        logits = model(x.flatten(0, 1).to(device)).float().reshape(b, v, -1).mean(1)
        all_logits.append(logits.cpu())
        all_targets.append(y)
    model.train(was_training)
    names = [None] * cfg.model.num_classes
    for vid in store.video_ids:
        e = store.meta(vid)
        if e.label is not None and e.label < len(names):
            names[e.label] = e.label_name
    class_names = [n or str(i) for i, n in enumerate(names)]
    return evaluate_logits(torch.cat(all_logits), torch.cat(all_targets), class_names, views=cfg.test.num_clips)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
_RUNTIME_KEYS = ("device", "data.workers", "data.in_memory", "data.in_memory_max_gb", "log_every",
                 "checkpoint_every", "run_dir", "name", "eval_every", "max_steps")


def _resume_key(cfg_dict: dict) -> dict:
    """The config minus runtime knobs: what must match to resume a run."""
    d = json.loads(json.dumps(cfg_dict))
    for key in _RUNTIME_KEYS:
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return d


def _config_diffs(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, as readable lines."""
    out = []
    for k in sorted(set(saved) | set(wanted)):
        a, b = saved.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diffs(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: run has {a!r}, this command asks {b!r}")
    return out


def _model_cfg_from(ckpt: dict):
    from pipeline.config import from_dict
    from train.models import ModelConfig

    return from_dict(ModelConfig, ckpt["config"]["model"])


def _truncate_metrics(path: Path, step: int, total_steps: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, and the final
    evaluation line (it is redone when the run ends), so that no line appears twice."""
    if not path.exists():
        return

    def keep_line(m: dict) -> bool:
        return m["step"] <= step and not (m["kind"] == "eval" and m["step"] >= total_steps)

    keep = [line for line in path.read_text().splitlines() if line.strip() and keep_line(json.loads(line))]
    path.write_text("".join(line + "\n" for line in keep))
