"""``make bench-extract``: stage-1 throughput, storage cost and int8 fidelity, side by side.

For each input size (112 and 224 px), in one process and one run:

* **model only**: frames/s of the backbone forward (``prepare`` + ``forward``) on frames that
  are already decoded and in memory, same batch size, measured two ways: the plain loop (one
  batch at a time on every core, torch's default) and with the pipeline's own thread plan
  (``extract.encode.thread_plan``: on a 2-core CPU, two batches at once on one thread each),
  so that the ratio is not flattered by a better threading than the baseline's;
* **decode only**: frames/s of ``extract.decode.iter_frames`` in the main process (what one
  decode worker costs in CPU time);
* **pipeline**: frames/s of ``extract.runner.run_extract`` end to end (spawned decode
  workers, backbone, zarr writes), into a fresh store, and the same after its start-up (the
  decode workers' spawn and imports, a fixed cost per run);

then the ratios pipeline / model-only (both ways). Then bytes per stored frame for every dtype x codec
(written with the real ShardWriter, measured on disk) and, for int8, the cosine similarity
of dequantised features to the float32 ones. Videos: the 7 real clips of ``../shared/media``
when present (H.264, 320x180 to 1280x720), and the synthetic benchmark videos (128x128).

Usage: ``python -m bench.extract [--sizes 112 224] [--batch 32] [--out docs/bench-extract.json]``
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.inputs import have_media, media_rows, synthetic_rows
from pipeline.manifest import ManifestRow, write_manifest

if TYPE_CHECKING:
    from extract.decode import Geometry
    from extract.encode import ThreadPlan
    from extract.runner import ExtractSummary

# torch, the backbones and the runner are imported inside the functions: the decode workers
# are *spawned*, and a spawned child imports the main module first, so heavy imports here
# would add seconds to every worker's start-up that `freezeframe extract` (whose main
# module, freezeframe.cli, imports in 0.2 s) does not pay.


def model_only_fps(backbone, frames: np.ndarray, batch: int, repeats: int = 2,
                   plan: ThreadPlan | None = None) -> float:
    """Backbone frames/s on in-memory uint8 frames (N, S, S, 3).

    ``plan=None``: the plain loop, one batch at a time on torch's default threads. Else
    ``plan.streams`` batches at once, each on ``plan.threads_per_stream`` threads (what the
    pipeline does)."""
    import torch

    streams = plan.streams if plan else 1
    old = torch.get_num_threads()
    if plan:
        torch.set_num_threads(plan.threads_per_stream)

    @torch.inference_mode()
    def forward(x: np.ndarray) -> int:
        backbone(backbone.prepare(torch.from_numpy(x)))
        return len(x)

    batches = [frames[i : i + batch] for _ in range(repeats) for i in range(0, len(frames), batch)]
    try:
        with ThreadPoolExecutor(streams) as ex:
            list(ex.map(forward, batches[:streams]))  # warm-up
            t0 = time.perf_counter()
            n = sum(ex.map(forward, batches))
            return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


def decode_only_fps(rows: list[ManifestRow], geometry: Geometry) -> tuple[float, int]:
    from extract.decode import iter_frames

    t0 = time.perf_counter()
    n = 0
    for r in rows:
        for chunk in iter_frames(r.path, geometry=geometry):
            n += len(chunk.frames)
    return n / (time.perf_counter() - t0), n


def pipeline_run(manifest: Path, store: Path, size: int, batch: int, weights: bool) -> ExtractSummary:
    from extract.config import ExtractConfig
    from extract.runner import run_extract

    cfg = ExtractConfig(manifest=str(manifest), store=str(store), backbone="mobilenetv2-imagenet",
                        random_weights=not weights, image_size=size, batch_size=batch, progress=False,
                        videos_per_shard=64)
    return run_extract(cfg)


def storage_table(feats: np.ndarray, tmp: Path) -> list[dict]:
    """Bytes per frame on disk for every dtype x codec, and int8 cosine to float32."""
    from pipeline.store import CODECS, STORAGE_DTYPES, ShardWriter, init_store

    rows = []
    ref = feats.astype(np.float32)
    for dtype in STORAGE_DTYPES.names():
        for codec in CODECS.names():
            root = tmp / f"store-{dtype}-{codec}"
            init_store(root, {"content": {"feature_shape": list(feats.shape[1:]), "dtype": dtype}})
            w = ShardWriter.create(root, "00000", feature_shape=feats.shape[1:], dtype=dtype, codec=codec)
            w.begin_video({"video_id": "v", "split": "train"})
            w.append(ref, np.arange(len(ref), dtype=np.float64))
            w.end_video()
            w.finish()
            nbytes = sum(p.stat().st_size for p in (root / "shards").rglob("*") if p.is_file() and p.name != "zarr.json")
            back = STORAGE_DTYPES.get(dtype).decode(
                {k: np.asarray(v) for k, v in _read_arrays(root / "shards" / "00000").items()})
            a = ref.reshape(-1, ref.shape[-1])
            b = back.reshape(-1, ref.shape[-1])
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
            valid = np.linalg.norm(a, axis=1) > 0
            rows.append({"dtype": dtype, "codec": codec, "bytes_per_frame": nbytes / len(ref),
                         "raw_bytes_per_frame": int(np.prod(ref.shape[1:])) * {"float16": 2, "float32": 4, "int8": 1}[dtype],
                         "cosine_mean": float(cos[valid].mean()), "cosine_min": float(cos[valid].min())})
    return rows


def _read_arrays(path: Path) -> dict:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][...] for k in g.array_keys() if k != "timestamps"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = ap.parse_args()
    import torch

    from extract.backbones import create_backbone
    from extract.config import ExtractConfig
    from extract.decode import Geometry, decode_all
    from extract.encode import thread_plan
    from extract.weights import mobilenet_checkpoint

    weights = mobilenet_checkpoint() is not None
    tmp = Path(tempfile.mkdtemp(prefix="ff-bench-"))
    results: dict = {"torch_threads": torch.get_num_threads(), "real_weights": weights, "batch": args.batch, "runs": []}
    try:
        inputs = {}
        if have_media():
            inputs["real clips (../shared/media)"] = media_rows()
        inputs["synthetic 128x128"] = synthetic_rows(tmp, train_per_class=4)
        for label, rows in inputs.items():
            manifest = write_manifest(rows, tmp / f"{len(results['runs'])}.jsonl")
            for size in args.sizes:
                bb = create_backbone("mobilenetv2-imagenet", pretrained=weights, image_size=size)
                geometry = Geometry(size=size, mode="short_side_crop", interpolation=bb.preprocess.interpolation)
                dec_fps, n = decode_only_fps(rows, geometry)
                frames = np.concatenate([decode_all(r.path, geometry=geometry).frames for r in rows])
                model_fps = model_only_fps(bb, frames, args.batch)
                plan = thread_plan(ExtractConfig(), torch.device("cpu"))
                streams_fps = model_only_fps(bb, frames, args.batch, plan=plan)
                store = tmp / f"pipe-{size}-{len(results['runs'])}.zarr"
                summary = pipeline_run(manifest, store, size, args.batch, weights)
                pipe_fps, steady_fps = summary.frames_per_s, summary.steady_frames_per_s
                shutil.rmtree(store, ignore_errors=True)
                best = max(model_fps, streams_fps)
                run = {"input": label, "videos": len(rows), "frames": n, "size": size,
                       "model_only_fps": model_fps, "model_only_streams_fps": streams_fps,
                       "streams": plan.streams, "threads_per_stream": plan.threads_per_stream,
                       "decode_only_fps": dec_fps, "pipeline_fps": pipe_fps,
                       "pipeline_startup_s": summary.startup_seconds, "pipeline_steady_fps": steady_fps,
                       "ratio": pipe_fps / model_fps, "ratio_vs_streams": pipe_fps / streams_fps,
                       "steady_ratio": steady_fps / model_fps, "steady_ratio_vs_streams": steady_fps / streams_fps,
                       # if decoding must share the CPU with the fastest model forward
                       "ideal_ratio_if_cpu_bound": (1 / best) / (1 / best + 1 / dec_fps)}
                results["runs"].append(run)
                print(f"{label:32s} {size:4d}px  model-only {model_fps:7.1f} f/s "
                      f"({plan.streams} streams: {streams_fps:7.1f})  decode-only {dec_fps:7.1f} f/s  "
                      f"pipeline {pipe_fps:7.1f} f/s ({steady_fps:7.1f} after a {summary.startup_seconds:.1f} s "
                      f"start-up)  ratio {run['ratio']:.2f} / steady {run['steady_ratio']:.2f} "
                      f"(vs {plan.streams} streams {run['ratio_vs_streams']:.2f} / {run['steady_ratio_vs_streams']:.2f}; "
                      f"bound on a shared CPU {run['ideal_ratio_if_cpu_bound']:.2f})", flush=True)
                if size == max(args.sizes) and "storage" not in results:
                    with torch.inference_mode():
                        feats = torch.cat([bb(bb.prepare(torch.from_numpy(frames[i:i + 64])))
                                           for i in range(0, min(len(frames), 512), 64)]).numpy()
                    results["storage"] = storage_table(feats, tmp)
                    results["storage_grid"] = list(feats.shape[1:])
        print(f"\nbytes per frame, grid {results['storage_grid']} (float32 raw = "
              f"{int(np.prod(results['storage_grid'])) * 4} B):")
        for r in results["storage"]:
            print(f"  {r['dtype']:8s} {r['codec']:6s} {r['bytes_per_frame']:10.0f} B/frame "
                  f"(raw {r['raw_bytes_per_frame']})  cosine to float32: mean {r['cosine_mean']:.6f} min {r['cosine_min']:.6f}")
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
