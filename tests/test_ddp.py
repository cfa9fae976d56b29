"""Two-rank data parallel training on CPU with gloo (train/distributed.py, train/loop.py).

* In 2 spawned processes (``file://`` rendezvous): NaiveSyncBatchNorm on each half of a
  batch == plain BatchNorm on the whole batch (outputs, input gradients, running
  statistics); DDP gradients of the real model (BN synchronised) == one process on the union
  batch; and ``train.loop.fit`` leaves bit-identical replicas on both ranks, equal to the
  ``final.pt`` rank 0 writes.
* The real launcher: ``torchrun --nproc_per_node 2 freezeframe pretrain`` completes, writes
  one run directory, and the loss goes down.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.stores import ramp_features, write_synthetic_store

BIN = Path(sys.executable).parent
WORLD = 2
TINY = [
    "model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
    "prp.num_frames=4", "prp.clips_per_video=2", "optim.batch_size=2", "optim.warmup_epochs=1",
    "data.workers=0", "log_every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------
# in spawned processes
# --------------------------------------------------------------------------------------
def _check_sync_bn(rank: int) -> None:
    """NaiveSyncBatchNorm on this rank's half == BatchNorm on the full batch (3-D and 1-D BN)."""
    from train.distributed import NaiveSyncBatchNorm

    for shape, bn_cls in (((8, 6, 3, 4, 4), nn.BatchNorm3d), ((8, 6), nn.BatchNorm1d)):
        g = torch.Generator().manual_seed(0)  # the same full batch on every rank
        x_full = (3.0 * torch.randn(shape, generator=g) + 1.5).requires_grad_(True)
        w_out = torch.randn(shape, generator=g)  # a loss that weighs every output differently
        ref = bn_cls(6, momentum=0.3)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(6, generator=g))
            ref.bias.copy_(torch.randn(6, generator=g))
        sync = NaiveSyncBatchNorm(6, momentum=0.3)
        sync.load_state_dict(ref.state_dict())
        half = slice(rank * 4, rank * 4 + 4)
        x = x_full.detach()[half].clone().requires_grad_(True)
        for _ in range(2):  # two steps: running statistics accumulate the same way
            out = sync(x)
            full = ref(x_full)
        torch.testing.assert_close(out, full[half], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sync.running_mean, ref.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sync.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
        assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == 2
        # gradients: sum of per-rank losses == the full-batch loss
        (out * w_out[half]).sum().backward()
        (full * w_out).sum().backward()
        torch.testing.assert_close(x.grad, x_full.grad[half], rtol=1e-4, atol=1e-5)
        gw = sync.weight.grad.clone()
        dist.all_reduce(gw)  # affine grads are per-rank partial sums
        torch.testing.assert_close(gw, ref.weight.grad, rtol=1e-4, atol=1e-5)
        # eval mode uses the (identical) running statistics on every rank, no collective
        sync.eval()
        ref.eval()
        torch.testing.assert_close(sync(x.detach()), ref(x_full.detach())[half], rtol=1e-5, atol=1e-5)


def _check_ddp_grads_equal_union_batch(rank: int) -> None:
    """DDP (NaiveSyncBatchNorm) gradients of the real model == one process on the union batch."""
    from train.distributed import convert_sync_batchnorm
    from train.models import ModelConfig, TMMConfig, build_model

    torch.manual_seed(1)
    single = build_model(ModelConfig(tmm=TMMConfig(16, 8, 24, 1, 3), mlp_dim=16, num_classes=4))
    replica = DistributedDataParallel(convert_sync_batchnorm(copy.deepcopy(single), torch.device("cpu")))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, 2, 2, 16, generator=g)  # (B, T, H, W, C)
    y = torch.randint(0, 4, (8,), generator=g)
    half = slice(rank * 4, rank * 4 + 4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    loss = loss_fn(replica(x[half]), y[half])
    loss.backward()
    full = loss_fn(single(x), y)
    full.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / WORLD, full.detach(), rtol=1e-5, atol=1e-6)
    got = dict(replica.module.named_parameters())
    for name, p in single.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for name, b in single.named_buffers():
        torch.testing.assert_close(dict(replica.module.named_buffers())[name], b, rtol=1e-5, atol=1e-6)


def _worker(rank: int, init_file: str, store: str, run_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    _check_sync_bn(rank)
    _check_ddp_grads_equal_union_batch(rank)

    # the loop, on the process group made above (train.distributed.setup reuses it)
    import train.tasks.base as engine  # Task.build looks build_model up here
    from train.loop import fit
    from train.config import resolve_train_config

    built = []
    real_build = engine.build_model

    def keep(cfg):  # the VideoModel that becomes this rank's replica
        built.append(real_build(cfg))
        return built[-1]

    engine.build_model = keep
    cfg = resolve_train_config("prp", None, None, [f'data.store="{store}"', f'run_dir="{run_dir}"', *TINY,
                                                   "optim.epochs=3", "seed=3", "device=\"cpu\""])
    res = fit(cfg)
    assert not dist.is_initialized()  # torn down
    assert res.steps == 3 * 2  # 8 train videos / 2 ranks / 2 per rank = 2 steps per epoch
    torch.save(built[0].state_dict(), Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_sync_bn_ddp_grads_and_engine_replicas(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr")
    run_dir = tmp_path / "run"
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(store.path), str(run_dir), str(tmp_path)),
             nprocs=WORLD, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    final = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)
    assert r0.keys() == r1.keys() == final["model"].keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"replicas differ in {k}"
        assert torch.equal(r0[k], final["model"][k]), f"final.pt differs from the replicas in {k}"
    assert final["step"] == 6
    assert json.loads((run_dir / "provenance.json").read_text())["world_size"] == WORLD


# --------------------------------------------------------------------------------------
# the real launcher
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_ranks_pretrain(tmp_path: Path) -> None:
    # features that rise over time: the playback rate shows in their slope, PRP learns quickly
    store = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 16, "test": 2}, lengths=(24, 40),
                                  num_classes=1, features=ramp_features())
    runs = tmp_path / "runs"
    overrides = [*TINY, "optim.base_lr=0.1", "checkpoint_every=5"]
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(WORLD), "--master_port", str(_free_port()),
           str(BIN / "freezeframe"), "pretrain", "--store", str(store.path), "--run-dir", str(runs / "ddp"),
           "--epochs", "12", "--seed", "0", *[a for s in overrides for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [p.name for p in runs.iterdir()] == ["ddp"]  # one run directory, written by rank 0
    assert [p.name for p in tmp_path.iterdir() if p.name != "s.zarr"] == ["runs"]
    run = runs / "ddp"
    prov = json.loads((run / "provenance.json").read_text())
    assert (prov["world_size"], prov["per_rank_batch"], prov["steps_per_epoch"]) == (WORLD, 2, 4)
    assert prov["peak_lr"] == pytest.approx(0.1 * 2 * WORLD / 64)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 49))  # one writer: each step once
    ckpt = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert ckpt["step"] == 48 and not any(k.startswith("module.") for k in ckpt["model"])
    assert int(ckpt["model"]["head.bn.num_batches_tracked"]) == 48
    # training converges under DDP
    first = sum(m["loss"] for m in lines[:8]) / 8
    last = sum(m["loss"] for m in lines[-8:]) / 8
    assert last < first - 0.2, (first, last)

    # and follows one process training on the union batch (2 ranks x 2 videos = 4 videos per
    # step, the same videos per step, BN statistics over all 4): same losses step by step
    from train.config import resolve_train_config
    from train.loop import fit as train

    single = overrides[:]
    single[single.index("optim.batch_size=2")] = "optim.batch_size=4"
    cfg = resolve_train_config("prp", None, None, [f'data.store="{store.path}"', f'run_dir="{tmp_path / "one"}"',
                                                   "optim.epochs=12", "seed=0", *single])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)
    ref = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in ref] == pytest.approx([m["lr"] for m in lines], rel=1e-12)
    assert [m["loss"] for m in ref] == pytest.approx([m["loss"] for m in lines], rel=2e-3)


# --------------------------------------------------------------------------------------
# evaluation over all ranks
# --------------------------------------------------------------------------------------
def _eval_worker(rank: int, init_file: str, store: str, run_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from train.config import resolve_train_config
    from train.loop import fit

    fit(resolve_train_config("finetune", None, None, [
        f'data.store="{store}"', f'run_dir="{run_dir}"', *TINY, "clip.num_frames=4", "test.num_clips=3",
        "test.num_frames=4", "test.stride=2", "model.num_classes=3", "optim.epochs=2", "eval_every=1",
        'device="cpu"']))


@pytest.mark.slow
def test_multiview_evaluation_is_shared_by_the_ranks(tmp_path: Path) -> None:
    """Each rank scores its share of the test videos (7: an uneven split); the gathered result
    equals one process scoring all of them with the same final weights."""
    from train.config import load_train_config
    from train.evals import get_evaluation
    from train.models import build_model
    from train.rundir import RunDir
    from pipeline.store import open_store

    store = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 8, "test": 7}, num_classes=3)
    run = RunDir(tmp_path / "run")
    mp.spawn(_eval_worker, args=(str(tmp_path / "rendezvous"), str(store.path), str(run.path)),
             nprocs=WORLD, join=True)
    got = run.read_eval("multiview")
    assert got["num_videos"] == 7
    cfg = load_train_config(run.read_config())
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(run.final, weights_only=True)["model"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = get_evaluation("multiview").run(model, open_store(store.path), cfg, torch.device("cpu")).to_json()
    finally:
        torch.set_num_threads(threads)  # later tests in this process keep the default thread count
    assert (got["top1"], got["top5"], got["confusion"]) == (ref["top1"], ref["top5"], ref["confusion"])
    evals = [m for m in run.read_metrics() if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4]  # periodic and final, written once by rank 0
