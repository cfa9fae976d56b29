"""Stage-1 extraction end to end on real H.264 files, real decode workers, a real (random-init)
MobileNetV2 and real zarr: cached features equal a direct forward, SIGKILL + rerun resumes to
the same store, torchrun / --shard-index ranks give the same store, bad inputs (including a
decoder that hangs) become failures with their stage, --retry-failed, config mismatch, and the
real clips in ../shared/media with the real ImageNet weights."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pytest
import torch
import zarr

from extract.config import ExtractConfig
from extract.decode import Geometry, decode_all
from extract.encode import build_backbone
from extract.runner import run_extract
from pipeline.errors import ConfigMismatchError, FreezeframeError, ManifestError
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.pooling import compress
from pipeline.store import ShardWriter, open_store, read_markers, shard_lock, store_status, verify_store
from tests.videos import (
    make_h264_video,
    make_non_video,
    make_truncated_video,
    make_zero_frame_video,
    pattern_frames,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: freezeframe, torchrun
#: Geometry the runner must derive for MobileNetV2 at 64 px (timm's cfg, interpolation set to bilinear).
GEOM64 = Geometry(size=64, mode="short_side_crop", interpolation="bilinear")

#: A small random-init MobileNetV2 (2x2x1280 grid at 64 px), small chunks/batches/zarr blocks so
#: batches span videos, videos span chunks and shards span several zarr shard files.
BASE = ExtractConfig(backbone="mobilenetv2-imagenet", random_weights=True, image_size=64, dtype="float32",
                     videos_per_shard=2, frames_per_file=8, batch_size=8, chunk_size=4, workers=1,
                     decode_timeout=60.0, device="cpu", progress=False)
#: The same run as CLI flags (``cli_args``) -- content keys must match BASE exactly.
CLI_FLAGS = ["--random-weights", "--image-size", "64", "--dtype", "float32", "--videos-per-shard", "2",
             "--batch-size", "8", "--workers", "1", "--device", "cpu",
             "--set", "frames_per_file=8", "--set", "chunk_size=4"]


class Corpus(NamedTuple):
    manifest: Path
    rows: list[ManifestRow]


def make_corpus(folder: Path, n: int, seed: int = 0) -> Corpus:
    """``n`` small H.264 videos (10 fps, 14..24 frames, landscape/portrait/larger) + manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(48, 64), (64, 48), (72, 96)]
    rows = []
    for i in range(n):
        h, w = sizes[i % 3]
        frames = pattern_frames(14 + (5 * i) % 11, h, w, seed=seed + i)
        path = make_h264_video(folder / f"vid{i:02d}.mp4", frames, 10, gop=6)
        rows.append(ManifestRow(f"vid{i:02d}", str(path), split="test" if i % 4 == 3 else "train",
                                label=i % 3, label_name=f"class{i % 3}"))
    return Corpus(write_manifest(rows, folder / "manifest.jsonl"), rows)


def cfg_for(manifest: Path, store: Path, **kw: object) -> ExtractConfig:
    return dataclasses.replace(BASE, manifest=str(manifest), store=str(store), **kw)


def cli_args(manifest: Path, store: Path, progress: bool = False) -> list[str]:
    return ["extract", "--manifest", str(manifest), "--store", str(store), *CLI_FLAGS,
            *([] if progress else ["--no-progress"])]


def invoke_in_process(args: list[str]) -> str:
    """Run a ``freezeframe`` command in this process (typer's CliRunner); returns stdout."""
    from typer.testing import CliRunner

    from freezeframe.cli import app

    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and r.exception is None, r.output
    return r.stdout


def snapshot(root: Path) -> dict:
    """Everything a store holds except timings: index, per-video arrays (bytes), raw shard arrays
    (bytes), shard attributes, markers (videos + failures) and the header content."""
    store = open_store(root)
    videos = {v: (store.meta(v), store.features(v).tobytes(), store.timestamps(v).tobytes())
              for v in store.video_ids}
    shards = {}
    for name, m in read_markers(root).items():
        g = zarr.open_group(str(root / "shards" / name), mode="r")
        shards[name] = {"marker": {k: m[k] for k in ("shard", "num_frames", "videos", "failures")},
                        "attrs": g.attrs["videos"],
                        "arrays": {k: np.asarray(g[k][...]).tobytes() for k in sorted(g.array_keys())}}
    return {"videos": videos, "shards": shards, "content": store.header["content"]}


def assert_same_store(got: Path, want: Path) -> None:
    a, b = snapshot(got), snapshot(want)
    assert a["content"] == b["content"]
    assert sorted(a["shards"]) == sorted(b["shards"])
    for name in b["shards"]:
        assert a["shards"][name] == b["shards"][name], f"shard {name} differs"
    assert list(a["videos"]) == list(b["videos"])
    for vid in b["videos"]:
        assert a["videos"][vid] == b["videos"][vid], f"video {vid} differs"


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (mtime_ns, size) of every file below ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def script(name: str) -> str:
    """A console script of this virtualenv (``freezeframe``, ``torchrun``); skip when absent."""
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{path} is not installed (run `make install`)")
    return str(path)


def run_cli(args: list[str], *, timeout: float = 300, launcher: list[str] | None = None,
            ) -> subprocess.CompletedProcess:
    cmd = [*(launcher or []), script("freezeframe"), *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def children(pid: int) -> set[int]:
    try:
        return {int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except (FileNotFoundError, ProcessLookupError):
        return set()


@contextmanager
def direct_forward() -> Iterator[None]:
    """Inference mode on one intra-op thread (the tests share 2 cores with decode workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """12 videos, i.e. 6 store shards of 2 videos."""
    return make_corpus(tmp_path_factory.mktemp("corpus"), 12)


@pytest.fixture(scope="module")
def baseline(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted single-process store of ``corpus`` (the reference for resume and ranks)."""
    store = tmp_path_factory.mktemp("baseline") / "store"
    s = run_extract(cfg_for(corpus.manifest, store))
    assert (s.shards_done, s.videos_done, s.failures) == (6, 12, [])
    assert verify_store(store) == []
    return store


# ------------------------------------------------------------------------------ cached == direct
def test_random_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    cfg = dataclasses.replace(BASE)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_backbone(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(5)
    b = build_backbone(cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Direct(NamedTuple):
    corpus: Corpus
    decoded: dict  # video_id -> FrameChunk (frames (T, 64, 64, 3) uint8, timestamps (T,) s)
    features: dict  # video_id -> torch.Tensor (T, 2, 2, 1280): the backbone run directly


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Direct:
    """3 videos decoded at 5 fps with ``decode_all`` and run through the backbone directly."""
    corpus = make_corpus(tmp_path_factory.mktemp("direct"), 3, seed=7)
    backbone = build_backbone(BASE).eval()
    decoded = {r.video_id: decode_all(r.path, geometry=GEOM64, fps=5.0) for r in corpus.rows}
    with direct_forward():
        feats = {v: backbone(backbone.prepare(d.frames)) for v, d in decoded.items()}
    return Direct(corpus, decoded, feats)


@pytest.mark.parametrize(
    "dtype, spatial, channels",
    [("float32", None, None), ("float16", None, None), ("int8", None, None), ("float32", 1, 320)],
)
def test_cached_features_equal_a_direct_forward(direct: Direct, tmp_path: Path, dtype: str,
                                               spatial: int | None, channels: int | None) -> None:
    cfg = cfg_for(direct.corpus.manifest, tmp_path / "store", dtype=dtype, fps=5.0, spatial_pool=spatial,
                  channel_pool=channels, batch_size=6, chunk_size=5)
    summary = run_extract(cfg)
    store = open_store(cfg.store)
    assert store.video_ids == [r.video_id for r in direct.corpus.rows] and summary.failures == []
    assert store.header["content"]["geometry"] == GEOM64.to_dict()
    assert store.feature_shape == ((spatial, spatial) if spatial else (2, 2)) + (channels or 1280,)
    for row in direct.corpus.rows:
        decoded = direct.decoded[row.video_id]
        want = compress(direct.features[row.video_id], spatial, channels).numpy()
        got = store.features(row.video_id)
        assert got.shape == want.shape == (len(decoded.frames), *store.feature_shape)
        np.testing.assert_array_equal(store.timestamps(row.video_id), decoded.timestamps)
        scale = float(np.abs(want).max())
        if dtype == "float32":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
        elif dtype == "float16":
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * scale)
        else:  # every token's direction survives per-token int8
            g, w = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
            cos = (g * w).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(w, axis=-1))
            assert cos.min() > 0.999
        meta = store.meta(row.video_id)
        assert (meta.split, meta.label, meta.label_name) == (row.split, row.label, row.label_name)
    assert summary.frames_done == sum(len(d.frames) for d in direct.decoded.values())
    assert summary.videos_done == 3 and verify_store(cfg.store) == []


# ------------------------------------------------------------------------------ decode workers
def test_worker_start_up_is_not_charged_to_the_first_video(tmp_path: Path) -> None:
    """A fresh worker needs its imports (seconds on a busy machine) before it decodes anything;
    with a 1 s timeout that start-up must not turn good videos into ``timeout`` failures, while
    a video that really hangs still does, and the worker replacing it serves the rest."""
    from extract.workers import ChunkEvent, DecodeJob, DecodePool, DoneEvent, FailedEvent

    rows = make_corpus(tmp_path / "v", 3, seed=60).rows
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)
    paths = [rows[0].path, str(fifo), rows[1].path, rows[2].path]
    jobs = [DecodeJob(i, f"j{i}", p) for i, p in enumerate(paths)]
    kwargs = dict(geometry=GEOM64, fps=None, chunk_size=4, threads=0, min_frames=1)
    t0 = time.monotonic()
    with DecodePool(1, kwargs, timeout_s=1.0) as pool:  # spawned now: start-up happens in run()
        events = list(pool.run(jobs))
    ends = [(type(e).__name__, e.index) for e in events if not isinstance(e, ChunkEvent)]
    assert ends == [("DoneEvent", 0), ("FailedEvent", 1), ("DoneEvent", 2), ("DoneEvent", 3)]
    failed = next(e for e in events if isinstance(e, FailedEvent))
    assert failed.failure.stage == "timeout" and failed.failure.video_id == "j1"
    for i in (0, 2, 3):
        frames = np.concatenate([e.frames for e in events if isinstance(e, ChunkEvent) and e.index == i])
        want = decode_all(paths[i], geometry=GEOM64)
        np.testing.assert_array_equal(frames, want.frames)
        assert next(e for e in events if isinstance(e, DoneEvent) and e.index == i).num_frames == len(frames)
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------------------------ kill and resume
@pytest.mark.slow  # subprocesses / real clips: run by `make test`, skip with -m 'not slow'
def test_sigkill_then_rerun_resumes_to_the_uninterrupted_store(corpus: Corpus, baseline: Path,
                                                               tmp_path: Path) -> None:
    store = tmp_path / "store"
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen([script("freezeframe"), *cli_args(corpus.manifest, store)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    kids: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while not (store / "markers").is_dir() or not any((store / "markers").glob("*.json")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "no shard completed in time"
            kids |= children(proc.pid)
            time.sleep(0.01)
        kids |= children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the decode workers (and multiprocessing's resource tracker) must not outlive it
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = [k for k in kids if Path(f"/proc/{k}").exists()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for k in kids:  # only our own children, by pid
            if Path(f"/proc/{k}").exists():
                os.kill(k, signal.SIGKILL)
    assert kids and orphans == [], "decode workers survived the SIGKILL of the main process"

    done = {p.stem: (p.stat().st_mtime_ns, p.read_bytes()) for p in (store / "markers").glob("*.json")}
    assert 1 <= len(done) < 6, f"the kill came too late to test resuming: {sorted(done)}"
    done_files = {s: files_state(store / "shards" / s) for s in done}
    in_progress = sorted({p.name for p in (store / "shards").iterdir() if p.is_dir()} - set(done))

    out = invoke_in_process(cli_args(corpus.manifest, store))  # the same command, run to completion
    assert re.search(rf"shards done now / skipped[^│]*│\s*{6 - len(done)} / {len(done)}\s*│", out), out
    # completed shards were neither redone nor touched
    for name, (mtime, data) in done.items():
        p = store / "markers" / f"{name}.json"
        assert (p.stat().st_mtime_ns, p.read_bytes()) == (mtime, data)
        assert files_state(store / "shards" / name) == done_files[name]
    assert in_progress == [] or set(in_progress) <= set(read_markers(store))
    assert verify_store(store) == []
    assert_same_store(store, baseline)


def test_a_second_run_on_the_same_store_leaves_a_locked_shard_alone(corpus: Corpus, baseline: Path,
                                                                     tmp_path: Path) -> None:
    """Two runs of the same command on one store (no rank flags) must not delete each other's
    work: a shard whose lock is held is skipped, reported, and done by a later rerun."""
    store = tmp_path / "store"
    run_extract(cfg_for(corpus.manifest, store, shard_index=0, num_shards=6))  # creates the store
    with shard_lock(store, "00002") as mine:
        assert mine
        # stand-in for the other run's half-written shard: a writer with one frame appended
        partial = ShardWriter.create(store, "00002", feature_shape=(2, 2, 1280), dtype="float32",
                                     frames_per_file=8)
        partial.begin_video({"video_id": "vid04", "split": "train"})
        partial.append(np.zeros((1, 2, 2, 1280), np.float32), np.zeros(1))
        before = files_state(store / "shards" / "00002")
        st = store_status(store)
        assert (st.in_progress_shards, st.writing_shards) == (["00002"], ["00002"])
        assert any("00002: incomplete, being written now" in p for p in verify_store(store, scan_values=False))

        s = run_extract(cfg_for(corpus.manifest, store))
        assert (s.shards_done, s.shards_skipped, s.shards_busy) == (4, 1, ["00002"])
        assert files_state(store / "shards" / "00002") == before  # not deleted, not touched
        assert "00002" not in read_markers(store)
    st = store_status(store)  # the holder is gone: the partial shard is abandoned, not "being written"
    assert (st.in_progress_shards, st.writing_shards) == (["00002"], [])
    s = run_extract(cfg_for(corpus.manifest, store))
    assert (s.shards_done, s.shards_skipped, s.shards_busy) == (1, 5, [])
    assert verify_store(store) == []
    assert_same_store(store, baseline)


# ------------------------------------------------------------------------------ ranks
@pytest.mark.slow  # subprocesses / real clips: run by `make test`, skip with -m 'not slow'
def test_torchrun_two_ranks_and_independent_shard_jobs_match_one_rank(corpus: Corpus, baseline: Path,
                                                                      tmp_path: Path) -> None:
    store = tmp_path / "torchrun"
    launcher = [script("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    r = run_cli(cli_args(corpus.manifest, store, progress=True), launcher=launcher)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the ranks worked as one job (one id in every marker); which rank wrote which shard is
    # the claiming's business (static k % 2 == rank, or dynamic): the summary reports it
    markers = read_markers(store)
    assert len({m["stats"]["job"] for m in markers.values()}) == 1
    per_rank = [sum(m["stats"]["rank"] == k for m in markers.values()) for k in (0, 1)]
    assert sum(per_rank) == 6 and all(n >= 1 for n in per_rank)  # both ranks worked
    # ONE summary (rank 0's) whose totals are the sum of both ranks' markers
    assert r.stdout.count("extraction summary") == 1 and "job of 2 ranks" in r.stdout

    def cell(label: str) -> str:
        m = re.search("│ " + re.escape(label) + r"[^│]*│\s*([^│]+?)\s*│", r.stdout)
        assert m, (label, r.stdout)
        return m.group(1)

    assert cell("shards done now / skipped") == "6 / 0"
    assert cell("ranks") == f"2 (torchrun); shards per rank: {per_rank[0]}, {per_rank[1]}"
    assert int(cell("videos done now")) == sum(len(m["videos"]) for m in markers.values()) == 12
    assert int(cell("frames done now").replace(",", "")) == sum(m["num_frames"] for m in markers.values()) \
        == store_status(store).frames_stored
    assert cell("failures now") == "0" and float(cell("frames/s (all ranks")) > 0
    # rank 0 shows the job's bar and logs its shards; rank 1 prints nothing (no --verbose)
    assert "job of 2 ranks" in r.stderr and "rank 1/2" not in r.stderr and "\x1b[" not in r.stderr
    logged = set(re.findall(r"shard (\d{5}): \d+ videos", r.stderr))
    assert logged == {m["shard"] for m in markers.values() if m["stats"]["rank"] == 0}
    assert verify_store(store) == []
    assert_same_store(store, baseline)

    # --shard-index/--num-shards: independent jobs, run one after the other
    jobs = tmp_path / "jobs"
    s0 = run_extract(cfg_for(corpus.manifest, jobs, shard_index=0, num_shards=2))
    assert sorted(read_markers(jobs)) == ["00000", "00002", "00004"] and s0.videos_done == 6
    assert verify_store(jobs) == ["3 planned shard(s) not complete: [1, 3, 5]"]
    s1 = run_extract(cfg_for(corpus.manifest, jobs, shard_index=1, num_shards=2))
    assert s1.shards_done == 3 and s1.shards_skipped == 0
    assert verify_store(jobs) == []
    assert_same_store(jobs, baseline)


@pytest.mark.slow
def test_srun_tasks_without_a_process_group_print_one_summary(corpus: Corpus, baseline: Path,
                                                              tmp_path: Path) -> None:
    """Two tasks of an ``srun -n 2`` step as Slurm starts them (its variables, no MASTER_ADDR:
    no process group): each takes its shards, rank 0 waits for rank 1's markers and prints the
    one summary; rank 1 prints nothing."""
    store = tmp_path / "srun"
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    slurm = {"SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
             "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    cmd = [script("freezeframe"), *cli_args(corpus.manifest, store, progress=True)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**base, **slurm, "SLURM_PROCID": str(k), "SLURM_LOCALID": str(k)})
             for k in (1, 0)]
    (out1, err1), (out0, err0) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], err0[-2000:] + err1[-2000:]
    markers = read_markers(store)
    assert {m["stats"]["job"] for m in markers.values()} == {"slurm-4242.0"}
    per_rank = [sum(m["stats"]["rank"] == k for m in markers.values()) for k in (0, 1)]
    assert sum(per_rank) == 6
    assert out1 == "" and err1 == ""  # rank 1: errors only
    assert out0.count("extraction summary") == 1 and "job of 2 ranks" in out0
    m = re.search(r"│ videos done now[^│]*│\s*(\d+)\s*│", out0)
    assert m and int(m.group(1)) == 12
    m = re.search(r"│ ranks[^│]*│\s*([^│]+?)\s*│", out0)
    assert m and m.group(1) == f"2 (slurm); shards per rank: {per_rank[0]}, {per_rank[1]}"
    assert verify_store(store) == []
    assert_same_store(store, baseline)


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_become_failures_with_their_stage_then_retry(tmp_path: Path) -> None:
    good = make_corpus(tmp_path / "good", 4, seed=20).rows
    bad = tmp_path / "bad"
    bad.mkdir()
    fifo = bad / "hangs.mp4"
    os.mkfifo(fifo)  # nobody writes: opening it blocks forever inside the decoder
    short = make_h264_video(bad / "short.mp4", pattern_frames(3, 48, 64), 10)
    paths = {
        "truncated": make_truncated_video(bad / "truncated.mp4"),
        "zero": make_zero_frame_video(bad / "zero.mp4"),
        "notvideo": make_non_video(bad / "notes.mp4"),
        "missing": bad / "missing.mp4",
        "short": short,
        "hangs": fifo,
    }
    expected_stage = {"truncated": "decode", "zero": "empty", "notvideo": "open", "missing": "open",
                      "short": "too_short", "hangs": "timeout"}
    bad_rows = [ManifestRow(k, str(p), label=0) for k, p in paths.items()]
    order = [good[0], bad_rows[0], good[1], bad_rows[5], bad_rows[1], bad_rows[2], good[2],
             bad_rows[3], bad_rows[4], good[3]]
    manifest = write_manifest(order, tmp_path / "manifest.jsonl")
    cfg = cfg_for(manifest, tmp_path / "store", videos_per_shard=3, workers=2, decode_timeout=3.0,
                  min_frames=5)

    t0 = time.monotonic()
    summary = run_extract(cfg)
    assert time.monotonic() - t0 < 60
    got = {f.video_id: f for f in summary.failures}
    assert {k: f.stage for k, f in got.items()} == expected_stage
    assert "truncated" in got["truncated"].message and "missing.mp4" in got["missing"].message
    assert got["hangs"].error_type == "TimeoutError" and "--decode-timeout" in got["hangs"].message
    good_frames = {r.video_id: decode_all(r.path, geometry=GEOM64) for r in good}
    assert summary.videos_done == 4 and summary.shards_done == 4
    assert summary.frames_done == sum(len(d.frames) for d in good_frames.values())
    store = open_store(cfg.store)
    assert store.video_ids == [r.video_id for r in good]
    for vid, d in good_frames.items():
        np.testing.assert_array_equal(store.timestamps(vid), d.timestamps)
    assert {f.video_id: (f.stage, f.shard) for f in store.failures()} == {
        k: (expected_stage[k], f.shard) for k, f in got.items()}
    assert verify_store(cfg.store) == []
    # the good videos' features are intact next to bad neighbours that failed midway (truncated)
    backbone = build_backbone(cfg).eval()
    for vid, d in good_frames.items():
        with direct_forward():
            want = backbone(backbone.prepare(d.frames)).numpy()
        np.testing.assert_allclose(store.features(vid), want, rtol=1e-5, atol=1e-4)

    # fix one file, retry the failures: only that one is stored, in a retry shard
    os.replace(make_h264_video(bad / "fixed.mp4", pattern_frames(9, 48, 64, seed=5), 10), paths["notvideo"])
    before = files_state(Path(cfg.store) / "shards")
    retry = run_extract(dataclasses.replace(cfg, retry_failed=True))
    assert retry.videos_done == 1 and retry.shards_done == 2  # 6 failures, 3 per shard
    assert files_state(Path(cfg.store) / "shards").items() >= before.items()  # nothing rewritten
    store = open_store(cfg.store)
    assert sorted(store.video_ids) == sorted([r.video_id for r in good] + ["notvideo"])
    assert store.meta("notvideo").shard.startswith("retry01-") and store.num_frames("notvideo") == 9
    left = {f.video_id: f for f in store.failures()}
    assert {k: f.stage for k, f in left.items()} == {k: s for k, s in expected_stage.items() if k != "notvideo"}
    assert all(f.shard.startswith("retry01-") for f in left.values())
    assert verify_store(cfg.store) == []


def test_retry_split_over_independent_jobs_and_resumed_after_a_kill(tmp_path: Path) -> None:
    """Retry shards follow the same rules as normal ones: ``--shard-index`` jobs share one retry
    plan, and a retry shard left half-written by a killed job is redone by the next retry run."""
    good = make_corpus(tmp_path / "good", 2, seed=30).rows
    late = [ManifestRow(f"late{i}", str(tmp_path / "late" / f"late{i}.mp4"), label=1) for i in range(5)]
    manifest = write_manifest([good[0], *late[:3], good[1], *late[3:]], tmp_path / "manifest.jsonl")
    cfg = cfg_for(manifest, tmp_path / "store")
    first = run_extract(cfg)
    assert [f.video_id for f in first.failures] == [r.video_id for r in late]
    assert {f.stage for f in first.failures} == {"open"}
    (tmp_path / "late").mkdir()
    lengths = {}
    for i, r in enumerate(late):  # the missing files arrive
        lengths[r.video_id] = 6 + i
        make_h264_video(Path(r.path), pattern_frames(6 + i, 48, 64, seed=50 + i), 10)

    retry = dataclasses.replace(cfg, retry_failed=True, num_shards=2)
    s0 = run_extract(dataclasses.replace(retry, shard_index=0))  # 5 videos: retry shards 0, 1, 2
    assert s0.videos_done == 3 and sorted(read_markers(cfg.store)) == [
        "00000", "00001", "00002", "00003", "retry01-00000", "retry01-00002"]
    # job 1 was killed while writing retry01-00001: a shard folder without marker
    from pipeline.store import ShardWriter
    w = ShardWriter.create(cfg.store, "retry01-00001", feature_shape=(2, 2, 1280), dtype="float32",
                           frames_per_file=8)
    w.begin_video({"video_id": "late2", "split": "train", "label": 1, "label_name": None})
    w.append(np.full((9, 2, 2, 1280), 7.0, np.float32), np.arange(9.0))
    assert any("retry01-00001: incomplete" in p for p in verify_store(cfg.store))

    s1 = run_extract(dataclasses.replace(retry, shard_index=1))  # job 1 rerun
    assert s1.videos_done == 2 and s1.failures == []
    store = open_store(cfg.store)
    assert store.failures() == [] and len(store) == 7
    assert {v: store.num_frames(v) for v in lengths} == lengths
    assert {store.meta(v).shard for v in lengths} == {"retry01-00000", "retry01-00001", "retry01-00002"}
    assert verify_store(cfg.store) == []
    again = run_extract(dataclasses.replace(cfg, retry_failed=True))  # nothing left to retry
    assert (again.shards_done, again.videos_done) == (0, 0)
    assert sorted(read_markers(cfg.store))[-1] == "retry01-00002"


def test_unsafe_rank_flags_and_duplicate_ids_are_refused_before_any_work(corpus: Corpus, tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(FreezeframeError, match="--shard-index 1 needs --num-shards"):
        run_extract(cfg_for(corpus.manifest, store, shard_index=1))  # would redo every shard
    with pytest.raises(FreezeframeError, match=r"must be in \[0, 2\)"):
        run_extract(cfg_for(corpus.manifest, store, shard_index=2, num_shards=2))
    dup = write_manifest([*corpus.rows[:3], corpus.rows[1]], tmp_path / "dup.jsonl")
    with pytest.raises(ManifestError, match="duplicate video_id 'vid01'"):
        run_extract(cfg_for(dup, store))
    assert not store.exists()


# ------------------------------------------------------------------------------ config mismatch
@pytest.mark.parametrize(
    "change, keys",
    [
        ({"dtype": "float16"}, ["dtype"]),
        ({"fps": 5.0}, ["fps"]),
        ({"image_size": 96}, ["feature_shape", "geometry.size", "preprocess.size"]),
        ({"backbone": "dinov2-vits14", "image_size": 56}, ["backbone", "feature_shape"]),
    ],
)
def test_rerun_with_a_different_config_is_refused_before_any_work(
        corpus: Corpus, baseline: Path, tmp_path: Path, change: dict, keys: list[str]) -> None:
    store = tmp_path / "store"
    shutil.copytree(baseline, store)
    before = files_state(store)
    with pytest.raises(ConfigMismatchError) as info:
        run_extract(cfg_for(corpus.manifest, store, **change))
    msg = str(info.value)
    for key in keys:
        assert f"  - {key}: store has" in msg, msg
    assert "  - codec:" not in msg and "  - videos_per_shard:" not in msg
    assert files_state(store) == before


def test_rerun_with_other_runtime_knobs_has_nothing_to_do(corpus: Corpus, baseline: Path,
                                                          tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(baseline, store)
    before = files_state(store)
    s = run_extract(cfg_for(corpus.manifest, store, batch_size=3, workers=2, chunk_size=7, decode_timeout=9.0))
    assert (s.shards_done, s.shards_skipped, s.videos_done) == (0, 6, 0)
    assert files_state(store) == before


# ------------------------------------------------------------------------------ real clips
@pytest.mark.slow  # subprocesses / real clips: run by `make test`, skip with -m 'not slow'
def test_real_clips_with_real_weights(shared_media: Path, tmp_path: Path) -> None:
    import timm

    from extract.weights import mobilenet_checkpoint

    ckpt = mobilenet_checkpoint()
    if ckpt is None:
        pytest.skip("the ImageNet MobileNetV2 weights are not in the cache (`freezeframe weights`)")
    clips = sorted(shared_media.glob("*.mp4"))
    rows = [ManifestRow(p.stem, str(p)) for p in clips]
    manifest = write_manifest(rows, tmp_path / "media.jsonl")
    cfg = ExtractConfig(manifest=str(manifest), store=str(tmp_path / "store"), fps=2.0, image_size=112,
                        dtype="float16", videos_per_shard=4, batch_size=32, workers=1, device="cpu",
                        progress=False)
    t0 = time.monotonic()
    summary = run_extract(cfg)
    seconds = time.monotonic() - t0
    assert summary.failures == [] and summary.videos_done == len(clips) == 7
    store = open_store(cfg.store)
    assert store.header["content"]["weights_source"] == "cache" and store.header["content"]["weights_sha256"]
    assert store.feature_shape == (4, 4, 1280)
    for p in clips:  # 2 frames per second of video, timestamps on a 0.5 s grid from 0
        ts = store.timestamps(p.stem)
        assert ts[0] == 0.0 and np.all(np.diff(ts) > 0.4) and np.all(np.diff(ts) < 0.6), p.stem
    assert verify_store(cfg.store) == []

    clf = timm.create_model("mobilenetv2_100", pretrained=False)
    clf.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    clf.eval()
    with direct_forward():
        pooled = torch.from_numpy(store.features("cockatoo").mean(axis=(0, 1, 2)))[None]
        top5 = clf.get_classifier()(pooled).topk(5).indices[0].tolist()
    assert 89 in top5, f"sulphur-crested cockatoo (89) not in top-5 {top5}"
    print(f"real clips: {summary.frames_done} frames in {seconds:.1f} s")
