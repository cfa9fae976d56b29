"""MoCo under DDP (2 CPU ranks, gloo): the queue gathers every rank's keys, as MoCo does.

Each rank enqueues the keys and video ids of both ranks (all_gather in rank order) after each
step, so the queue is identical on both ranks, holds both ranks' keys, and its video ids are
the ones both ranks visited (the ``different_video`` filter compares against them); a run
stopped mid-stream and resumed under DDP ends equal (``torch.equal``) to an uninterrupted one.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.store import open_store
from tests.stores import write_synthetic_store
from train.streams import ClipSampler, ClipSet

WORLD = 2
BATCH = 2  # per rank
TINY = ["model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
        "optim.warmup_epochs=0", "data.workers=0", "log_every=1", "checkpoint_every=2", "seed=3",
        f"optim.batch_size={BATCH}", "optim.epochs=2", 'device="cpu"',
        "moco.proj_hidden=16", "moco.proj_dim=8", "moco.queue_size=64", "moco.stream.clip_frames=6",
        "moco.stream.stride_frames=4", "moco.momentum=0.9", 'moco.stream.order="sequential"',
        'moco.negatives="different_video"']
LENGTHS = [30, 22, 41, 18, 26]  # train videos: 7 + 5 + 9 + 4 + 6 = 31 clips of 6 frames at stride 4


def _worker(rank: int, root: str, store: str, stop: int) -> None:
    """Three fits on 2 ranks: uninterrupted, stopped at ``stop`` steps, resumed. Each rank saves
    its in-memory queue after each fit (rank 0 alone writes the run directories)."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    import train.tasks.moco as moco_task  # MoCoTask.build makes its MoCoState from here
    from train.config import resolve_train_config
    from train.loop import fit

    states = []

    class Recorded(moco_task.MoCoState):  # the real MoCoState, remembered so each rank can save its queue
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            states.append(self)

    moco_task.MoCoState = Recorded
    out = Path(root)
    for i, (name, run, extra) in enumerate((("full", "full", []), ("stopped", "part", [f"max_steps={stop}"]),
                                            ("resumed", "part", []))):
        # fit reuses this process group and tears it down at the end: a fresh rendezvous per fit
        dist.init_process_group("gloo", init_method=f"file://{out / f'rendezvous{i}'}", rank=rank, world_size=WORLD)
        fit(resolve_train_config("moco", None, None, [f'data.store="{store}"', f'run_dir="{out / run}"', *TINY, *extra]))
        assert not dist.is_initialized()
        torch.save(states[-1].queue.state_dict(), out / f"{name}-rank{rank}.pt")


@pytest.mark.slow
def test_ddp_moco_queue_gathers_both_ranks_and_resumes_exactly(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 5, "test": 2},
                                  video_lengths=[*LENGTHS, 20, 20], num_classes=2)
    st = open_store(store.path)
    ids = st.split_ids("train")
    clips = ClipSet.build(ids, [st.num_frames(v) for v in ids], 6, 4)
    order = ClipSampler(clips, "sequential").order(0)
    usable = len(order) // WORLD * WORLD  # DistributedSampler(shuffle=False, drop_last=True)
    per_rank = [order[r:usable:WORLD] for r in range(WORLD)]  # rank r's clips, in its visiting order
    steps_per_epoch = len(per_rank[0]) // BATCH
    total = 2 * steps_per_epoch
    stop = total // 2 + 1  # mid epoch 1, past a checkpoint
    mp.spawn(_worker, args=(str(tmp_path), str(store.path), stop), nprocs=WORLD, join=True)

    q = {(name, r): torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True)
         for name in ("full", "stopped", "resumed") for r in range(WORLD)}
    for name in ("full", "stopped", "resumed"):  # the same queue on both ranks
        a, b = q[name, 0], q[name, 1]
        assert torch.equal(a["keys"], b["keys"]) and torch.equal(a["vids"], b["vids"]) and a["ptr"] == b["ptr"]
    # per step: rank 0's BATCH keys, then rank 1's; the same clips in both epochs (sequential order)
    expect = []
    for _epoch in range(2):
        for s in range(steps_per_epoch):
            for r in range(WORLD):
                expect += clips.video[per_rank[r][s * BATCH:(s + 1) * BATCH]].tolist()
    full = q["full", 0]
    assert len(expect) == WORLD * BATCH * total <= 64
    assert full["vids"][: len(expect)].tolist() == expect
    assert full["ptr"] == len(expect) and (full["vids"][len(expect):] == -1).all()
    for s in range(total):  # rank 1's keys are its own, not a copy of rank 0's
        block = full["keys"][s * WORLD * BATCH:(s + 1) * WORLD * BATCH]
        assert not torch.equal(block[:BATCH], block[BATCH:])
        assert torch.allclose(block.norm(dim=1), torch.ones(WORLD * BATCH), atol=1e-5)  # L2-normalised keys
    assert q["stopped", 0]["ptr"] == WORLD * BATCH * stop
    # resumed under DDP == uninterrupted: queues on both ranks, weights and key encoder of final.pt
    for r in range(WORLD):
        assert torch.equal(q["resumed", r]["keys"], q["full", r]["keys"])
        assert torch.equal(q["resumed", r]["vids"], q["full", r]["vids"])
    a, b = (torch.load(tmp_path / run / "checkpoints" / "final.pt", weights_only=True) for run in ("full", "part"))
    assert a["step"] == b["step"] == total
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["task"]["key"]:
        assert torch.equal(a["task"]["key"][k], b["task"]["key"][k]), k
    assert torch.equal(a["task"]["queue"]["keys"], full["keys"])  # rank 0 checkpoints the shared queue
