"""Backbone forward throughput of the large image models, and int8 fidelity on their tokens.

For each backbone (default: CLIP ViT-B/16 and ViT-L/14 at 224 px), in one process: the
model-only frames/s (``prepare`` + ``forward`` on frames already decoded in memory, plain
loop on torch's default threads, :func:`bench.extract.model_only_fps`) and, on the tokens it
produced, the cosine of the int8 (per-token scale) and float16 round trips to float32, and
the same after 2 x 2 spatial pooling (14x14 -> 7x7). Frames: the real clips of
``../shared/media`` (first ``--frames`` frames, short side + centre crop).

Random weights unless ``--weights``: the CLIP checkpoints cannot be had offline here
(``/work/shared/reference/offline-assets.md``), so the rate is exact (the forward costs the
same FLOPs whatever the weights) but the int8 fidelity is measured on random-init tokens,
not CLIP's. ``freezeframe plan`` reads ``frames_per_s`` from the JSON this writes
(``docs/bench-backbones.json``) as its default rate.

Usage: ``python -m bench.backbones [--backbones clip-vit-b16 clip-vit-l14] [--frames 32]
[--out docs/bench-backbones.json]``
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def _cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine per token of (..., C) arrays."""
    num = (x * y).sum(-1)
    return num / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["clip-vit-b16", "clip-vit-l14"])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--weights", nargs="*", default=None, help="Checkpoint per backbone (default: random init).")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from bench.extract import model_only_fps
    from bench.inputs import media_rows
    from extract.backbones import create_backbone
    from extract.decode import Geometry, decode_all
    from pipeline.pooling import spatial_pool
    from pipeline.store import STORAGE_DTYPES

    out: dict = {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, no GPU",
                 "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "size": 224,
                 "batch": args.batch, "backbones": {}}
    for i, name in enumerate(args.backbones):
        ckpt = args.weights[i] if args.weights else None
        bb = create_backbone(name, weights=ckpt, pretrained=False) if ckpt else create_backbone(name, pretrained=False)
        geometry = Geometry(size=224, mode="short_side_crop", interpolation=bb.preprocess.interpolation)
        frames = []
        for r in media_rows():
            frames.append(decode_all(r.path, geometry=geometry, fps=2.0).frames)
            if sum(len(f) for f in frames) >= args.frames:
                break
        x = np.concatenate(frames)[: args.frames]
        fps = model_only_fps(bb, x, args.batch, repeats=1)
        with torch.inference_mode():
            feats = torch.cat([bb(bb.prepare(torch.from_numpy(x[j:j + args.batch])))
                               for j in range(0, len(x), args.batch)]).float()
        res = {"weights": "checkpoint" if ckpt else "random", "frames": len(x), "frames_per_s": fps,
               "grid": list(feats.shape[1:])}
        for label, f in (("full", feats), ("pool7", spatial_pool(feats, 7))):
            f32 = f.numpy()
            for dt in ("float16", "int8"):
                sd = STORAGE_DTYPES.get(dt)
                back = sd.decode(sd.encode(f32))
                c = _cosines(back, f32)
                res[f"{label}_{dt}_cosine_mean"] = float(c.mean())
                res[f"{label}_{dt}_cosine_min"] = float(c.min())
        out["backbones"][name] = res
        print(name, json.dumps(res), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
