"""Fault injection on real stores (issue 14): every corruption of the list is applied to a
fresh tiny store; ``freezeframe verify`` must fail naming the shard, file and videos and
say what to do, the reader must refuse (StoreError naming the file, never zeros or NaN),
``status`` must not end in a traceback, and ``verify --repair`` must remove exactly the
damaged shards (a rerun of the same extract command then re-extracts exactly them,
byte-identical). Also: a kill -9 during the creation of a store, then a rerun; bad values
leave no store behind; stores made before checksums still read."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pipeline.errors import ConfigError, FreezeframeError, StoreError
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.store import (
    HEADER_FILE,
    ShardWriter,
    check_store,
    init_store,
    marker_path,
    open_store,
    read_markers,
    verify_store,
)
from tests.stores import write_synthetic_store
from tests.test_cli_extract import FLAGS, flatten, invoke
from tests.videos import make_lossless_video, pattern_frames

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- stores
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny synthetic stores (3 shards of 3 videos, 20..40 frames, 16 frames per shard file)
    in three storage formats: float16 + zstd, int8 + zstd, float32 without compression."""
    d = tmp_path_factory.mktemp("pristine")
    out = {}
    for kind, dtype, codec in (("float16", "float16", "zstd"), ("int8", "int8", "zstd"), ("none", "float32", "none")):
        write_synthetic_store(d / kind, splits={"train": 6, "test": 3}, videos_per_shard=3, dtype=dtype, codec=codec)
        assert verify_store(d / kind) == []
        out[kind] = d / kind
    return out


def fresh(pristine: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    root = tmp_path / f"{kind}.zarr"
    shutil.copytree(pristine[kind], root)
    return root


def videos_in(root: Path, shard: str, rows: tuple[int, int] | None = None) -> list[str]:
    """Ids of a shard's videos (those overlapping frame rows [a, b) if given), from its marker."""
    m = json.loads(marker_path(root, shard).read_text())
    return [v["video_id"] for v in m["videos"]
            if rows is None or (v["offset"] < rows[1] and v["offset"] + v["length"] > rows[0])]


# ---------------------------------------------------------------------------------- corruptions
def flip(rel: str) -> Callable[[Path], None]:
    """Flip one bit in the middle of a file."""
    def apply(root: Path) -> None:
        p = root / rel
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x04
        p.write_bytes(bytes(b))
    return apply


def cut(rel: str, keep: float) -> Callable[[Path], None]:
    """Truncate a file to a fraction of its size (0: empty)."""
    def apply(root: Path) -> None:
        p = root / rel
        p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])
    return apply


def delete(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).unlink()


def swap(a: str, b: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        x, y = (root / a).read_bytes(), (root / b).read_bytes()
        (root / a).write_bytes(y)
        (root / b).write_bytes(x)
    return apply


def edit_label(shard: str) -> Callable[[Path], None]:
    """Change the label of a shard's first video in its marker (still valid JSON)."""
    def apply(root: Path) -> None:
        p = marker_path(root, shard)
        m = json.loads(p.read_text())
        m["videos"][0]["label"] = m["videos"][0]["label"] + 1
        p.write_text(json.dumps(m, indent=1))
    return apply


@dataclass(frozen=True)
class Fault:
    """A corruption, what verify must say, which read must fail, what --repair removes."""

    kind: str  # which pristine store
    apply: Callable[[Path], None]
    expect: tuple[str, ...]  # substrings of the verify output (flattened)
    read: tuple[str, str] | None  # (video, regex of the StoreError) or None: the data still read fine
    damaged: tuple[str, ...]  # shards --repair removes (store-level repairs: none, store verifies after)
    videos: tuple[str, tuple[int, int] | None] | None = None  # (shard, rows): the videos named


F = "shards/{s}/features/c/{i}/0/0/0"
FAULTS = {
    "deleted feature shard file": Fault(
        "float16", delete(F.format(s="00001", i=1)),
        ("shard 00001: shards/00001/features/c/1/0/0/0: missing (the marker records",),
        ("train-003", r"shards/00001/features/c/1/0/0/0: missing"), ("00001",), ("00001", (16, 32))),
    "deleted timestamps chunk": Fault(
        "float16", delete("shards/00001/timestamps/c/1"),
        ("shard 00001: shards/00001/timestamps/c/1: missing (the marker records",),
        ("train-005", r"shards/00001/timestamps/c/1: missing"), ("00001",), ("00001", (16, 32))),
    "shard files swapped between shards": Fault(
        "none", swap(F.format(s="00000", i=0), F.format(s="00001", i=0)),
        ("shard 00000: shards/00000/features/c/0/0/0/0: content does not match the SHA-256 in the marker",
         "shard 00001: shards/00001/features/c/0/0/0/0: content does not match the SHA-256 in the marker"),
        None, ("00000", "00001"), ("00000", (0, 16))),
    "label edited in a marker": Fault(
        "float16", edit_label("00002"),
        ("shard 00002: markers/00002.json: edited or damaged: its digest does not match",
         "marker and shard attributes disagree: video 'test-000': label 1 in the marker, 0 in the shard"),
        ("test-001", r"markers/00002.json was edited or damaged"), ("00002",), ("00002", None)),
    "truncated root zarr.json": Fault(
        "float16", cut("zarr.json", 0.5),
        ("zarr.json: root group metadata missing or damaged; --repair rewrites it from the header",), None, ()),
    "deleted array zarr.json": Fault(
        "float16", delete("shards/00002/features/zarr.json"),
        ("shard 00002: shards/00002/features/zarr.json: missing (the marker records",
         "shard 00002: shards/00002/features/zarr.json: array metadata missing or damaged"),
        ("test-002", r"shards/00002/features/zarr.json: missing"), ("00002",), ("00002", None)),
    "bit flip in an int8 store": Fault(
        "int8", flip(F.format(s="00000", i=0)),
        ("shard 00000: shards/00000/features/c/0/0/0/0: content does not match the SHA-256",),
        ("train-000", r"shards/00000/features/c/0/0/0/0: damaged, cannot be read \(ValueError: Stored and "
                      r"computed checksum do not match"), ("00000",), ("00000", (0, 16))),
    "bit flip in an uncompressed store": Fault(
        "none", flip(F.format(s="00000", i=0)),
        ("shard 00000: shards/00000/features/c/0/0/0/0: content does not match the SHA-256",),
        ("train-000", r"shards/00000/features/c/0/0/0/0: damaged, cannot be read \(ValueError: Stored and "
                      r"computed checksum"), ("00000",), ("00000", (0, 16))),
    "bit flip in a float16 store": Fault(
        "float16", flip(F.format(s="00000", i=0)),
        ("shard 00000: shards/00000/features/c/0/0/0/0: content does not match the SHA-256",),
        ("train-000", r"shards/00000/features/c/0/0/0/0: damaged, cannot be read"), ("00000",), ("00000", (0, 16))),
    "bit flip in int8 scales": Fault(
        "int8", flip("shards/00001/scales/c/0/0/0"),
        ("shard 00001: shards/00001/scales/c/0/0/0: content does not match the SHA-256",),
        ("train-003", r"shards/00001/scales/c/0/0/0: damaged, cannot be read"), ("00001",), ("00001", (0, 16))),
    "truncated shard file": Fault(
        "float16", cut(F.format(s="00001", i=0), 0.6),
        ("shard 00001: shards/00001/features/c/0/0/0/0:", "the marker records",
         "(truncated, emptied or replaced)"),
        ("train-003", r"shards/00001/features/c/0/0/0/0: \d+ bytes, the marker records"), ("00001",),
        ("00001", (0, 16))),
    "empty shard file": Fault(
        "int8", cut(F.format(s="00001", i=1), 0.0),
        ("shard 00001: shards/00001/features/c/1/0/0/0: 0 bytes, the marker records",),
        ("train-004", r"shards/00001/features/c/1/0/0/0: 0 bytes"), ("00001",), ("00001", (16, 32))),
    "truncated marker": Fault(
        "float16", cut("markers/00001.json", 0.5),
        ("shard 00001: markers/00001.json: marker unreadable (JSONDecodeError",),
        ("train-000", r"markers/00001.json: marker unreadable"), ("00001",)),
    "truncated array metadata": Fault(
        "float16", cut("shards/00000/timestamps/zarr.json", 0.5),
        ("shard 00000: shards/00000/timestamps/zarr.json:", "the marker records",
         "shard 00000: shards/00000/timestamps/zarr.json: array metadata missing or damaged"),
        ("train-001", r"shards/00000/timestamps/zarr.json: \d+ bytes, the marker records"), ("00000",),
        ("00000", None)),
    "truncated header": Fault(
        "float16", cut(HEADER_FILE, 0.5),
        ("freezeframe.json: missing or damaged; --repair restores it from the root zarr.json",),
        ("train-000", r"freezeframe.json is damaged"), ()),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_is_caught_refused_and_repaired(name: str, pristine: dict[str, Path], tmp_path: Path) -> None:
    fault = FAULTS[name]
    root = fresh(pristine, fault.kind, tmp_path)
    named_videos = videos_in(root, *fault.videos) if fault.videos else []
    fault.apply(root)

    r = invoke(["verify", str(root)])
    out = flatten(r.stdout)
    assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit), r.output
    for text in fault.expect:
        assert text in out, out
    if named_videos:  # the videos that file holds are named
        assert f"(videos {', '.join(named_videos)})" in out, out
    if fault.damaged:
        assert f"what to do: `freezeframe verify {root} --repair` removes these shards" in out, out
    else:
        assert "--repair" in out, out

    if fault.read:  # the reader refuses, naming the file
        video, match = fault.read
        with pytest.raises(StoreError, match=match):
            store = open_store(root)
            store.features(video)
            store.timestamps(video)
        if name != "truncated header" and name != "truncated marker":
            with pytest.raises(StoreError, match=match):
                open_store(root, in_memory=True)
    else:  # what is left readable reads as before
        store = open_store(root)
        original = open_store(pristine[fault.kind])
        for v in store.video_ids:
            if not any(v in videos_in(pristine[fault.kind], s) for s in fault.damaged):
                np.testing.assert_array_equal(store.features(v), original.features(v))

    r = invoke(["status", str(root)])  # never a traceback: a status line or one error line
    assert r.exception is None or isinstance(r.exception, (FreezeframeError, SystemExit)), r.exception
    assert r.exit_code == 0 or "--repair" in str(r.exception), r.output

    before = set(read_markers(pristine[fault.kind]))
    r = invoke(["verify", str(root), "--repair"])
    assert r.exit_code == 0, r.output
    assert set(read_markers(root)) == before - set(fault.damaged)  # exactly the damaged shards are gone
    for s in fault.damaged:
        assert not (root / "shards" / s).exists()
        assert f"shard {s}: marker and data removed" in flatten(r.stdout)
    left = verify_store(root)
    if fault.damaged:  # what remains is what a rerun of the extraction redoes
        assert left == [f"{len(fault.damaged)} planned shard(s) not complete: "
                        f"{sorted(int(s) for s in fault.damaged)}"], left
    else:
        assert left == [] and check_store(root).notes == []


def test_status_counts_an_unreadable_marker(pristine: dict[str, Path], tmp_path: Path) -> None:
    root = fresh(pristine, "float16", tmp_path)
    cut("markers/00001.json", 0.5)(root)
    r = invoke(["status", str(root)])
    assert r.exit_code == 0, r.output
    out = flatten(r.stdout)
    assert "shards 2/3 complete" in out and "1 unreadable marker(s) (00001)" in out


# ---------------------------------------------------------------------------------- old stores
def test_store_without_checksums_reads_and_verify_says_so(tmp_path: Path) -> None:
    """A store written before integrity version 1 reads as before; verify passes with a note,
    and still catches a deleted shard file (zarr would read it as zeros)."""
    root = tmp_path / "old"
    content = {"dtype": "float32", "codec": "zstd", "feature_shape": [2, 2, 4], "num_shards": 1, "num_videos": 2}
    init_store(root, {"content": content}, integrity=0)
    assert "integrity" in json.loads((root / HEADER_FILE).read_text())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 2, 2, 4)).astype(np.float32)
    w = ShardWriter.create(root, "00000", feature_shape=(2, 2, 4), dtype="float32", frames_per_file=8, integrity=0)
    for i, (a, b) in enumerate(((0, 12), (12, 20))):
        w.begin_video({"video_id": f"v{i}", "split": "train", "label": i, "label_name": None})
        w.append(x[a:b], np.arange(b - a) / 10.0)
        w.end_video()
    marker = w.finish()
    assert "files" not in marker and "digest" not in marker
    np.testing.assert_array_equal(open_store(root).features("v1"), x[12:20])

    r = invoke(["verify", str(root)])
    assert r.exit_code == 0, r.output
    out = flatten(r.stdout)
    assert "ok:" in out and "no checksums: 1 of 1 shard(s) (00000)" in out and "re-extract to get them" in out

    (root / "shards/00000/features/c/1/0/0/0").unlink()
    assert verify_store(root) == ["shard 00000: shards/00000/features/c/1/0/0/0: missing or empty (zarr would read "
                                  "it as zeros) (videos v0, v1)"]
    with pytest.raises(StoreError, match=r"features/c/1/0/0/0: missing or empty"):
        open_store(root).features("v0")


# ---------------------------------------------------------------------------------- real extraction
@dataclass(frozen=True)
class Real:
    manifest: Path
    store: Path  # pristine, never modified

    def args(self, store: Path) -> list[str]:
        return ["extract", "--manifest", str(self.manifest), "--store", str(store), *FLAGS, "--no-progress"]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Real:
    """4 tiny lossless videos extracted by ``freezeframe extract`` (random-init MobileNetV2,
    64 px, 5 fps, 2 videos per shard: shards 00000 and 00001)."""
    d = tmp_path_factory.mktemp("real")
    rows = [ManifestRow(f"v{i}", str(make_lossless_video(d / f"v{i}.mp4", pattern_frames(n, 32, 40, seed=i), 10)),
                        label=i % 2) for i, n in enumerate((8, 10, 6, 9))]
    manifest = write_manifest(rows, d / "manifest.jsonl")
    real = Real(manifest, d / "store")
    r = invoke(real.args(real.store))
    assert r.exit_code == 0, r.output
    assert verify_store(real.store) == []
    return real


def test_repair_then_rerun_reextracts_exactly_the_damaged_shard(real: Real, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(real.store, store)
    kept = marker_path(store, "00000")
    kept_bytes, kept_mtime = kept.read_bytes(), kept.stat().st_mtime_ns
    flip("shards/00001/features/c/0/0/0/0")(store)
    r = invoke(["verify", str(store)])
    assert r.exit_code == 1 and "damaged shard(s): 00001 (v2, v3)" in flatten(r.stdout), r.output
    with pytest.raises(StoreError, match="shards/00001/features/c/0/0/0/0: damaged"):
        open_store(store).features("v3")

    r = invoke(["verify", str(store), "--repair"])
    assert r.exit_code == 0, r.output
    assert "shard 00001: marker and data removed (2 videos: v2, v3)" in flatten(r.stdout)
    r = invoke(real.args(store))
    assert r.exit_code == 0, r.output
    assert "1 / 1" in flatten(r.stdout)  # shards done now / skipped: only the removed one redone
    assert (kept.read_bytes(), kept.stat().st_mtime_ns) == (kept_bytes, kept_mtime)
    assert verify_store(store) == []
    # re-extracted byte for byte: same files (SHA-256 table), same videos (digest)
    redone, original = read_markers(store)["00001"], read_markers(real.store)["00001"]
    assert redone["files"] == original["files"] and redone["digest"] == original["digest"]


@pytest.mark.parametrize("damage", ["truncated marker", "truncated root zarr.json", "truncated header"])
def test_extract_on_a_damaged_store_says_what_to_do(damage: str, real: Real, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(real.store, store)
    FAULTS[damage].apply(store)
    r = invoke(real.args(store))
    assert r.exit_code != 0 and isinstance(r.exception, StoreError), r.exception
    assert "--repair" in str(r.exception)
    assert invoke(["verify", str(store), "--repair"]).exit_code == 0
    r = invoke(real.args(store))
    assert r.exit_code == 0, r.output
    assert verify_store(store) == []


# ---------------------------------------------------------------------------------- creation
KILL_AFTER_HEADER = """
import os, signal, sys
import pipeline.store.header as header
real_create_once = header.create_once

def create_then_die(*args, **kwargs):
    real_create_once(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # right after the header is published, before the group

header.create_once = create_then_die
sys.argv = ["freezeframe", *sys.argv[1:]]
from freezeframe.cli import main
main()
"""


def test_kill_during_store_creation_then_rerun(real: Real, tmp_path: Path) -> None:
    """kill -9 right after the header is written (the state that used to wedge every rerun):
    the rerun completes the creation and extracts the same store."""
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_HEADER, *real.args(store)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert (store / HEADER_FILE).exists() and not (store / "zarr.json").exists()
    r = invoke(real.args(store))
    assert r.exit_code == 0, r.output
    assert verify_store(store) == []
    assert ({s: m["digest"] for s, m in read_markers(store).items()}
            == {s: m["digest"] for s, m in read_markers(real.store).items()})


def _synthetic_header() -> dict:
    return {"content": {"dtype": "float32", "codec": "zstd", "feature_shape": [2, 2, 4], "num_shards": 1,
                        "num_videos": 1}}


@pytest.mark.parametrize("state", ["partial temporary header", "header only", "header and root group"])
def test_every_interrupted_creation_is_completed_by_a_rerun(state: str, tmp_path: Path) -> None:
    """The on-disk states a kill -9 can leave during creation: each rerun completes it."""
    root = tmp_path / "store"
    init_store(tmp_path / "model", _synthetic_header())
    root.mkdir()
    if state == "partial temporary header":  # killed while writing the header under its private name
        full = (tmp_path / "model" / HEADER_FILE).read_text()
        (root / f".{HEADER_FILE}.4242.tmp").write_text(full[: len(full) // 3])
    else:
        shutil.copy(tmp_path / "model" / HEADER_FILE, root / HEADER_FILE)
        if state == "header and root group":
            shutil.copy(tmp_path / "model" / "zarr.json", root / "zarr.json")
    header = init_store(root, _synthetic_header())
    assert header["content"] == _synthetic_header()["content"] and header["integrity"] == 1
    w = ShardWriter.create(root, "00000", feature_shape=(2, 2, 4), dtype="float32", frames_per_file=4)
    w.begin_video({"video_id": "a", "split": "train", "label": 0, "label_name": None})
    w.append(np.ones((5, 2, 2, 4), np.float32), np.arange(5) / 10.0)
    w.end_video()
    w.finish()
    assert verify_store(root) == []
    assert (root / "zarr.json").read_bytes() == (tmp_path / "model" / "zarr.json").read_bytes()


@pytest.mark.parametrize("flags", [["--codec", "lz4"], ["--set", "spatial_pool=0"], ["--set", "frames_per_file=0"]])
def test_a_bad_value_leaves_no_store_behind(flags: list[str], real: Real, tmp_path: Path) -> None:
    store = tmp_path / "new"
    r = invoke([*real.args(store), *flags])
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError), r.exception
    assert not store.exists()  # so the corrected rerun is a fresh extraction


def test_integrity_bench_counts_4_bytes_per_chunk(tmp_path: Path) -> None:
    """``bench.integrity`` runs, and the checksums cost exactly 4 bytes per chunk: one chunk per
    frame of features (and scales), one per shard file of timestamps."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "bench.integrity", "--frames", "40", "--grid", "2", "--channels", "8",
                        "--frames-per-file", "16", "--repeats", "1", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["dtype"]: r for r in json.loads(out.read_text())["rows"]}
    per_frame_arrays = {"float16": 1, "int8": 2, "float32": 1}
    for dtype, row in rows.items():
        extra = round((row["v1"]["bytes_per_frame"] - row["v0"]["bytes_per_frame"]) * 40)
        assert extra == 4 * (40 * per_frame_arrays[dtype] + 3), (dtype, extra)  # 3 timestamps files of 16
        assert row["v1"]["marker_bytes"] > row["v0"]["marker_bytes"]
