"""Decode-only throughput of the decode pool for 1, 2, 4, 8 workers, and tar member open cost.

Three measurements, side by side in one run:

* **stand-in** (structure): :class:`bench.standin.SleepDecoder` sleeps per chunk (I/O-bound
  decoding, no CPU) on short (320-frame) and long (1,280-frame) videos, 1/2/4/8 workers,
  through the real :class:`extract.workers.DecodePool` (spawned workers, pipes, reorder
  buffer); frames/s and the ratio to one worker. Also 8 workers with a reorder buffer too
  small for the long videos, to show the memory bound at work.
* **real** (PyAV): the 7 real clips of ``../shared/media`` at 224 px, 1 worker up to the
  core count.
* **tar open**: per-video open cost of a member of a 100 / 1,000 / 5,000-member tar shard,
  fsspec's ``tar://`` (a new index per open, the old path) vs :func:`extract.inputs.open_input`
  (an index per tar and process, cached), plus that index's one-time cost.

Usage: ``nice -n 5 python -m bench.decode [--quick] [--out docs/bench-decode.json]``
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

from bench.inputs import have_media, media_rows
from bench.standin import SleepDecoder
from extract.decode import Geometry
from extract.workers import DecodeJob, DecodePool, DoneEvent, FailedEvent
from pipeline.dist import local_cores


def pool_rate(workers: int, decoder: object, paths: list[str], kwargs: dict, *,
              buffer_bytes: int = 512 << 20) -> dict:
    """frames/s of one pool run over ``paths`` (workers started and warmed up beforehand)."""
    with DecodePool(workers, kwargs, decoder=decoder, buffer_bytes=buffer_bytes, timeout_s=600.0) as pool:
        # warm-up: every worker has imported and decoded once before the clock starts
        list(pool.run([DecodeJob(i, f"w{i}", paths[i % len(paths)]) for i in range(workers)]))
        pool.peak_buffer_bytes = 0
        jobs = [DecodeJob(i, f"v{i}", p) for i, p in enumerate(paths)]
        t0 = time.perf_counter()
        frames = failed = 0
        for ev in pool.run(jobs):
            if isinstance(ev, DoneEvent):
                frames += ev.num_frames
            elif isinstance(ev, FailedEvent):
                failed += 1
        secs = time.perf_counter() - t0
        return {"workers": workers, "videos": len(paths), "frames": frames, "failed": failed,
                "seconds": round(secs, 3), "frames_per_s": round(frames / secs, 1),
                "peak_buffer_mb": round(pool.peak_buffer_bytes / 2**20, 2)}


def standin(quick: bool) -> list[dict]:
    out = []
    size, chunk, sleep = 32, 32, 0.02
    kwargs = dict(geometry=Geometry(size=size, mode="squash"), fps=None, chunk_size=chunk, threads=1, min_frames=1)
    for label, frames, videos in (("short", 320, 8 if quick else 24), ("long", 1280, 4 if quick else 16)):
        dec = SleepDecoder(frames=frames, seconds_per_chunk=sleep)
        base = None
        for w in (1, 2) if quick else (1, 2, 4, 8):
            r = pool_rate(w, dec, [f"standin-{i}" for i in range(videos)], kwargs)
            base = base or r["frames_per_s"]
            r.update(video=label, frames_per_video=frames, ratio=round(r["frames_per_s"] / base, 2))
            out.append(r)
            print(f"stand-in {label:5s} ({frames} frames/video) {w} workers: {r['frames_per_s']:8.1f} frames/s "
                  f"= {r['ratio']:.2f}x one worker (peak reorder buffer {r['peak_buffer_mb']} MB)", flush=True)
        if not quick and label == "long":  # the memory bound at work: a buffer of 2 long videos' chunks
            small = 2 * frames * size * size * 3
            r = pool_rate(8, dec, [f"standin-{i}" for i in range(videos)], kwargs, buffer_bytes=small)
            r.update(video=label, frames_per_video=frames, ratio=round(r["frames_per_s"] / base, 2),
                     buffer_mb=round(small / 2**20, 2))
            out.append(r)
            print(f"stand-in long, 8 workers, buffer {r['buffer_mb']} MB: {r['frames_per_s']:8.1f} frames/s "
                  f"= {r['ratio']:.2f}x one worker (peak {r['peak_buffer_mb']} MB)", flush=True)
    return out


def real(quick: bool) -> list[dict]:
    if not have_media():
        print("real clips: ../shared/media not found, skipped")
        return []
    paths = [r.path for r in media_rows()]
    kwargs = dict(geometry=Geometry(size=224), fps=None, chunk_size=32, threads=1, min_frames=1)
    out, base = [], None
    for w in range(1, min(2 if quick else 4, local_cores()) + 1):
        r = pool_rate(w, None, paths, kwargs)
        base = base or r["frames_per_s"]
        r.update(ratio=round(r["frames_per_s"] / base, 2))
        out.append(r)
        print(f"real PyAV, 7 clips at 224 px, {w} workers (1 codec thread each): {r['frames_per_s']:7.1f} "
              f"frames/s = {r['ratio']:.2f}x one worker", flush=True)
    return out


def _make_tar(path: Path, members: int, payload: bytes) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(members):
            for ext, data in (("mp4", payload), ("json", b'{"label": 0}')):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def tar_open(quick: bool, tmp: Path) -> list[dict]:
    import fsspec

    import extract.inputs as inputs

    payload = os.urandom(20_000)  # a small video's size; only opening is timed
    out = []
    for members in (100, 1000) if quick else (100, 1000, 5000):
        tar = tmp / f"shard{members}.tar"
        _make_tar(tar, members, payload)
        names = [f"{i:09d}.mp4" for i in range(0, members, max(1, members // 20))]

        def once_fsspec(name: str) -> None:
            of = fsspec.open(f"tar://{name}::{tar}", "rb", skip_instance_cache=True)
            with of as f:
                assert len(f.read(4096)) == 4096

        def once_cached(name: str) -> None:
            with inputs.open_input(f"tar://{name}::{tar}") as f:
                assert len(f.read(4096)) == 4096

        t0 = time.perf_counter()
        for n in names:
            once_fsspec(n)
        before = (time.perf_counter() - t0) / len(names)
        inputs._TAR_INDEX.clear()
        t0 = time.perf_counter()
        inputs.tar_index(str(tar))
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in names:
            once_cached(n)
        after = (time.perf_counter() - t0) / len(names)
        r = {"members": members, "fsspec_ms_per_open": round(1e3 * before, 3),
             "cached_index_ms_per_open": round(1e3 * after, 3), "index_once_ms": round(1e3 * index_s, 2),
             "speedup": round(before / after, 1)}
        out.append(r)
        print(f"tar open, {members:5d} members: fsspec tar:// {r['fsspec_ms_per_open']:8.3f} ms/open, cached index "
              f"{r['cached_index_ms_per_open']:6.3f} ms/open ({r['speedup']}x; index built once per tar and "
              f"process in {r['index_once_ms']} ms)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer videos and worker counts (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    print(f"cores: {local_cores()} (shared machine: numbers are noisy)")
    with tempfile.TemporaryDirectory() as tmp:
        res = {"cores": local_cores(), "standin": standin(args.quick), "real": real(args.quick),
               "tar_open": tar_open(args.quick, Path(tmp))}
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
