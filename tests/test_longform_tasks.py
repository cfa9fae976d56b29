"""The long-form pretext tasks (moco, mfm, distill) through the real loop (train.loop.fit).

Clip streams visit the store in stream order (the loop must not shuffle them); a run stopped
in the middle of a stream and resumed ends with the same weights, MoCo key encoder and queue
(``torch.equal``) as an uninterrupted run; fine-tuning starts from each pretext's temporal module.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.store import open_store
from tests.stores import SynthStore, train_config, write_synthetic_store
from train.loop import fit
from train.rundir import RunDir
from train.streams import ClipSampler, ClipSet

TINY = ["model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
        "optim.warmup_epochs=0", "data.workers=0", "log_every=1", "checkpoint_every=2", "seed=3"]
MOCO = ["moco.proj_hidden=16", "moco.proj_dim=8", "moco.queue_size=64", "moco.stream.clip_frames=6",
        "moco.stream.stride_frames=4", "moco.momentum=0.9"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SynthStore:
    return write_synthetic_store(tmp_path_factory.mktemp("lf") / "s.zarr", splits={"train": 5, "test": 4},
                                 video_lengths=[30, 22, 41, 18, 26, 20, 24, 22, 28], num_classes=4)


def _cfg(task: str, store: SynthStore, run: Path, *extra: str):
    return train_config(task, store, run, *TINY, *extra)


def _ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("order,streams", [("sequential", 1), ("sequential", 2), ("random", 1)])
def test_moco_visits_clips_in_stream_order(store: SynthStore, tmp_path: Path, order: str, streams: int) -> None:
    run = fit(_cfg("moco", store, tmp_path / "r", *MOCO, f'moco.stream.order="{order}"',
                   f"moco.stream.streams={streams}", "optim.batch_size=4", "optim.epochs=1"))
    st = open_store(store.path)
    ids = st.split_ids("train")
    cs = ClipSet.build(ids, [st.num_frames(v) for v in ids], 6, 4)
    expect = cs.video[ClipSampler(cs, order, streams=streams, seed=3).order(0)][: run.steps * 4]
    queue = _ckpt(run.run_dir)["task"]["queue"]
    # keys are enqueued batch after batch: the queue's video ids replay the visiting order
    assert queue["vids"][: run.steps * 4].tolist() == expect.tolist()


@pytest.mark.parametrize("task,extra", [
    ("moco", [*MOCO, 'moco.stream.order="sequential"', "moco.stream.streams=2", 'moco.negatives="different_video"',
              'moco.momentum_schedule="cosine"', 'moco.positive="nearby"', "moco.nearby_frames=3"]),
    ("mfm", ["mfm.stream.clip_frames=6", "mfm.stream.stride_frames=3", "mfm.decoder_hidden=8", "mfm.mask_ratio=0.75",
             'mfm.stream.last_clip="mask"']),
    ("distill", ["distill.stream.clip_frames=6", "distill.stream.stride_frames=5", 'distill.stream.order="random"']),
])
def test_stop_mid_stream_and_resume_equals_uninterrupted(store: SynthStore, tmp_path: Path, task: str, extra: list) -> None:
    args = [*extra, "optim.batch_size=4", "optim.epochs=2"]
    full = fit(_cfg(task, store, tmp_path / "full", *args))
    part = tmp_path / "part"
    stop = full.steps // 2 + 1  # mid epoch 1 and past a checkpoint (every 2 steps)
    assert fit(_cfg(task, store, part, *args, f"max_steps={stop}")).steps == stop
    resumed = fit(_cfg(task, store, part, *args))
    assert resumed.steps == full.steps and resumed.final_loss == full.final_loss
    a, b = _ckpt(full.run_dir), _ckpt(part)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if task == "moco":
        for k in a["task"]["key"]:
            assert torch.equal(a["task"]["key"][k], b["task"]["key"][k]), k
        assert torch.equal(a["task"]["queue"]["keys"], b["task"]["queue"]["keys"])
        assert torch.equal(a["task"]["queue"]["vids"], b["task"]["queue"]["vids"])
        assert a["task"]["queue"]["ptr"] == b["task"]["queue"]["ptr"]
        # the key encoder moved away from its start and differs from the query
        q = a["model"]
        assert any(not torch.equal(a["task"]["key"][k], q[k]) for k in q if q[k].is_floating_point())


def test_finetune_starts_from_each_pretext(store: SynthStore, tmp_path: Path) -> None:
    pre = {
        "moco": fit(_cfg("moco", store, tmp_path / "moco", *MOCO, "optim.batch_size=4", "optim.epochs=1")),
        "mfm": fit(_cfg("mfm", store, tmp_path / "mfm", "mfm.stream.clip_frames=6", "mfm.decoder_hidden=8",
                        "optim.batch_size=4", "optim.epochs=1")),
    }
    for name, run in pre.items():
        ft = _cfg("finetune", store, tmp_path / f"ft-{name}", f'init="{run.run_dir}"', "clip.num_frames=4",
                  "clip.stride=2", "test.num_clips=2", "test.num_frames=4", "test.stride=2", "optim.batch_size=2",
                  "optim.epochs=1", "max_steps=1", "optim.base_lr=0")
        out = fit(ft)
        got = _ckpt(out.run_dir)["model"]
        src = _ckpt(run.run_dir)["model"]
        tmm = [k for k in src if k.startswith("tmm.") and "num_batches" not in k and "running" not in k]
        assert tmm and all(torch.equal(got[k], src[k]) for k in tmm), name  # lr 0: the loaded weights


def test_distill_from_a_run_teacher_leaves_it_untouched(store: SynthStore, tmp_path: Path) -> None:
    teacher = fit(_cfg("moco", store, tmp_path / "teacher", *MOCO, "optim.batch_size=4", "optim.epochs=1"))
    before = _ckpt(teacher.run_dir)["model"]
    run = fit(_cfg("distill", store, tmp_path / "student", 'distill.teacher="run"', f'distill.teacher_run="{teacher.run_dir}"',
                   'distill.loss="kl"', "distill.stream.clip_frames=6", "optim.batch_size=4", "optim.epochs=8", "optim.base_lr=0.02"))
    after = _ckpt(teacher.run_dir)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    student = _ckpt(run.run_dir)["model"]
    assert student["head.fc2.weight"].shape == before["head.fc2.weight"].shape  # the teacher's 8 outputs
    losses = [m["loss"] for m in RunDir(run.run_dir).read_metrics() if m["kind"] == "train"]
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])

