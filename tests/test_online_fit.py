"""Online pre-training from a stream (train/online_fit.py) and the decoded source (extract/source.py).

* The online source (PyAV decode + frozen backbone, chunk by chunk) gives the clips of a store
  extracted from the same videos, within the store dtype's rounding.
* A run stopped at a safe point in the middle of the stream and rerun ends exactly like an
  uninterrupted run (model, MoCo key encoder and queue, replay buffer: ``torch.equal``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from extract.source import OnlineFeatureSource
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.store import open_store
from tests.stores import SynthStore, make_real_store, write_synthetic_store
from train.config import resolve_train_config
from train.online import OnlineClipStream, decoded_chunks, store_chunks
from train.online_fit import OnlineConfig, StreamInfo, fit_online
from train.rundir import RunDir
from train.streams import ClipSet

TINY = ["model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
        "data.workers=0", "log_every=1", "checkpoint_every=2", "seed=5", "optim.batch_size=3"]
MOCO = ["moco.proj_hidden=16", "moco.proj_dim=8", "moco.queue_size=32", "moco.stream.clip_frames=6",
        "moco.stream.stride_frames=4", "moco.stream.streams=2", "moco.momentum=0.9"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SynthStore:
    return write_synthetic_store(tmp_path_factory.mktemp("on") / "s.zarr", splits={"train": 4},
                                 video_lengths=[30, 22, 41, 26])


def _run(store: SynthStore, run: Path, task: str, extra: list[str], online: OnlineConfig):
    st = open_store(store.path)
    cfg = resolve_train_config(task, None, None, [f'run_dir="{run}"', *TINY, *extra])
    ids = st.split_ids("train")
    return fit_online(cfg, ids, store_chunks(st, chunk=7), StreamInfo(st.feature_shape, str(st.path)), online)


def _final(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("task,extra,online", [
    ("moco", MOCO, OnlineConfig(buffer=2, replay=8, updates_per_batch=2)),
    ("mfm", ["mfm.stream.clip_frames=6", "mfm.stream.stride_frames=3", "mfm.decoder_hidden=8",
             'mfm.stream.last_clip="mask"'], OnlineConfig(buffer=4)),
    ("distill", ["distill.stream.clip_frames=5", "distill.stream.stride_frames=5"], OnlineConfig(warmup_steps=3)),
])
def test_online_stop_and_resume_equals_uninterrupted(store, tmp_path, task, extra, online) -> None:
    full = _run(store, tmp_path / "full", task, extra, online)
    assert full.steps >= 6
    part = tmp_path / "part"
    stopped = _run(store, part, task, [*extra, f"max_steps={full.steps // 2}"], online)
    assert 0 < stopped.steps < full.steps
    resumed = _run(store, part, task, extra, online)
    assert resumed.steps == full.steps and resumed.final_loss == full.final_loss
    a, b = _final(full.run_dir), _final(part)
    assert a["clips"] == b["clips"] and a["stream"] == b["stream"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if task == "moco":
        for k in a["task"]["key"]:
            assert torch.equal(a["task"]["key"][k], b["task"]["key"][k]), k
        assert torch.equal(a["task"]["queue"]["keys"], b["task"]["queue"]["keys"])
        assert torch.equal(a["task"]["queue"]["vids"], b["task"]["queue"]["vids"])
        assert len(a["replay"]["items"]) == 8
        for x, y in zip(a["replay"]["items"], b["replay"]["items"]):
            assert torch.equal(x["features"], y["features"])
    losses = lambda r: [m["loss"] for m in RunDir(r).read_metrics() if m["kind"] == "train"]  # noqa: E731
    assert losses(part) == losses(full.run_dir)
    assert all(m["frames_per_s"] > 0 for m in RunDir(part).read_metrics())


def test_online_refusals(store, tmp_path) -> None:
    with pytest.raises(ConfigMismatchError, match="time order"):
        _run(store, tmp_path / "a", "moco", [*MOCO, 'moco.stream.order="random"', "moco.stream.streams=1"], OnlineConfig())
    with pytest.raises(FreezeframeError, match="two views"):
        _run(store, tmp_path / "b", "moco", [*MOCO, 'moco.positive="nearby"'], OnlineConfig())
    with pytest.raises(FreezeframeError, match="cannot train from a stream"):
        _run(store, tmp_path / "c", "prp", ["prp.num_frames=4"], OnlineConfig())
    with pytest.raises(ValueError, match="replay"):
        OnlineConfig(updates_per_batch=2)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decoded_stream_equals_the_store(tmp_path: Path, dtype: str) -> None:
    """Decode + backbone chunk by chunk (clips in time order, resumed in the middle) gives the
    clips of the store extracted from the same videos, within the store dtype's rounding."""
    real = make_real_store(tmp_path, dtype=dtype)
    st = open_store(real.path)
    source = OnlineFeatureSource.for_store(st)
    ids = st.split_ids("train")
    cs = ClipSet.build(ids, [st.num_frames(v) for v in ids], 8, 5, "mask")
    clips = list(OnlineClipStream(ids, decoded_chunks(source), 8, 5, last_clip="mask"))
    assert [(ids[c.video], c.start) for c in clips] == [(ids[cs.video[k]], cs.start[k]) for k in range(len(cs))]
    for c, k in zip(clips, range(len(cs))):
        stored = st.features(ids[c.video], cs.indices(k))
        tol = 1e-5 if dtype == "float32" else np.abs(stored) * 2.0**-11 + 1e-5  # float16: half an ulp
        assert np.all(np.abs(c.features - stored) <= tol)
        assert np.allclose(c.timestamps, st.timestamps(ids[c.video])[cs.indices(k)])
    # a stream resumed after clip 3 re-decodes but gives the same following clips
    rest = list(OnlineClipStream(ids, decoded_chunks(source), 8, 5, last_clip="mask", position=clips[3].after))
    assert [(c.video, c.start) for c in rest] == [(c.video, c.start) for c in clips[4:]]
    assert all(np.array_equal(a.features, b.features) for a, b in zip(rest, clips[4:]))
    # as_stored rounds like the store
    if dtype == "float16":
        rounded = list(OnlineClipStream(ids[:1], decoded_chunks(source, as_stored=True), 8, 5))
        stored = st.features(ids[0], np.arange(8))
        assert np.all(np.abs(rounded[0].features - stored) <= 2 * (np.abs(stored) * 2.0**-11) + 1e-5)
