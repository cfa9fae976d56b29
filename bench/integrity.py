"""What the store's integrity costs: the same features written with integrity version 1
(chunk CRC32C, every chunk written, marker file table with SHA-256) and version 0 (before),
side by side: bytes on disk and writer CPU seconds (append + finish: this process's CPU
time, which the load of other processes on a shared machine does not inflate), then
``verify`` CPU seconds. The two versions are written alternately, best of ``--repeats``.

    python -m bench.integrity [--frames 512] [--grid 7] [--channels 1280] [--out FILE.json]

Features are ReLU6-like (half the values zero, the rest |N(0, 1)| clipped at 6), so zstd
compresses them about as it does MobileNetV2's. Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.store import ShardWriter, check_store, init_store

FORMATS = (("float16", "zstd"), ("int8", "zstd"), ("float32", "none"))


def features(frames: int, grid: int, channels: int, seed: int = 0) -> np.ndarray:
    """(frames, grid, grid, channels) float32, ReLU6-like."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((frames, grid, grid, channels), dtype=np.float32))
    x[rng.random(x.shape) < 0.5] = 0.0
    return np.minimum(x, 6.0)


def write(root: Path, x: np.ndarray, dtype: str, codec: str, integrity: int, frames_per_file: int,
          videos: int = 8) -> float:
    """Write ``x`` as ``videos`` videos of one shard; CPU seconds from create to the marker."""
    content = {"dtype": dtype, "codec": codec, "feature_shape": list(x.shape[1:]), "num_shards": 1,
               "num_videos": videos}
    init_store(root, {"content": content}, integrity=integrity)
    t0 = time.process_time()
    w = ShardWriter.create(root, "00000", feature_shape=x.shape[1:], dtype=dtype, codec=codec,
                           frames_per_file=frames_per_file, integrity=integrity)
    for i, part in enumerate(np.array_split(np.arange(len(x)), videos)):
        w.begin_video({"video_id": f"v{i}", "split": "train", "label": 0, "label_name": None})
        w.append(x[part], part / 8.0)
        w.end_video()
    w.finish()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--channels", type=int, default=1280)
    ap.add_argument("--frames-per-file", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="best of N writes per format and version")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    x = features(args.frames, args.grid, args.channels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, codec in FORMATS:
            row: dict = {"dtype": dtype, "codec": codec}
            best = {0: float("inf"), 1: float("inf")}
            verify_best = {0: float("inf"), 1: float("inf")}
            for r in range(args.repeats):
                for version in (0, 1):  # alternately, so both see the same machine
                    root = Path(tmp) / f"{dtype}-{codec}-{version}-{r}"
                    best[version] = min(best[version], write(root, x, dtype, codec, version, args.frames_per_file))
                    t0 = time.process_time()
                    assert check_store(root).problems == []
                    verify_best[version] = min(verify_best[version], time.process_time() - t0)
            for version in (0, 1):
                root = Path(tmp) / f"{dtype}-{codec}-{version}-0"
                nbytes = sum(p.stat().st_size for p in (root / "shards").rglob("*")  # chunk files only
                             if p.is_file() and p.name != "zarr.json")
                row[f"v{version}"] = {"bytes_per_frame": nbytes / args.frames, "write_cpu_s": best[version],
                                      "verify_cpu_s": verify_best[version],
                                      "marker_bytes": (root / "markers" / "00000.json").stat().st_size}
            row["bytes_ratio"] = row["v1"]["bytes_per_frame"] / row["v0"]["bytes_per_frame"]
            row["write_ratio"] = row["v1"]["write_cpu_s"] / row["v0"]["write_cpu_s"]
            rows.append(row)
            print(f"{dtype:8s} {codec:5s} bytes/frame {row['v0']['bytes_per_frame']:10.1f} -> "
                  f"{row['v1']['bytes_per_frame']:10.1f} (x{row['bytes_ratio']:.5f})  write cpu s "
                  f"{row['v0']['write_cpu_s']:.3f} -> {row['v1']['write_cpu_s']:.3f} (x{row['write_ratio']:.2f})  "
                  f"verify cpu s {row['v0']['verify_cpu_s']:.3f} -> {row['v1']['verify_cpu_s']:.3f}  marker bytes "
                  f"{row['v0']['marker_bytes']} -> {row['v1']['marker_bytes']}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
