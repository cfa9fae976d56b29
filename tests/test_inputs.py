"""Remote and packed inputs (issue 12, deliverable 2): a real HTTP server in a thread serves
real videos and tar shards, failing on purpose (503, connection reset, 404); decoding through
``extract.inputs`` retries the transient errors, counts them apart from failures, gives up
with stage ``fetch``, reads tar members by a cached index, and a missing optional library is
one line with its pip command before any work."""
from __future__ import annotations

import http.server
import importlib.util
import socket
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import extract.inputs as inputs
from extract.config import ExtractConfig
from extract.decode import DecodeError, Geometry, decode_all
from extract.runner import run_extract
from extract.workers import ChunkEvent, DecodeJob, DecodePool
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.remote import MissingLibraryError, require_fs_library, url_protocols
from tests.videos import make_lossless_video, pattern_frames

GEOM = Geometry(size=32, mode="squash")
KWARGS = dict(geometry=GEOM, fps=None, chunk_size=8, threads=1, min_frames=1)


class _Flaky(http.server.ThreadingHTTPServer):
    """Serves ``files`` (name -> bytes) with Range support; the next ``fail`` requests fail
    with ``mode``: ``"503"`` (Service Unavailable) or ``"reset"`` (connection closed unanswered)."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.fail, self.mode, self.requests = files, 0, "503", 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Flaky

    def log_message(self, *args: object) -> None:
        pass

    def _serve(self, body: bool) -> None:
        srv = self.server
        with srv.lock:
            srv.requests += 1
            failing = srv.fail > 0
            srv.fail -= failing
        if failing and srv.mode == "reset":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if failing:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = srv.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        lo, hi = 0, len(data)
        rng = self.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            lo, hi = int(a), min(len(data), int(b) + 1 if b else len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(hi - lo))
        self.end_headers()
        if body:
            self.wfile.write(data[lo:hi])

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(False)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("remote")
    out = {f"v{i}": make_lossless_video(d / f"v{i}.mp4", pattern_frames(12 + 4 * i, 32, 32, seed=i), 25)
           for i in range(3)}
    with tarfile.open(d / "shard.tar", "w") as tf:
        for name, p in out.items():
            tf.add(p, arcname=f"{name}.mp4")
            (d / f"{name}.json").write_text('{"label": 0}')
            tf.add(d / f"{name}.json", arcname=f"{name}.json")
    out["shard"] = d / "shard.tar"
    return out


@pytest.fixture
def server(videos: dict[str, Path]) -> Iterator[_Flaky]:
    srv = _Flaky({p.name: p.read_bytes() for p in videos.values()})
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "POLICY", inputs.RetryPolicy(attempts=4, base_s=0.01, max_s=0.05))
    inputs.take_retries()


@pytest.mark.parametrize("mode,fail", [("503", 2), ("reset", 5)])
def test_transient_errors_are_retried_and_counted(server: _Flaky, videos: dict[str, Path], mode: str,
                                                  fail: int, fast_retries: None) -> None:
    """Failed requests (503, or connections closed without an answer) are retried with
    backoff; the frames are exactly those of the local file, and the retries are counted
    (fsspec tries GET after a failed HEAD and aiohttp resends once on a dropped connection,
    so several failed requests may make one retry)."""
    server.fail, server.mode = fail, mode
    got = decode_all(f"{server.url}/v1.mp4", **KWARGS)
    want = decode_all(videos["v1"], **KWARGS)
    np.testing.assert_array_equal(got.frames, want.frames)
    np.testing.assert_array_equal(got.timestamps, want.timestamps)
    assert server.fail == 0 and 1 <= inputs.take_retries() <= fail


def test_retries_exhausted_is_stage_fetch_and_404_is_not_retried(server: _Flaky, fast_retries: None) -> None:
    server.fail = 10**6
    with pytest.raises(DecodeError) as e:
        decode_all(f"{server.url}/v1.mp4", **KWARGS)
    assert e.value.stage == "fetch" and "after 4 attempts" in e.value.reason and "--retry-failed" in str(e.value)
    assert inputs.take_retries() == 3
    server.fail = 0
    with pytest.raises(DecodeError) as e:
        decode_all(f"{server.url}/missing.mp4", **KWARGS)
    assert e.value.stage == "open" and "not found" in e.value.reason
    assert inputs.take_retries() == 0  # a 404 is an answer, not a transient error


def test_worker_reports_retries_apart_from_failures(server: _Flaky, videos: dict[str, Path]) -> None:
    """Through the decode pool (a spawned worker, default retry policy): two 503s (HEAD, then
    fsspec's GET fallback) are one retry on a video that succeeds; a missing file is a failure
    at stage ``open`` with no retry."""
    server.fail, server.mode = 2, "503"
    jobs = [DecodeJob(0, "v0", f"{server.url}/v0.mp4"), DecodeJob(1, "gone", f"{server.url}/gone.mp4"),
            DecodeJob(2, "v2", f"{server.url}/v2.mp4")]
    with DecodePool(1, KWARGS, timeout_s=60.0) as pool:
        events = list(pool.run(jobs))
    ends = [e for e in events if not isinstance(e, ChunkEvent)]
    assert [(type(e).__name__, e.index, e.retries) for e in ends] == \
        [("DoneEvent", 0, 1), ("FailedEvent", 1, 0), ("DoneEvent", 2, 0)]
    assert ends[1].failure.stage == "open"
    frames = np.concatenate([e.frames for e in events if isinstance(e, ChunkEvent) and e.index == 2])
    np.testing.assert_array_equal(frames, decode_all(videos["v2"], **KWARGS).frames)


def test_tar_members_local_and_remote_use_one_index_per_tar(server: _Flaky, videos: dict[str, Path]) -> None:
    """Members of a local and of a remote (HTTP) shard decode to the frames of the files that
    were packed; the shard's index is read once and reused: a second member costs no header
    scan (a couple of requests, not one per member)."""
    inputs._TAR_INDEX.clear()
    for outer in (str(videos["shard"]), f"{server.url}/shard.tar"):
        for name in ("v0", "v2"):
            got = decode_all(f"tar://{name}.mp4::{outer}", **KWARGS)
            np.testing.assert_array_equal(got.frames, decode_all(videos[name], **KWARGS).frames)
    assert len(inputs._TAR_INDEX) == 2
    index = inputs.tar_index(f"{server.url}/shard.tar")
    assert set(index) == {"v0.mp4", "v0.json", "v1.mp4", "v1.json", "v2.mp4", "v2.json"}
    before = server.requests
    assert inputs.tar_index(f"{server.url}/shard.tar") is index
    decode_all(f"tar://v1.mp4::{server.url}/shard.tar", **KWARGS)
    assert server.requests - before <= 3
    with pytest.raises(DecodeError) as e:
        decode_all(f"tar://nope.mp4::{videos['shard']}", **KWARGS)
    assert e.value.stage == "open" and "nope.mp4" in e.value.reason


def test_one_filesystem_instance_per_process() -> None:
    assert inputs.filesystem("http") is inputs.filesystem("http")
    assert inputs.filesystem("memory") is not inputs.filesystem("http")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_missing_library_is_one_line_before_any_work(tmp_path: Path) -> None:
    assert url_protocols("tar://a.mp4::gs://b/x.tar") == ["tar", "gs"]
    with pytest.raises(MissingLibraryError, match=r"gs:// URLs need gcsfs, which is not installed; pip install gcsfs"):
        require_fs_library("tar://a.mp4::gs://b/x.tar")
    manifest = tmp_path / "m.jsonl"
    write_manifest([ManifestRow("a", "gs://bucket/a.mp4")], manifest)
    cfg = ExtractConfig(manifest=str(manifest), store=str(tmp_path / "store"), random_weights=True,
                        progress=False)
    with pytest.raises(MissingLibraryError, match="pip install gcsfs"):
        run_extract(cfg)
    assert not (tmp_path / "store").exists()


def test_webdataset_manifest_lists_remote_tars(videos: dict[str, Path]) -> None:
    """``freezeframe manifest webdataset --shards <URL>`` on a bucket-like file system (fsspec's
    in-memory one stands in for s3://): the rows point into the remote tars and decode to
    the packed files' frames; a folder URL and a glob URL select the same shards."""
    import fsspec

    from manifests import build_manifest

    mem = fsspec.filesystem("memory")
    mem.pipe("/k400/00000.tar", videos["shard"].read_bytes())
    mem.pipe("/k400/notes.txt", b"not a shard")
    try:
        rows = build_manifest("webdataset", shards=["memory://k400/"], split="train")
        assert [r.video_id for r in rows] == ["v0", "v1", "v2"]
        assert rows[0].path.startswith("tar://v0.mp4::memory://") and rows[0].path.endswith("/k400/00000.tar")
        assert build_manifest("webdataset", shards=["memory://k400/*.tar"], split="train") == rows
        got = decode_all(rows[2].path, **KWARGS)
        np.testing.assert_array_equal(got.frames, decode_all(videos["v2"], **KWARGS).frames)
    finally:
        mem.rm("/k400", recursive=True)
