"""``python -m bench.cosettle``: Co-Settle training steps/s on cached tokens vs the released regime.

The claim: with A, B and the PEA return view A' read from the store, a Co-Settle step costs
only the projection g (forward + backward) and the loss, so it is faster than the released
regime (every step runs the frozen encoder on the decoded frames: A and A' through
``forward_encoder_asy``, B through ``forward_encoder``, i.e. three image batches) by about the
compute ratio ``FLOPs(3 encoder forwards + g step) / FLOPs(g step)`` (counted with
``torch.utils.flop_counter.FlopCounterMode`` on one video). Target: measured speedup >= 0.7 x
that ratio, as for PRP.

One run, side by side, same machine state:

1. the inputs (the real clips of ``../shared/media``, first ``--seconds`` s at ``--fps``; else
   synthetic videos) are extracted twice with the random-weight CLIP ViT-B/16 at 224 px,
   float16: without PEA views and with ``--pea-views`` views: the **cost of PEA views** in
   extraction time and bytes;
2. **cached**: ``CosettleDataset`` (return view ``pea``) over the PEA store, DataLoader (each
   batch one gathered read of its A, B and A' rows, float16 as stored, cast to float32 in the
   step as the training loop does), g + AdamW + ``cosettle_loss``;
3. **released**: the same items (same ``(seed, epoch, index)`` draws: same t1, t2 and view
   offsets) from frames decoded once into RAM (decoding is not timed, which favours this
   regime); per step the frozen encoder runs on A, on A' with the PEA window and on B, then
   the same g step. Its first step also checks that its tokens equal the stored ones.

Usage: ``python -m bench.cosettle [--batch 8] [--out docs/bench-cosettle.json]`` (11 minutes on
the shared 2-core machine under a load of 9-13; most of it is the two CLIP extractions).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from bench.inputs import have_media, media_rows, synthetic_rows
from pipeline.manifest import ManifestRow, write_manifest

BACKBONE = "clip-vit-b16"
TARGET_FRACTION = 0.7


@dataclass
class CosettleBenchConfig:
    batch: int = 8  # videos per step, both regimes
    videos: int = 8
    seconds: float = 3.0
    fps: float = 2.5  # 7-8 frames per video: gap int(0.15 n) = 1
    pea_views: int = 1
    cached_steps: int = 30
    released_steps: int = 2
    workers: int = 0  # DataLoader workers of the cached regime: 0, see run_cached
    seed: int = 0


def bench_rows(cfg: CosettleBenchConfig, tmp: Path) -> list[ManifestRow]:
    """``cfg.videos`` segments of ``cfg.seconds`` s: the real clips (then their second segments)."""
    if have_media():
        clips = media_rows()
        rows = []
        for k in range(cfg.videos):
            clip, seg = clips[k % len(clips)], k // len(clips)
            rows.append(ManifestRow(f"{clip.video_id}-{seg}", clip.path, "train", start=seg * cfg.seconds,
                                    end=(seg + 1) * cfg.seconds))
        return rows
    return synthetic_rows(tmp, max(1, cfg.videos // 4))[: cfg.videos]


def _store_bytes(store: Path, names: Sequence[str]) -> int:
    return sum(p.stat().st_size for n in names for p in (store / "shards").glob(f"*/{n}/**/*") if p.is_file())


def run_extractions(cfg: CosettleBenchConfig, manifest: Path, tmp: Path, log: Callable[[str], None]) -> dict:
    """Extract without and with PEA views; seconds and bytes of each."""
    from extract.config import ExtractConfig
    from extract.runner import run_extract

    out: dict[str, Any] = {}
    for k in (0, cfg.pea_views):
        store = tmp / f"pea{k}.zarr"
        xcfg = ExtractConfig(manifest=str(manifest), store=str(store), backbone=BACKBONE, random_weights=True,
                             fps=cfg.fps, dtype="float16", pea_views=k, progress=False, batch_size=8)
        t0 = time.monotonic()
        summary = run_extract(xcfg)
        secs = time.monotonic() - t0
        feats = _store_bytes(store, ["features"])
        pea = _store_bytes(store, ["pea_features", "pea_offsets"])
        out[f"pea{k}"] = {"store": str(store), "seconds": secs, "frames": summary.frames_done,
                          "frames_per_s": summary.frames_done / secs, "feature_bytes": feats, "pea_bytes": pea,
                          "bytes_per_frame": (feats + pea) / max(1, summary.frames_done)}
        log(f"extraction with {k} PEA view(s): {summary.frames_done} frames in {secs:.1f} s, "
            f"{(feats + pea) / max(1, summary.frames_done):,.0f} bytes/frame")
    base, pea = out["pea0"], out[f"pea{cfg.pea_views}"]
    out["time_ratio"] = pea["seconds"] / base["seconds"]
    out["bytes_ratio"] = pea["bytes_per_frame"] / base["bytes_per_frame"]
    return out


class GStep:
    """The trainable part shared by both regimes: g, AdamW, the released loss."""

    def __init__(self, dim: int, seed: int) -> None:
        from train.models.projection import Projection

        self.g = Projection(dim, "linear", "torch_default", generator=torch.Generator().manual_seed(seed))
        self.opt = torch.optim.AdamW(self.g.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def __call__(self, views: torch.Tensor) -> float:
        from train.losses import cosettle_loss

        out = cosettle_loss(views, self.g(views))
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        return float(out.loss.detach())


def timed(step: Callable[[int], None], steps: int) -> tuple[int, float]:
    step(0)  # warm-up, not timed
    t0 = time.monotonic()
    for k in range(1, steps + 1):
        step(k)
    return steps, time.monotonic() - t0


def run_cached(cfg: CosettleBenchConfig, store_path: str) -> dict:
    """Cached steps/s. ``workers=0`` by default: with 8 videos a batch is a whole epoch, so a
    worker cannot read ahead (each epoch's iterator waits for its first batch) and only adds
    its process hand-over; reading a batch costs ~8 ms in this process (docs/benchmarks.md)."""
    from pipeline.store import open_store
    from train.cosettle_data import CosettleDataset
    from train.data import collate, to_model_dtype

    store = open_store(store_path)
    ds = CosettleDataset(store, "train", "pea", seed=cfg.seed)
    g = GStep(store.feature_shape[2], cfg.seed)
    loader = DataLoader(ds, batch_size=cfg.batch, shuffle=True, drop_last=False, num_workers=cfg.workers,
                        collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed),
                        persistent_workers=cfg.workers > 0)
    it = iter(())
    epoch = 0
    wait = 0.0

    def step(k: int) -> None:
        nonlocal it, epoch, wait
        t = time.monotonic()
        try:
            views = next(it)["views"]
        except StopIteration:
            ds.set_epoch(epoch)
            epoch += 1
            it = iter(loader)
            views = next(it)["views"]
        views = to_model_dtype(views)  # float16 as stored -> float32, as the training loop does
        wait += (time.monotonic() - t) if k else 0.0  # the untimed warm-up step starts any worker
        g(views)

    n, secs = timed(step, cfg.cached_steps)
    return {"steps": n, "seconds": secs, "steps_per_s": n / secs, "data_wait_s_per_step": wait / n}


def decode_all(rows: Sequence[ManifestRow], store: Any) -> dict[str, np.ndarray]:
    """Every stored frame of every video, decoded with the store's geometry and fps (uint8)."""
    from extract.decode import Geometry, iter_frames

    content = store.content
    out = {}
    for r in rows:
        chunks = [c.frames for c in iter_frames(r.path, geometry=Geometry(**content["geometry"]), fps=content["fps"],
                                               start=r.start, end=r.end)]
        frames = np.concatenate(chunks)
        if len(frames) != store.num_frames(r.video_id):
            raise RuntimeError(f"{r.video_id}: decoded {len(frames)} frames, the store has "
                               f"{store.num_frames(r.video_id)}")
        out[r.video_id] = frames
    return out


def run_released(cfg: CosettleBenchConfig, store_path: str, rows: Sequence[ManifestRow]) -> dict:
    from extract.config import ExtractConfig
    from extract.encode import build_backbone
    from extract.pea import pea_forward
    from pipeline.store import open_store
    from train.cosettle_data import CosettleDataset

    store = open_store(store_path)
    pea = store.content["pea"]
    bb = build_backbone(ExtractConfig(backbone=BACKBONE, random_weights=True))
    frames = decode_all(rows, store)
    ds = CosettleDataset(store, "train", "pea", seed=cfg.seed)  # for the draws only (t1, t2, view)
    g = GStep(store.feature_shape[2], cfg.seed)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    check: dict[str, float] = {}

    def step(k: int) -> None:
        idx = [order[(k * cfg.batch + i) % len(order)] for i in range(cfg.batch)]
        x1, x2, offs = [], [], []
        for i in idx:
            vid = ds.video_ids[i]
            t, view = ds.draw(i)
            x1.append(frames[vid][t[0]])
            x2.append(frames[vid][t[1]])
            offs.append(store.pea_offsets(vid)[t[0], view])
        x1t, x2t = bb.prepare(np.stack(x1)), bb.prepare(np.stack(x2))
        with torch.inference_mode():
            a = bb(x1t)
            a_ret = pea_forward(bb, x1t, torch.as_tensor(np.stack(offs)), pea["ratio"])
            b = bb(x2t)
        views = torch.stack([a, b, a_ret], dim=1).clone()  # (B, 3, H, W, C), out of inference mode
        if k == 0:
            stored = torch.stack([ds[i]["views"] for i in idx]).float()
            cos = torch.nn.functional.cosine_similarity(views.flatten(0, 3), stored.flatten(0, 3), dim=-1)
            check.update(min_cos=float(cos.min()), mean_cos=float(cos.mean()))
        g(views)

    n, secs = timed(step, cfg.released_steps)
    return {"steps": n, "seconds": secs, "steps_per_s": n / secs, "store_match": check}


def count_flops(dim: int, grid: tuple[int, int]) -> dict:
    """FLOPs of one video's step: g forward+backward+loss on 3 views, and 3 encoder forwards."""
    from extract.config import ExtractConfig
    from extract.encode import build_backbone
    from extract.pea import pea_forward

    g = GStep(dim, 0)
    views = torch.randn(1, 3, *grid, dim)
    with FlopCounterMode(display=False) as fc:
        g(views)
    g_flops = fc.get_total_flops()
    bb = build_backbone(ExtractConfig(backbone=BACKBONE, random_weights=True))
    x = torch.randn(1, 3, bb.preprocess.size, bb.preprocess.size)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        bb(x)
        pea_forward(bb, x, torch.zeros(1, 2, dtype=torch.long))
        bb(x)
    enc_flops = fc.get_total_flops()
    return {"g_step_flops": g_flops, "encoder_flops": enc_flops, "compute_ratio": (enc_flops + g_flops) / g_flops}


def run(cfg: CosettleBenchConfig, log: Callable[[str], None] = print) -> dict:
    from pipeline.heap import retain_freed_memory

    retain_freed_memory()  # as `freezeframe pretrain` does (train.loop.fit); both regimes run in this process
    torch.manual_seed(cfg.seed)
    tmp = Path(tempfile.mkdtemp(prefix="ff-bench-cosettle-"))
    try:
        rows = bench_rows(cfg, tmp)
        manifest = Path(write_manifest(rows, tmp / "inputs.jsonl"))
        t0 = time.monotonic()
        results: dict[str, Any] = {"config": asdict(cfg), "backbone": BACKBONE, "inputs": "media" if have_media()
                                   else "synthetic", "torch_threads": torch.get_num_threads()}
        results["extraction"] = ext = run_extractions(cfg, manifest, tmp, log)
        store = ext[f"pea{cfg.pea_views}"]["store"]
        results["cached"] = run_cached(cfg, store)
        log(f"cached: {results['cached']['steps_per_s']:.2f} steps/s")
        results["released"] = run_released(cfg, store, rows)
        log(f"released: {results['released']['steps_per_s']:.4f} steps/s, store match {results['released']['store_match']}")
        from pipeline.store import open_store

        s = open_store(store)
        results["flops"] = flops = count_flops(s.feature_shape[2], tuple(s.feature_shape[:2]))
        speedup = results["cached"]["steps_per_s"] / results["released"]["steps_per_s"]
        results["speedup"] = speedup
        results["speedup_over_compute_ratio"] = speedup / flops["compute_ratio"]
        results["target_met"] = results["speedup_over_compute_ratio"] >= TARGET_FRACTION
        results["seconds"] = time.monotonic() - t0
        log(f"speedup {speedup:.1f}x, compute ratio {flops['compute_ratio']:.1f}x, "
            f"speedup / ratio {results['speedup_over_compute_ratio']:.2f} (target {TARGET_FRACTION})")
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f, default in asdict(CosettleBenchConfig()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = vars(p.parse_args(argv))
    out = a.pop("out")
    res = run(CosettleBenchConfig(**a))
    if out:
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
