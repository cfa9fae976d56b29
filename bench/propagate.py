"""``python -m bench.propagate``: seconds and peak memory of label propagation on one sequence.

The case of the issue: one 80-frame DAVIS sequence at 480 x 880 with ViT-B/16 features, i.e.
a 30 x 55 grid of 768 channels (random features: the cost does not depend on the values),
3 objects, the DAVIS protocol (first frame + 20 context frames, radius 20, top-k 7).

Each setting of ``max_affinity_elements`` (the bound on one affinity block, in floats) runs
in a fresh spawned child so that its peak resident memory (``ru_maxrss``) is its own. Reported
per child: seconds to read the sequence's features from a real float16 zarr store (written
first, as ``dense-extract`` writes it), seconds for the propagation (grid labels), seconds to
upsample every frame to 480 x 854 pixels and take the argmax, the peak RSS, the RSS before
propagation (inputs built), and the multiply-adds of the affinities actually computed
(banded: each distinct context slot once per band, restricted slots only over the rows
within the radius; ``dense_gmacs`` is what a full ``N x N`` product per slot would cost).

Usage: ``python -m bench.propagate [--frames 80] [--grid 30 55] [--channels 768]
[--elements 16777216 4194304] [--threads N] [--out FILE.json]``
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    frames: int
    grid: tuple[int, int]
    channels: int
    objects: int
    size: tuple[int, int]
    max_affinity_elements: int
    threads: int
    seed: int = 0


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _run(case: Case, queue: "mp.Queue") -> None:
    import numpy as np
    import torch

    import tempfile

    from pipeline.store import ShardWriter, init_store, open_store
    from train.dense.propagate import PropagationConfig, _bands, context_indices, iter_grid_to_labels, propagate

    torch.set_num_threads(case.threads)
    g = torch.Generator().manual_seed(case.seed)
    h, w = case.grid
    with tempfile.TemporaryDirectory() as tmp:  # the sequence in a real float16 store, then read back
        init_store(tmp, {"content": {"dtype": "float16", "feature_shape": [h, w, case.channels], "num_shards": 1,
                                     "num_videos": 1, "videos_per_shard": 1}})
        writer = ShardWriter.create(tmp, "00000", feature_shape=(h, w, case.channels), dtype="float16",
                                    frames_per_file=case.frames)
        writer.begin_video({"video_id": "seq", "split": "val", "label": None, "label_name": None})
        for t in range(case.frames):
            writer.append(torch.randn(1, h, w, case.channels, generator=g).numpy(), np.array([t / 24.0]))
        writer.end_video()
        writer.finish()
        t0 = time.perf_counter()
        feats = torch.from_numpy(open_store(tmp).features("seq"))
        t_read = time.perf_counter() - t0
    first = torch.nn.functional.one_hot(torch.randint(0, case.objects + 1, (h, w), generator=g), case.objects + 1).float()
    cfg = PropagationConfig(max_affinity_elements=case.max_affinity_elements)
    rss_inputs = _current_rss_mib()
    t0 = time.perf_counter()
    soft = propagate(feats, first, cfg)
    t_prop = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lab in iter_grid_to_labels(soft, case.size, list(range(case.objects + 1)), cfg.upsample):
        assert lab.shape == case.size
    t_up = time.perf_counter() - t0
    n = h * w
    bands = _bands(max(h, w), min(h, w), cfg, torch.device("cpu"))
    restricted = sum((b.q1 - b.q0) * (b.k1 - b.k0) for b in bands)  # per restricted slot
    macs = dense = 0
    for t in range(1, case.frames):
        slots = {(f, i > 0) for i, f in enumerate(context_indices(t, cfg.context))}
        macs += sum(restricted if r else n * n for _, r in slots) * case.channels
        dense += len(slots) * n * n * case.channels
    queue.put(
        {
            "case": asdict(case),
            "read_s": t_read,
            "feats_dtype": str(feats.dtype),
            "propagate_s": t_prop,
            "upsample_argmax_s": t_up,
            "total_s": t_prop + t_up,
            "s_per_frame": (t_prop + t_up) / max(1, case.frames - 1),
            "gmacs": macs / 1e9,
            "dense_gmacs": dense / 1e9,
            "band_rows": bands[0].q1 // min(h, w) - bands[0].q0 // min(h, w),
            "gmacs_per_s": macs / 1e9 / t_prop,
            "rss_inputs_mib": rss_inputs,
            "peak_rss_mib": _rss_mib(),
            "features_mib": feats.numel() * feats.element_size() / 2**20,
            "affinity_block_mib": case.max_affinity_elements * 4 / 2**20,
            "finite": bool(np.isfinite(soft.numpy()).all()),
        }
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=80)
    p.add_argument("--grid", type=int, nargs=2, default=(30, 55), metavar=("H", "W"))
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--objects", type=int, default=3)
    p.add_argument("--size", type=int, nargs=2, default=(480, 854), metavar=("H", "W"), help="pixels of the results")
    p.add_argument("--elements", type=int, nargs="+", default=[2**24, 2**22], help="max_affinity_elements settings")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    for el in a.elements:
        case = Case(a.frames, tuple(a.grid), a.channels, a.objects, tuple(a.size), el, a.threads)
        q = ctx.Queue()
        proc = ctx.Process(target=_run, args=(case, q))
        proc.start()
        r = q.get()
        proc.join()
        r["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
        results.append(r)
        print(
            f"elements {el:>10d} ({r['affinity_block_mib']:.0f} MiB block): read {r['read_s']:.1f} s, "
            f"propagate {r['propagate_s']:.1f} s "
            f"+ upsample {r['upsample_argmax_s']:.1f} s = {r['total_s']:.1f} s/sequence "
            f"({r['s_per_frame']:.2f} s/frame, {r['gmacs']:.0f} of {r['dense_gmacs']:.0f} dense GMAC, "
            f"{r['gmacs_per_s']:.1f} GMAC/s); peak RSS {r['peak_rss_mib']:.0f} MiB "
            f"(inputs {r['rss_inputs_mib']:.0f} MiB, features {r['features_mib']:.0f} MiB)",
            flush=True,
        )
    if a.out:
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
