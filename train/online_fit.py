"""Online pre-training: a long-form pretext trained from a stream read once, in time order.

The twin of :func:`train.loop.fit` for sources that are not a store: clips come from an
:class:`train.online.OnlineClipStream` (decode + frozen backbone, or a store replayed as a
stream) through a bounded read-ahead FIFO (:class:`train.online.ClipFeed`); each incoming
batch gives one update, or ``updates_per_batch`` updates with a replay buffer (the incoming
batch, then batches drawn from the buffer). The task (``moco``, ``mfm``, ``distill``) builds
items from clips (``Task.online_item``) and does the rest exactly as in ``fit``.

Safe points: a checkpoint is written only after all updates of an incoming batch, with the
stream position after its last clip, the replay buffer, the task state (MoCo queue and key
encoder), optimiser and RNG. Rerunning the same command resumes there; frames before the
resumed clip are decoded again but never sent through the backbone. One process (no DDP).

Learning rate: linear warmup over ``warmup_steps``, then constant (a stream has no planned
length). Per-item randomness: ``np.random.default_rng((seed, step, i))``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import default_collate

from pipeline.config import config_hash, content_dict, runtime, to_dict
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.provenance import environment
from train import distributed as D
from train.config import TrainConfig, content_of
from train.loop import RunResult
from train.models import arch_signature
from train.online import ChunkFn, ClipFeed, OnlineClipStream, ReplayBuffer
from train.rundir import RunDir, load_checkpoint
from train.tasks import get_task

__all__ = ["OnlineConfig", "StreamInfo", "fit_online"]


@dataclass
class OnlineConfig:
    """How a stream feeds the trainer.

    Attributes:
        buffer: clips read ahead of the trainer (bounded FIFO; memory = buffer clips).
        replay: capacity of the replay buffer in clips (0: no replay).
        updates_per_batch: optimiser steps per incoming batch (the batch itself, then
            ``updates_per_batch - 1`` batches drawn from the replay buffer).
        warmup_steps: linear learning-rate warmup, then constant.
    """

    buffer: int = runtime(64)
    replay: int = 0
    updates_per_batch: int = 1
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be >= 1, got {self.updates_per_batch}")
        if self.updates_per_batch > 1 and self.replay < 1:
            raise ValueError("updates_per_batch > 1 draws from the replay buffer: set replay to its capacity (clips)")


@dataclass(frozen=True)
class StreamInfo:
    """What a task may ask of its data source when there is no store: the feature shape
    ``(H, W, C)`` and a description of the source (``path``)."""

    feature_shape: tuple[int, int, int]
    path: str


def fit_online(cfg: TrainConfig, video_ids: Sequence[str], chunks: ChunkFn, info: StreamInfo,
               online: OnlineConfig | None = None, console: Any = None) -> RunResult:
    """Train ``cfg.task`` on the clips of ``video_ids`` read from ``chunks`` in time order; resumable."""
    online = online or OnlineConfig()
    con = console or Console(stderr=True)
    dinfo = D.setup(cfg.device)
    if dinfo.world != 1:
        raise FreezeframeError("online training runs in one process (a stream is read once, in order); "
                               "start it without torchrun")
    run = RunDir(cfg.run_dir or f"runs/{cfg.name or cfg.task}-online")
    torch.manual_seed(cfg.seed)

    task = get_task(cfg.task)(cfg, info, dinfo.device)  # type: ignore[arg-type]
    if not hasattr(task, "online_item"):
        raise FreezeframeError(f"task {cfg.task!r} cannot train from a stream; use moco, mfm or distill")
    stream_cfg = task.options.stream
    if stream_cfg.order != "sequential":
        raise ConfigMismatchError(f"a stream is read in time order: set {task.section}.stream.order='sequential' "
                                  f"(got {stream_cfg.order!r}); random order needs a store")
    if stream_cfg.clip_seconds is not None or stream_cfg.stride_seconds is not None:
        raise ConfigMismatchError(f"give {task.section}.stream.clip_frames / stride_frames for a stream "
                                  "(the frame rate is the source's --fps)")
    task.preflight()
    getattr(task, "online_preflight", lambda: None)()
    if info.feature_shape[2] != cfg.model.tmm.in_channels and cfg.model.channel_pool is None:
        raise ConfigMismatchError(f"the source gives C={info.feature_shape[2]} channels but model.tmm.in_channels="
                                  f"{cfg.model.tmm.in_channels}; set model.tmm.in_channels={info.feature_shape[2]}")

    model: nn.Module = task.build().to(dinfo.device)
    batch_size = cfg.optim.batch_size
    peak_lr = cfg.optim.base_lr * batch_size / 64
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)

    content = {**content_of(cfg), "online": content_dict(online), "videos": list(video_ids)}
    cfg_dict = {**to_dict(cfg), "online": to_dict(online), "videos": list(video_ids)}
    step, clips_seen, position = 0, 0, None
    replay = ReplayBuffer(online.replay, seed=cfg.seed) if online.replay else None
    state = run.resume_state(content)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        task.load_state_dict(state["task"])
        step, clips_seen, position = int(state["step"]), int(state["clips"]), state["stream"]
        if replay is not None:
            replay.load_state_dict(state["replay"])
        con.log(f"resuming {run.path} at step {step} ({clips_seen} clips read)")
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg_dict)
    run.write_provenance({"source": info.path, "environment": environment(), "device": str(dinfo.device),
                          "peak_lr": peak_lr, "online": to_dict(online)})
    run.truncate_metrics(step, step + 1)

    def checkpoint() -> None:
        run.save_checkpoint(run.last, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "clips": clips_seen,
            "stream": position, "replay": replay.state_dict() if replay is not None else None,
            "torch_rng": torch.get_rng_state(), "task": task.state_dict(), "config": cfg_dict, "content": content,
            "config_hash": config_hash(content), "arch": arch_signature(cfg.model)})

    stream = OnlineClipStream(video_ids, chunks, stream_cfg.clip_frames, stride_frames=stream_cfg.stride_frames,
                              last_clip=stream_cfg.last_clip, streams=stream_cfg.streams, position=position)
    t0 = time.monotonic()
    loss_value = float("nan")
    saved_at = step
    metrics = run.open_metrics()
    model.train()
    with ClipFeed(stream, batch_size, online.buffer) as feed:
        for clips in feed.batches():
            if len(clips) < min(2, batch_size):  # BatchNorm needs 2 clips: a last lone clip is skipped
                position = clips[-1].after
                continue
            groups = [clips]
            if replay is not None:
                replay.add(clips)
                groups += [replay.draw(batch_size, step + u) for u in range(1, online.updates_per_batch)]
            for group in groups:
                items = [task.online_item(c, np.random.default_rng((cfg.seed, step, i))) for i, c in enumerate(group)]
                batch = {k: (v.to(dinfo.device) if isinstance(v, torch.Tensor) else v)
                         for k, v in default_collate(items).items()}
                lr = peak_lr * min(1.0, (step + 1) / online.warmup_steps) if online.warmup_steps else peak_lr
                for g in opt.param_groups:
                    g["lr"] = lr
                out = task.step(model, batch)
                opt.zero_grad(set_to_none=True)
                out["loss"].backward()
                if cfg.optim.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                opt.step()
                step += 1
                task.after_step(model, step)
                loss_value = float(out["loss"].detach())
                if step % cfg.log_every == 0:
                    metrics.write({"kind": "train", "step": step, "loss": loss_value,
                                   **{k: float(v) for k, v in out.items() if k != "loss"}, "lr": lr,
                                   "clips": clips_seen + len(clips), "frames_per_s": round(feed.frames_per_s, 2),
                                   "time": round(time.monotonic() - t0, 3)})
            clips_seen += len(clips)
            position = clips[-1].after
            if step - saved_at >= cfg.checkpoint_every:  # a safe point: every update of this batch is done
                checkpoint()
                saved_at = step
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    checkpoint()
    run.save_checkpoint(run.final, load_checkpoint(run.last))
    metrics.close()
    run.write_summary({"name": cfg.name or run.path.name, "task": cfg.task, "online": True, "steps": step,
                       "clips": clips_seen, "seconds": round(time.monotonic() - t0, 2), "final_loss": loss_value,
                       "frames_per_s": round(feed.frames_per_s, 2)})
    D.teardown()
    return RunResult(run.path, step, loss_value)
