"""``make bench-train``: PRP training steps/s on cached features vs the backbone in the loop.

The claim: once features are cached, a PRP training step costs only the TMM, so training is
faster than the released AdViSe regime (every step decodes the sampled frames with PyAV and
runs the frozen image model before training the TMM) by about the compute ratio

    FLOPs(backbone forward on a clip's T frames + TMM/head forward+backward) / FLOPs(TMM/head fwd+bwd)

(counted with ``torch.utils.flop_counter.FlopCounterMode`` on one clip; the backbone is frozen,
so forward only). Target: measured speedup >= 0.7 x compute ratio, i.e. reading the cache does
not eat the gain.

Per backbone, in one run, with the same TMM + head, AdamW, PRP sampling (``train.sampling
.prp_clips``), batch (``--batch`` videos x ``clips_per_video`` clips) and geometry:

* a store is extracted with ``extract.runner.run_extract`` (float16) from the inputs: the 7
  real clips of ``../shared/media`` when present (else synthetic videos), cut to their first
  ``--seconds`` s and decoded at ``--fps``;
* **cached-zarr**: ``train.data.PRPDataset`` over ``open_store(in_memory=False)`` (zarr reads,
  the large-store case), DataLoader with ``DataConfig().workers`` workers, TMM train step;
* **cached-ram**: the same over the store loaded into RAM;
* **online**: a map-style dataset decodes, for each video, only the frames its PRP clips need
  with ``extract.source.OnlineFeatureSource.frames`` (the store's fps, segment and geometry,
  read from the store header; streaming), same workers; the main loop runs the frozen backbone under
  ``torch.inference_mode()`` on all ``B x K x T`` clip frames (as the released code does: no
  de-duplication across clips) and then the same TMM train step.

Both regimes draw the same videos in the same order and, per item, the same clips (item rng
``(seed, epoch, video)`` as ``PRPDataset``), so they train on the same frames; the online child
checks that its features match the stored ones (cosine).

Each regime runs in its own fresh child process (forkserver; its peak memory is its own): 1 warm-up
step, then up to ``--steps`` timed steps (stopping early once ``--budget`` s have passed, but
never before ``--min-steps``). Reported per child: ``ru_maxrss`` of the child (RUSAGE_SELF) and
of its largest loader worker (RUSAGE_CHILDREN: the maximum over waited-for children, not a
sum; forked workers share pages with the parent, so the two overlap), and
``torch.cuda.max_memory_allocated`` on CUDA. The cached children also measure the loader alone
(clips/s with the default workers, no training) and the TMM step alone on a pre-built batch
(the clips/s training consumes): the loader must outpace the TMM.

Usage: ``python -m bench.train [--backbones mobilenetv2-imagenet clip-vit-b16] [--steps N]
[--quick] [--out FILE.json]``
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from extract.config import ExtractConfig
from extract.encode import build_backbone
from extract.source import OnlineFeatureSource
from pipeline.errors import ConfigMismatchError, FreezeframeError
from bench.inputs import have_media, media_rows, synthetic_rows
from bench.loader import QUICK_LOADER, LoaderBench, print_loader
from bench.loader import measure as measure_loader
from pipeline.manifest import ManifestRow, read_manifest, write_manifest
from pipeline.registry import Registry
from train.config import DataConfig, OptimConfig
from train.data import collate, to_model_dtype
from train.models import ModelConfig, TMMConfig
from train.sampling import PRPConfig

# ``python -m bench.train``: a child re-runs this module as ``__mp_main__`` while the forkserver
# has already imported it as ``bench.train``; runpy warns about that, harmlessly.
warnings.filterwarnings("ignore", message=r".*'bench\.train' found in sys\.modules", category=RuntimeWarning)
TARGET_FRACTION = 0.7  # measured speedup must reach this fraction of the compute ratio


class BenchError(FreezeframeError):
    """The benchmark cannot run as asked (a regime failed, inputs missing...)."""


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """What ``bench.train`` measures.

    backbones: registry names of ``extract.backbones.BACKBONES``.
    image_size: input side in px (CLIP runs at its native 224 only).
    fps: frames per second kept at extraction *and* decoded by the online regime.
    seconds: each video is cut to its first ``seconds`` s (None: whole video).
    max_videos: use at most this many input videos (None: all).
    input: ``auto`` (real clips if present, else synthetic), ``media`` or ``synthetic``.
    batch: videos per step (each gives ``prp.clips_per_video`` clips).
    steps: timed steps per measurement (after 1 warm-up step).
    min_steps: timed steps always done, whatever the budget.
    budget_s: a measurement stops after the step that crosses this many seconds.
    workers: DataLoader workers of every regime (default: ``DataConfig().workers``).
    hidden, out_channels, blocks, temporal_kernel, mlp_dim: the TMM + head (C_in = backbone
        channels); 256 / 512 / 1 / 3 = hidden width and block count of the paper's efficiency
        setting with the released yaml's C_out = 512.
    threads: torch intra-op threads in the children (None: torch's default).
    device: ``auto`` (cuda if available), ``cpu`` or ``cuda``.
    """

    backbones: tuple[str, ...] = ("mobilenetv2-imagenet", "clip-vit-b16")
    image_size: int = 224
    fps: float = 4.0
    seconds: float | None = 4.0
    max_videos: int | None = None
    input: str = "auto"
    batch: int = 2
    steps: int = 10
    min_steps: int = 2
    budget_s: float = 10.0
    workers: int = field(default_factory=lambda: DataConfig().workers)
    prp: PRPConfig = field(default_factory=PRPConfig)
    hidden: int = 256
    out_channels: int = 512
    blocks: int = 1
    temporal_kernel: int = 3
    mlp_dim: int = 1024
    threads: int | None = None
    device: str = "auto"
    seed: int = 0
    loader: LoaderBench = field(default_factory=LoaderBench)  # the loader vs decompression part (bench/loader.py)


#: ``--quick``: a smoke run (tests): MobileNetV2 at 64 px, 2 videos of 2 s, 2 clips x 4 frames, 1 step.
QUICK = dict(backbones=("mobilenetv2-imagenet",), image_size=64, fps=4.0, seconds=2.0, max_videos=2,
             batch=2, steps=1, min_steps=1, budget_s=1.0, prp=PRPConfig(num_frames=4, clips_per_video=2),
             loader=LoaderBench(**QUICK_LOADER))


@dataclass(frozen=True)
class RegimeSpec:
    """Everything a regime's child process needs (picklable)."""

    regime: str
    store: str
    manifest: str
    backbone: str
    random_weights: bool
    image_size: int
    model: ModelConfig
    bench: BenchConfig
    measure_loader: bool = True
    measure_tmm: bool = True


def model_config(bench: BenchConfig, in_channels: int) -> ModelConfig:
    """The TMM + head of every regime: C_in = the backbone's channels."""
    return ModelConfig(arch="tmm", tmm=TMMConfig(in_channels=in_channels, hidden=bench.hidden,
                                                  out_channels=bench.out_channels, blocks=bench.blocks,
                                                  temporal_kernel=bench.temporal_kernel),
                       mlp_dim=bench.mlp_dim, num_classes=len(bench.prp.rates))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
INPUTS: Registry[Callable[[Path], tuple[str, list[ManifestRow]]]] = Registry("benchmark input")
INPUTS.add("media", lambda tmp: ("real clips (../shared/media)", media_rows()))
INPUTS.add("synthetic", lambda tmp: ("synthetic 128x128", synthetic_rows(tmp, train_per_class=2)))
INPUTS.add("auto", lambda tmp: INPUTS.get("media" if have_media()
                                          else "synthetic")(tmp))


def bench_rows(cfg: BenchConfig, tmp: Path) -> tuple[str, list[ManifestRow]]:
    """The input videos as manifest rows, cut to ``[0, cfg.seconds)``."""
    label, rows = INPUTS.get(cfg.input)(tmp)
    if not rows:
        raise BenchError(f"no input videos for --input {cfg.input}; use --input synthetic")
    rows = rows[: cfg.max_videos] if cfg.max_videos else rows
    return label, [replace(r, split="train", start=None, end=cfg.seconds) for r in rows]


# --------------------------------------------------------------------------------------
# datasets (both regimes draw the same clips for the same virtual index)
# --------------------------------------------------------------------------------------
class OnlineFramesDataset(Dataset):
    """The released regime's data side: decode a video, keep its PRP clips' frames.

    Item ``i`` is video ``i`` of ``video_ids``: its clips are drawn exactly as ``PRPDataset``
    draws them (``prp_clips(length, default_rng((seed, epoch, i)), prp)``), then only the
    needed frames are decoded by ``source.frames`` (the store's geometry, fps and segment,
    streaming, stopping after the last one). Returns ``(frames (K, T, S, S, 3) uint8, rate
    labels (K,) int64)``; the backbone runs in the main loop (``source.encode``). ``lengths``:
    stored frames per video (what the released code reads from the container; taken from the
    store so both regimes sample the same indices).
    """

    def __init__(self, source: OnlineFeatureSource, video_ids: Sequence[str], lengths: Sequence[int],
                 prp: PRPConfig, seed: int) -> None:
        self.source, self.video_ids, self.lengths = source, list(video_ids), [int(n) for n in lengths]
        self.prp, self.seed = prp, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from train.sampling import prp_clips

        rng = np.random.default_rng((self.seed, self.epoch, index))
        clips = prp_clips(self.lengths[index], rng, self.prp)
        idx = np.stack([c.indices for c in clips])  # (K, T) frame indices
        try:
            frames = self.source.frames(self.video_ids[index], idx.reshape(-1))
        except IndexError as e:
            raise BenchError(f"{e}: the online regime must decode with the store's fps/segment") from e
        labels = np.array([c.rate_label for c in clips], dtype=np.int64)
        return torch.from_numpy(frames.reshape(*idx.shape, *frames.shape[1:])), torch.from_numpy(labels)


class EpochIndexed(Dataset):
    """Virtual index ``e * n + v`` -> item ``v`` of ``base`` at epoch ``e`` (so repeated videos
    get fresh clips). ``base`` has ``epoch`` and ``__getitem__`` like ``PRPDataset``."""

    def __init__(self, base: Any) -> None:
        self.base, self.n = base, len(base)

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> Any:
        self.base.epoch = index // self.n
        return self.base[index % self.n]


def virtual_order(n_videos: int, batch: int, n_batches: int, seed: int) -> list[int]:
    """Virtual indices for ``n_batches`` batches: a seeded permutation of the videos per epoch."""
    rng = np.random.default_rng((seed, 12345))
    out: list[int] = []
    epoch = 0
    while len(out) < batch * n_batches:
        out += [epoch * n_videos + int(v) for v in rng.permutation(n_videos)]
        epoch += 1
    return out[: batch * n_batches]


# --------------------------------------------------------------------------------------
# the train step (same in every regime)
# --------------------------------------------------------------------------------------
class TrainStep:
    """One PRP optimisation step of the TMM + head: ``(B*K, T, H, W, C)`` float features,
    ``(B*K,)`` rate labels. AdamW and the loss as in ``train.engine``."""

    def __init__(self, model_cfg: ModelConfig, batch_videos: int, device: torch.device, seed: int) -> None:
        from train.models import build_model

        torch.manual_seed(seed)
        optim = OptimConfig()
        self.device = device
        self.model = build_model(model_cfg).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=optim.base_lr * batch_videos / 64,
                                     betas=optim.betas, weight_decay=optim.weight_decay)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=optim.label_smoothing)
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.amp:
            logits = self.model(x)
            loss = self.loss_fn(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Accumulates named wall-clock parts (seconds), synchronising CUDA around each part."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.parts = device, {}

    def part(self, name: str) -> "_Part":
        return _Part(self, name)


class _Part:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        _sync(self.timer.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        _sync(self.timer.device)
        self.timer.parts[self.name] = self.timer.parts.get(self.name, 0.0) + time.perf_counter() - self.t0


def timed_loop(step: Callable[[int], None], bench: BenchConfig) -> tuple[int, float]:
    """Run ``step(k)`` for k = 0 (warm-up, untimed), 1, 2, ...; returns (timed steps, seconds)."""
    step(0)
    t0 = time.perf_counter()
    n = 0
    while n < bench.steps:
        step(n + 1)
        n += 1
        if n >= bench.min_steps and time.perf_counter() - t0 > bench.budget_s:
            break
    return n, time.perf_counter() - t0


PREFETCH_FACTOR = 2  # DataLoader's default: batches in flight per worker


def _loader(ds: Dataset, order: list[int], bench: BenchConfig, device: torch.device) -> DataLoader:
    """The DataLoader of every regime, configured as ``train.engine`` configures its own."""
    return DataLoader(ds, batch_size=bench.batch, sampler=order, num_workers=bench.workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False,
                      multiprocessing_context="fork" if bench.workers else None,
                      prefetch_factor=PREFETCH_FACTOR if bench.workers else None)


LOADER_MIN_SECONDS = 1.0  # a fast loader is timed over at least this long (or the budget)
LOADER_MAX_BATCHES = 2000


def loader_only(ds: Dataset, bench: BenchConfig, n_videos: int, device: torch.device, seed: int) -> dict:
    """Clips/s of a fresh DataLoader alone (default workers, no training).

    Warm-up (untimed): the first ``workers x prefetch_factor`` batches, which the workers start
    together and which then sit ready in the queue; after them every batch is waited for as it
    is produced (steady state). Timed: at least ``bench.steps`` batches and
    ``min(LOADER_MIN_SECONDS, budget)`` s, at most the budget (and ``bench.min_steps`` batches).
    """
    skip = max(1, bench.workers * PREFETCH_FACTOR)
    it = iter(_loader(ds, virtual_order(n_videos, bench.batch, skip + LOADER_MAX_BATCHES, seed), bench, device))
    for _ in range(skip):
        next(it)
    min_s = min(LOADER_MIN_SECONDS, bench.budget_s)
    t0 = time.perf_counter()
    n = 0
    while n < LOADER_MAX_BATCHES:
        next(it)
        n += 1
        elapsed = time.perf_counter() - t0
        if (elapsed > bench.budget_s and n >= bench.min_steps) or (n >= bench.steps and elapsed >= min_s):
            break
    secs = time.perf_counter() - t0
    del it
    clips = n * bench.batch * bench.prp.clips_per_video
    return {"steps": n, "seconds": secs, "clips_per_s": clips / secs}


# --------------------------------------------------------------------------------------
# regimes (each runs in its own child process)
# --------------------------------------------------------------------------------------
Regime = Callable[[RegimeSpec, torch.device], dict]
REGIMES: Registry[Regime] = Registry("training regime")


def _run_cached(spec: RegimeSpec, device: torch.device, *, in_memory: bool) -> dict:
    from pipeline.store import open_store
    from train.data import PRPDataset, flatten_clips

    bench = spec.bench
    store = open_store(spec.store, in_memory=in_memory)
    base = PRPDataset(store, "train", bench.prp, bench.seed)
    ds = EpochIndexed(base)
    n_videos = len(base)
    train_step = TrainStep(spec.model, bench.batch, device, bench.seed)
    timer = Timer(device)
    it = iter(_loader(ds, virtual_order(n_videos, bench.batch, bench.steps + 1, bench.seed), bench, device))
    losses: list[float] = []
    first: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(k: int) -> None:
        with timer.part("data_wait"):
            x, y = flatten_clips(next(it))
            if not first:
                first.append((x, y))
            x, y = to_model_dtype(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)  # as train.loop
        with timer.part("tmm_step"):
            losses.append(float(train_step(x, y)))
        if k == 0:
            timer.parts.clear()  # the warm-up step is not timed

    n, secs = timed_loop(step, bench)
    del it
    out: dict[str, Any] = {"steps": n, "seconds": secs, "steps_per_s": n / secs,
                           "seconds_per_step": {k: v / n for k, v in timer.parts.items()},
                           "final_loss": losses[-1]}
    if spec.measure_loader:
        out["loader"] = loader_only(ds, bench, n_videos, device, bench.seed + 1)
    if spec.measure_tmm:
        x, y = (to_model_dtype(t.to(device)) for t in first[0])

        def tmm(_: int) -> None:
            train_step(x, y)
            _sync(device)

        m, s = timed_loop(tmm, bench)
        out["tmm_prebuilt"] = {"steps": m, "seconds": s, "steps_per_s": m / s,
                               "clips_per_s": m * len(y) / s}
    return out


def _run_online(spec: RegimeSpec, device: torch.device) -> dict:
    from pipeline.store import open_store

    bench = spec.bench
    store = open_store(spec.store)
    rows = read_manifest(spec.manifest)
    xcfg = ExtractConfig(backbone=spec.backbone, random_weights=spec.random_weights, image_size=spec.image_size)
    try:  # the backbone is built from the regime's spec and must compute the store's features
        source = OnlineFeatureSource.for_store(store, rows, backbone=build_backbone(xcfg), device=device)
    except ConfigMismatchError as e:
        raise BenchError(f"{e}; rerun the benchmark from scratch") from e
    backbone = source.backbone
    vids = store.split_ids("train")
    base = OnlineFramesDataset(source, vids, [store.num_frames(v) for v in vids], bench.prp, bench.seed)
    ds = EpochIndexed(base)
    train_step = TrainStep(spec.model, bench.batch, device, bench.seed)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    timer = Timer(device)
    it = iter(_loader(ds, virtual_order(len(base), bench.batch, bench.steps + 1, bench.seed), bench, device))
    losses: list[float] = []
    check: dict[str, float] = {}

    def step(k: int) -> None:
        with timer.part("data_wait"):
            frames, y = next(it)  # (B, K, T, S, S, 3) uint8, (B, K)
            b, kc, t = frames.shape[:3]
            x = frames.reshape(-1, *frames.shape[3:]).to(device, non_blocking=True)
            y = y.flatten().to(device, non_blocking=True)
        with timer.part("backbone"):
            with torch.inference_mode(), amp:
                feats = backbone(backbone.prepare(x))  # (B*K*T, H, W, C), frozen
            # (B*K, T, H, W, C); cloned out of inference mode so autograd may save it
            feats = feats.float().reshape(b * kc, t, *feats.shape[1:]).clone()
        with timer.part("tmm_step"):
            losses.append(float(train_step(feats, y)))
        if k == 0:
            timer.parts.clear()
            check.update(_match_store(store, len(base), feats.cpu(), bench))

    n, secs = timed_loop(step, bench)
    del it
    out: dict[str, Any] = {"steps": n, "seconds": secs, "steps_per_s": n / secs,
                           "seconds_per_step": {k: v / n for k, v in timer.parts.items()},
                           "final_loss": losses[-1], "store_match": check}
    if spec.measure_loader:
        out["loader"] = loader_only(ds, bench, len(base), device, bench.seed + 1)
    return out


def _match_store(store: Any, n_videos: int, feats: torch.Tensor, bench: BenchConfig) -> dict[str, float]:
    """Cosine between the online features of the warm-up batch and the stored ones (same items)."""
    from train.data import PRPDataset, flatten_clips

    cached = EpochIndexed(PRPDataset(store, "train", bench.prp, bench.seed))
    order = virtual_order(n_videos, bench.batch, 1, bench.seed)
    x, _ = flatten_clips(tuple(torch.stack(t) for t in zip(*(cached[i] for i in order))))  # type: ignore[arg-type]
    a, b = feats.reshape(-1, feats.shape[-1]), x.reshape(-1, x.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


REGIMES.add("cached-zarr", lambda spec, device: _run_cached(spec, device, in_memory=False))
REGIMES.add("cached-ram", lambda spec, device: _run_cached(spec, device, in_memory=True))
REGIMES.add("online", _run_online)


def _child(spec: RegimeSpec, out_path: str) -> None:
    """Child process: run one regime, write its numbers (with peak memory) to ``out_path``."""
    try:
        device = resolve_device(spec.bench.device)
        if spec.bench.threads:
            torch.set_num_threads(spec.bench.threads)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res = REGIMES.get(spec.regime)(spec, device)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["loader_worker_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        res["torch_threads"] = torch.get_num_threads()
        Path(out_path).write_text(json.dumps(res))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        Path(out_path).write_text(json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))
        raise


def _context() -> Any:
    """A forkserver context that has imported torch and this module once: every regime child is
    a fresh process (own memory, no state of the parent) without paying the imports again."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "bench.train", "train.data", "train.models", "pipeline.store",
                                "extract.decode", "extract.encode", "extract.runner", "extract.source"])
    return ctx


def start_children_server() -> None:
    """Start the forkserver (and its imports) now, so that it overlaps with the extraction."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def run_regime(spec: RegimeSpec, tmp: Path) -> dict:
    """Run ``spec`` in a fresh child process and return its numbers (+ its wall time)."""
    out = tmp / f"result-{spec.backbone}-{spec.regime}.json"
    ctx = _context()
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(spec, str(out)), daemon=False)
    proc.start()
    proc.join()
    res = json.loads(out.read_text()) if out.exists() else {}
    if proc.exitcode != 0 or "error" in res:
        raise BenchError(f"regime {spec.regime} of {spec.backbone} failed (exit code {proc.exitcode}): "
                         f"{res.get('error', 'no result')}\n{res.get('traceback', '')}")
    res["process_seconds"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------
# compute ratio
# --------------------------------------------------------------------------------------
def count_flops(backbone: Any, model_cfg: ModelConfig, num_frames: int) -> dict:
    """Training FLOPs of one clip of ``num_frames`` frames, counted with FlopCounterMode.

    Backbone: forward only (frozen), run with the MHA fast path off and the math SDPA kernel so
    attention is counted (same arithmetic; the fused kernels are invisible to the counter).
    TMM + head: forward + backward of the loss (in eval mode: BatchNorm1d needs > 1 sample in
    train mode, and BN is not counted either way).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from train.models import build_model
    from train.stats import tmm_stats_for_config

    s = backbone.preprocess.size
    frames = torch.randint(0, 256, (num_frames, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            feats = backbone(backbone.prepare(frames))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    bb = fc.get_total_flops()
    model = build_model(model_cfg).eval()
    x = feats.clone().unsqueeze(0)  # (1, T, H, W, C)
    with FlopCounterMode(display=False) as fwd:
        loss = nn.functional.cross_entropy(model(x), torch.zeros(1, dtype=torch.long))
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    tmm_fwd, tmm_bwd = fwd.get_total_flops(), bwd.get_total_flops()
    macs = tmm_stats_for_config(model_cfg, num_frames, tuple(feats.shape[1:3])).tmm_macs
    tmm = tmm_fwd + tmm_bwd
    return {"backbone_flops_per_clip": bb, "backbone_flops_per_frame": bb / num_frames,
            "tmm_fwd_flops_per_clip": tmm_fwd, "tmm_bwd_flops_per_clip": tmm_bwd,
            "tmm_train_flops_per_clip": tmm, "tmm_conv_macs_closed_form": macs,
            "compute_ratio": (bb + tmm) / tmm, "grid": list(feats.shape[1:])}


# --------------------------------------------------------------------------------------
# one backbone
# --------------------------------------------------------------------------------------
def bench_backbone(name: str, cfg: BenchConfig, manifest: Path, tmp: Path, log: Callable[[str], None]) -> dict:
    from extract.encode import build_backbone
    from extract.runner import run_extract
    from extract.weights import mobilenet_checkpoint

    real = name == "mobilenetv2-imagenet" and mobilenet_checkpoint() is not None
    xcfg = ExtractConfig(manifest=str(manifest), store=str(tmp / f"{name}.zarr"), backbone=name,
                         random_weights=not real, image_size=cfg.image_size, fps=cfg.fps, dtype="float16",
                         progress=False, workers=1)
    t0 = time.perf_counter()
    summary = run_extract(xcfg)
    extract_s = time.perf_counter() - t0
    if summary.failures:
        raise BenchError(f"extraction failed for {[f.video_id for f in summary.failures]}: {summary.failures[0].message}")
    store_bytes = sum(p.stat().st_size for p in Path(xcfg.store).rglob("*") if p.is_file())
    log(f"[{name}] store: {summary.videos_done} videos, {summary.frames_done} frames in {extract_s:.1f} s "
        f"({store_bytes / 2**20:.1f} MiB)")
    backbone = build_backbone(xcfg)
    mcfg = model_config(cfg, backbone.channels)
    flops = count_flops(backbone, mcfg, cfg.prp.num_frames)
    del backbone
    log(f"[{name}] FLOPs per clip: backbone {flops['backbone_flops_per_clip'] / 1e9:.2f} G, TMM+head train "
        f"{flops['tmm_train_flops_per_clip'] / 1e9:.2f} G -> compute ratio {flops['compute_ratio']:.2f}")
    res: dict[str, Any] = {"backbone": name, "weights": "real (cache)" if real else "random",
                           "store": {"videos": summary.videos_done, "frames": summary.frames_done,
                                     "bytes": store_bytes, "extract_seconds": extract_s},
                           "model": asdict(mcfg), "flops": flops, "regimes": {}}
    for regime in ("cached-zarr", "cached-ram", "online"):
        spec = RegimeSpec(regime=regime, store=xcfg.store, manifest=str(manifest), backbone=name,
                          random_weights=not real, image_size=cfg.image_size, model=mcfg, bench=cfg,
                          measure_tmm=regime == "cached-ram")
        r = run_regime(spec, tmp)
        res["regimes"][regime] = r
        extra = f", loader alone {r['loader']['clips_per_s']:.1f} clips/s" if "loader" in r else ""
        log(f"[{name}] {regime}: {r['steps_per_s']:.3f} steps/s over {r['steps']} steps, "
            f"peak RSS {r['peak_rss_mb']:.0f} MiB{extra} ({r['process_seconds']:.0f} s)")
    reg = res["regimes"]
    online = reg["online"]["steps_per_s"]
    ratio = flops["compute_ratio"]
    res["speedup"] = {k: reg[k]["steps_per_s"] / online for k in ("cached-zarr", "cached-ram")}
    res["speedup_over_compute_ratio"] = {k: v / ratio for k, v in res["speedup"].items()}
    res["target_met"] = res["speedup_over_compute_ratio"]["cached-zarr"] >= TARGET_FRACTION
    clips = cfg.batch * cfg.prp.clips_per_video
    for r in reg.values():  # achieved FLOP rates of each part of a step
        parts = r["seconds_per_step"]
        r["gflops_per_s"] = {"tmm_step": flops["tmm_train_flops_per_clip"] * clips / parts["tmm_step"] / 1e9}
        if "backbone" in parts:
            r["gflops_per_s"]["backbone"] = flops["backbone_flops_per_clip"] * clips / parts["backbone"] / 1e9
    tmm_cps = reg["cached-ram"]["tmm_prebuilt"]["clips_per_s"]
    res["loader_vs_tmm"] = {k: reg[k]["loader"]["clips_per_s"] / tmm_cps for k in ("cached-zarr", "cached-ram")}
    shutil.rmtree(xcfg.store, ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def print_tables(results: dict, console: Any) -> None:
    from rich.table import Table

    t = Table(title="PRP training: cached features vs backbone in the loop (steps/s, higher is better)")
    for col in ("backbone", "cached zarr", "cached RAM", "online", "speedup zarr / RAM", "compute ratio",
                "speedup / ratio (zarr / RAM)", f">= {TARGET_FRACTION}"):
        t.add_column(col, justify="right" if col != "backbone" else "left")
    for r in results["backbones"]:
        g = r["regimes"]
        t.add_row(r["backbone"], f"{g['cached-zarr']['steps_per_s']:.3f}", f"{g['cached-ram']['steps_per_s']:.3f}",
                  f"{g['online']['steps_per_s']:.4f}",
                  f"{r['speedup']['cached-zarr']:.1f}x / {r['speedup']['cached-ram']:.1f}x",
                  f"{r['flops']['compute_ratio']:.1f}x",
                  f"{r['speedup_over_compute_ratio']['cached-zarr']:.2f} / {r['speedup_over_compute_ratio']['cached-ram']:.2f}",
                  "yes" if r["target_met"] else "NO")
    console.print(t)

    m = Table(title="Peak memory (MiB; child = ru_maxrss of the regime's process, worker = largest loader worker)")
    for col in ("backbone", "zarr child / worker", "RAM child / worker", "online child / worker", "CUDA peak (zarr/RAM/online)"):
        m.add_column(col, justify="right" if col != "backbone" else "left")
    for r in results["backbones"]:
        g = r["regimes"]

        def mem(k: str) -> str:
            return f"{g[k]['peak_rss_mb']:.0f} / {g[k]['loader_worker_peak_rss_mb']:.0f}"

        cuda = "/".join("-" if g[k]["cuda_peak_mb"] is None else f"{g[k]['cuda_peak_mb']:.0f}"
                        for k in ("cached-zarr", "cached-ram", "online"))
        m.add_row(r["backbone"], mem("cached-zarr"), mem("cached-ram"), mem("online"), cuda)
    console.print(m)

    lt = Table(title=f"Loader alone ({results['config']['workers']} workers) vs what the TMM step consumes (clips/s)")
    for col in ("backbone", "loader zarr", "loader RAM", "TMM step (pre-built batch)", "loader / TMM (zarr / RAM)",
                "online decode loader"):
        lt.add_column(col, justify="right" if col != "backbone" else "left")
    for r in results["backbones"]:
        g = r["regimes"]
        lt.add_row(r["backbone"], f"{g['cached-zarr']['loader']['clips_per_s']:.1f}",
                   f"{g['cached-ram']['loader']['clips_per_s']:.1f}",
                   f"{g['cached-ram']['tmm_prebuilt']['clips_per_s']:.1f}",
                   f"{r['loader_vs_tmm']['cached-zarr']:.1f}x / {r['loader_vs_tmm']['cached-ram']:.1f}x",
                   f"{g['online']['loader']['clips_per_s']:.1f}")
    console.print(lt)

    bt = Table(title="Where a step's time goes (seconds per timed step; achieved GFLOP/s in brackets)")
    for col in ("backbone", "regime", "data wait", "backbone fwd", "TMM step", "total"):
        bt.add_column(col, justify="right" if col not in ("backbone", "regime") else "left")
    for r in results["backbones"]:
        for k, g in r["regimes"].items():
            p, rate = g["seconds_per_step"], g["gflops_per_s"]
            bt.add_row(r["backbone"], k, f"{p.get('data_wait', 0):.3f}",
                       f"{p['backbone']:.3f} ({rate['backbone']:.0f})" if "backbone" in p else "-",
                       f"{p['tmm_step']:.3f} ({rate['tmm_step']:.0f})", f"{1 / g['steps_per_s']:.3f}")
    console.print(bt)


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole benchmark; returns the JSON-ready results."""
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="ff-bench-train-"))
    try:
        start_children_server()
        label, rows = bench_rows(cfg, tmp)
        manifest = write_manifest(rows, tmp / "inputs.jsonl")
        device = resolve_device(cfg.device)
        log(f"inputs: {label}, {len(rows)} videos, first {cfg.seconds} s at {cfg.fps} fps, {cfg.image_size} px; "
            f"batch {cfg.batch} videos x {cfg.prp.clips_per_video} clips x {cfg.prp.num_frames} frames; "
            f"device {device}, {cfg.workers} loader workers")
        results: dict[str, Any] = {"config": json.loads(json.dumps(asdict(cfg))), "inputs": label,
                                   "videos": len(rows), "device": str(device), "cpu_count": os.cpu_count(),
                                   "torch_threads": torch.get_num_threads(), "backbones": []}
        for name in cfg.backbones:
            results["backbones"].append(bench_backbone(name, cfg, Path(manifest), tmp, log))
        results["loader"] = measure_loader(cfg.loader, tmp, log)
        results["wall_seconds"] = time.perf_counter() - t_start
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path | None]:
    d = BenchConfig()
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--backbones", nargs="+", default=None, help=f"default: {' '.join(d.backbones)}")
    ap.add_argument("--steps", type=int, default=None, help=f"timed steps per measurement (default {d.steps})")
    ap.add_argument("--min-steps", type=int, default=None, help=f"timed steps always run (default {d.min_steps})")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds after which a measurement stops (default {d.budget_s})")
    ap.add_argument("--batch", type=int, default=None, help=f"videos per step (default {d.batch})")
    ap.add_argument("--fps", type=float, default=None, help=f"decode/extraction fps (default {d.fps})")
    ap.add_argument("--seconds", type=float, default=None, help=f"first seconds of each video (default {d.seconds})")
    ap.add_argument("--videos", type=int, default=None, help="use at most this many videos")
    ap.add_argument("--input", choices=INPUTS.names(), default=None, help="input videos (default auto)")
    ap.add_argument("--image-size", type=int, default=None, help=f"default {d.image_size}")
    ap.add_argument("--workers", type=int, default=None, help=f"DataLoader workers (default {d.workers})")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the regime processes")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (tests)")
    ap.add_argument("--out", type=Path, default=None, help="write all numbers as JSON here")
    ap.add_argument("--loader-only", action="store_true",
                    help="only the loader vs decompression part (CLIP ViT-B/16 geometry, bench/loader.py)")
    a = ap.parse_args(argv)
    cfg = BenchConfig(**QUICK) if a.quick else d  # type: ignore[arg-type]
    if a.loader_only:
        cfg = replace(cfg, backbones=())
    given = {"backbones": tuple(a.backbones) if a.backbones else None, "steps": a.steps, "min_steps": a.min_steps,
             "budget_s": a.budget, "batch": a.batch, "fps": a.fps, "seconds": a.seconds, "max_videos": a.videos,
             "input": a.input, "image_size": a.image_size, "workers": a.workers, "threads": a.threads,
             "device": a.device}
    return replace(cfg, **{k: v for k, v in given.items() if v is not None}), a.out


def main(argv: Sequence[str] | None = None) -> None:
    from rich.console import Console

    cfg, out = parse_args(argv)
    con = Console() if sys.stdout.isatty() else Console(width=150)
    results = run(cfg, log=lambda s: con.log(s))
    if results["backbones"]:
        print_tables(results, con)
    print_loader(results["loader"], con)
    con.print(f"total {results['wall_seconds']:.0f} s")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    # run the importable module's main, so that the children unpickle ``bench.train._child``
    from bench.train import main as _main

    _main()
