"""Stores on object storage, against a real S3 API server (moto's server mode, tests/s3.py).

Extraction to ``s3://`` gives the same store as to a local folder; ``status``, ``verify`` and
training read it; a dead writer's lease runs out and the rerun takes its shard over without
duplicates; racing claimants get exactly one winner; ranks of one job claim shards
dynamically; a missing file-system library is named with its install command before any work.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from extract.runner import run_extract
from pipeline.errors import StoreError
from pipeline.store import (
    LeaseLost,
    ShardWriter,
    open_store,
    read_markers,
    shard_claim,
    store_fs,
    store_status,
    verify_store,
)
from pipeline.store.fs import Lease
from pipeline.store.layout import lock_key
from tests.s3 import new_bucket
from tests.test_extract import Corpus, cfg_for, make_corpus
from train.config import resolve_train_config
from train.loop import fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("videos"), 5, seed=40)  # 3 shards of 2 videos


@pytest.fixture(scope="module")
def stores(corpus: Corpus, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The same tiny manifest extracted to a local folder and to ``s3://<bucket>/x.zarr``."""
    local = tmp_path_factory.mktemp("local") / "x.zarr"
    url = f"{new_bucket()}/x.zarr"
    # the S3 run names its endpoint in the config too (the environment names the same one)
    for store, opts in ((local, {}), (url, {"endpoint_url": s3_endpoint})):
        s = run_extract(cfg_for(corpus.manifest, store, storage_options=opts))
        assert (s.shards_done, s.videos_done, s.failures) == (3, 5, [])
    return local, url


def assert_same_contents(got: str | Path, want: str | Path) -> None:
    """Same videos, entries, features and timestamps (bytes), same header content."""
    a, b = open_store(got), open_store(want)
    assert a.content == b.content
    assert a.video_ids == b.video_ids
    for v in b.video_ids:
        assert a.meta(v) == b.meta(v)
        assert a.features(v).tobytes() == b.features(v).tobytes(), v
        assert a.timestamps(v).tobytes() == b.timestamps(v).tobytes(), v


def cli(args: list[str]) -> tuple[int, str]:
    from freezeframe.cli import app

    r = CliRunner().invoke(app, args)
    return r.exit_code, r.output


# ------------------------------------------------------------------------------ extract, status, verify
def test_extraction_to_s3_gives_the_local_store_and_status_verify_read_it(stores: tuple[Path, str],
                                                                         s3_endpoint: str) -> None:
    local, url = stores
    assert not (REPO / "s3:").exists() and not Path("s3:").exists()  # no local folder named after the URL
    assert_same_contents(url, local)
    assert open_store(url).header["config"]["storage_options"] == ["endpoint_url"]  # names, never values
    fs = store_fs(url)
    assert {"freezeframe.json", "zarr.json", "markers", "shards", "locks"} <= set(fs.list(""))
    assert fs.list("markers") == ["00000.json", "00001.json", "00002.json"]
    assert verify_store(url) == []
    st = store_status(url)
    assert (st.complete_shards, st.planned_shards, st.videos_stored, st.in_progress_shards, st.writing_shards) == (
        3, 3, 5, [], [])
    code, out = cli(["status", url, "--storage-option", f"endpoint_url={s3_endpoint}"])
    assert code == 0 and "shards 3/3 complete" in out, out
    code, out = cli(["verify", url])
    assert code == 0 and "is complete and consistent" in out, out
    # damage is found remotely too: an emptied shard file
    name = next(k for k in fs.files("shards/00001") if "/c/" in k)
    data = fs.read_bytes(f"shards/00001/{name}")
    fs.write_atomic(f"shards/00001/{name}", b"")
    try:
        code, out = cli(["verify", url, "--quick"])
        assert code == 1 and "00001" in out and name in out, out
        with pytest.raises(StoreError, match="00001"):
            open_store(url).features(read_markers(url)["00001"]["videos"][0]["video_id"])
    finally:
        fs.write_atomic(f"shards/00001/{name}", data)
    assert verify_store(url) == []


def test_a_rerun_on_a_complete_s3_store_does_nothing(corpus: Corpus, stores: tuple[Path, str]) -> None:
    _, url = stores
    s = run_extract(cfg_for(corpus.manifest, url))
    assert (s.shards_done, s.shards_skipped, s.shards_busy) == (0, 3, [])


# ------------------------------------------------------------------------------ training
@pytest.mark.usefixtures("one_torch_thread")
def test_training_from_the_s3_store_equals_training_from_the_local_one(stores: tuple[Path, str],
                                                                      tmp_path: Path) -> None:
    local, url = stores
    tiny = ["model.tmm.in_channels=1280", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
            "clip.num_frames=4", "clip.stride=2", "test.num_clips=2", "test.num_frames=4", "test.stride=2",
            "optim.batch_size=2", "optim.warmup_epochs=1", "optim.epochs=2", "data.workers=0", "seed=3",
            'init=""']
    runs = {}  # S3: read lazily, in a forked DataLoader worker; local: read into RAM first
    for name, store, mode, workers in (("s3", url, "no", 1), ("local", local, "yes", 0)):
        cfg = resolve_train_config("finetune", None, None, [f'data.store="{store}"', f'run_dir="{tmp_path / name}"',
                                                            f'data.in_memory="{mode}"', *tiny, f"data.workers={workers}"])
        runs[name] = fit(cfg).run_dir
    a = torch.load(runs["s3"] / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(runs["local"] / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same features: same weights
    ev = {k: json.loads((r / "eval.json").read_text()) for k, r in runs.items()}
    assert ev["s3"]["top1"] == ev["local"]["top1"] and ev["s3"]["video_ids"] == ["vid03"]


# ------------------------------------------------------------------------------ claims
def test_racing_claimants_get_exactly_one_winner_also_for_an_expired_lease(s3_bucket: str) -> None:
    fs = store_fs(f"{s3_bucket}/race.zarr")
    dead = Lease(fs, "locks/b.lock", 0.2)
    assert dead.acquire().held  # a holder that died at once (no heartbeat): generation 0 expires
    time.sleep(0.3)
    for key, gen in (("locks/a.lock", 0), ("locks/b.lock", 1)):
        n = 8
        start, hold = threading.Barrier(n), threading.Barrier(n)
        held: list[bool] = []

        def claimant() -> None:
            start.wait()
            with fs.claim(key, lease_s=30) as c:
                held.append(c.held)
                hold.wait()  # the winner keeps its claim until everybody has tried

        threads = [threading.Thread(target=claimant) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(held) == [False] * (n - 1) + [True], key
        assert fs.list(key) == [f"{g:06d}.json" for g in range(gen + 1)]


def test_heartbeats_keep_a_lease_and_a_lapsed_holder_cannot_commit(s3_bucket: str) -> None:
    fs = store_fs(f"{s3_bucket}/lease.zarr")
    with shard_claim(fs, "00000", lease_s=0.8) as mine:
        assert mine.held
        time.sleep(1.5)  # > the lease: only the heartbeat keeps it
        with shard_claim(fs, "00000", lease_s=0.8) as other:
            assert not other.held and other.expires is not None and other.expires > time.time()
        mine.check()  # still ours
    frozen = Lease(fs, lock_key("00001"), 0.3)
    claim = frozen.acquire()  # a process that stops heartbeating (frozen, swapped out)
    time.sleep(0.4)
    with shard_claim(fs, "00001", lease_s=30) as taker:
        assert taker.held
        with pytest.raises(LeaseLost):
            claim.check()


def test_a_dead_ranks_shard_is_taken_over_by_a_rank_that_finished_when_its_lease_runs_out(
        corpus: Corpus, stores: tuple[Path, str], s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks claim dynamically: rank 0 of 2 finds its own shards done, then takes rank 1's. Rank 1
    died while writing shard 00001 (half-written, its lease still live): rank 0 waits for the
    lease to run out and redoes the shard. The store equals an uninterrupted one: no video
    twice, none of the dead writer's frames. (An independent ``--shard-index`` job does only
    its own shards.)"""
    local, _ = stores
    url = f"{s3_bucket}/resume.zarr"
    cfg = cfg_for(corpus.manifest, url, lease_seconds=2.0)
    job = run_extract(dataclasses.replace(cfg, shard_index=0, num_shards=2))
    assert sorted(read_markers(url)) == ["00000", "00002"] and job.shards_done == 2
    fs = store_fs(url)
    assert Lease(fs, lock_key("00001"), 2.0).acquire().held  # rank 1's claim; it died: no heartbeat
    w = ShardWriter.create(url, "00001", feature_shape=(2, 2, 1280), dtype="float32", frames_per_file=8)
    w.begin_video({"video_id": "vid02", "split": "train"})
    w.append(np.full((9, 2, 2, 1280), 7.0, np.float32), np.arange(9.0))
    assert store_status(url).writing_shards == ["00001"]

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    s = run_extract(cfg)
    assert (s.shards_done, s.shards_skipped, s.shards_busy, s.videos_done) == (1, 2, [], 2)
    assert verify_store(url) == []
    assert_same_contents(url, local)
    assert fs.list(lock_key("00001")) == ["000000.json", "000001.json"]  # taken over: generation 1
    assert store_status(url).writing_shards == []


# ------------------------------------------------------------------------------ missing libraries
def test_a_missing_file_system_library_is_named_with_its_install_command_before_any_work(tmp_path: Path) -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(StoreError, match=r"gs:// stores need gcsfs, which is not installed; pip install gcsfs"):
        store_fs("gs://bucket/x.zarr")
    missing = tmp_path / "no-such-manifest.jsonl"  # never read: the store is checked first
    for args in (["extract", "--manifest", str(missing), "--store", "gs://bucket/x.zarr", "--random-weights"],
                 ["status", "gs://bucket/x.zarr"], ["verify", "gs://bucket/x.zarr"]):
        code, out = cli(args)
        assert code == 2 and "pip install gcsfs" in out and "Traceback" not in out, out
        assert "no-such-manifest" not in out
    with pytest.raises(StoreError, match="unknown protocol 'nope'"):
        store_fs("nope://bucket/x.zarr")
