"""Stage-2 training on tiny cached-feature stores (train/loop.py, train/tasks/, freezeframe/cli/train.py).

Resume equality (a real SIGKILL of `freezeframe pretrain`, and a fine-tuning run from a PRP
init stopped mid-epoch), refusals before any training step, the stats/evaluate/report
commands, and a sanity check that the TMM learns temporal order where average pooling cannot.
Every run uses a store written by the test and a tiny model, single-threaded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigMismatchError, FreezeframeError
from tests.stores import TINY_TRAIN, SynthStore, ramp_features, write_synthetic_store, train_config
from train.config import resolve_train_config
from train.data import DataError
from train.loop import fit as train
from train.rundir import RunDir
from train.significance import paired_outcomes
from train.stats import tmm_stats

BIN = Path(sys.executable).parent
FREEZEFRAME = str(BIN / "freezeframe")
#: subprocesses: one torch thread (2 shared cores: more threads only wait on each other)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "220", "NO_COLOR": "1"}

#: a tiny model and tiny clips: 8 train videos, 2 per step -> 4 steps per epoch
TINY = [*TINY_TRAIN, "test.num_clips=3"]
STEPS_PER_EPOCH = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prp_run(store: SynthStore, tmp_path_factory: pytest.TempPathFactory, one_torch_thread_per_module: None) -> Path:
    """A finished tiny PRP pretraining run (2 epochs, seed 1, one torch thread)."""
    return train(_cfg("prp", store, tmp_path_factory.mktemp("prp") / "run", "optim.epochs=2", "seed=1")).run_dir


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch):
    """Run the real ``freezeframe`` typer app in-process (commands registered once)."""
    from typer.testing import CliRunner

    from freezeframe import cli

    monkeypatch.setenv("COLUMNS", "220")
    return CliRunner().invoke(cli.app, args)


def _cfg(task: str, store: SynthStore | Path, run_dir: Path, *extra: str):
    return train_config(task, store, run_dir, *TINY, *extra)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


def _metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _train_lines(run_dir: Path) -> list[dict]:
    return [m for m in _metrics(run_dir) if m["kind"] == "train"]


def _line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------------------
# 3. resume equality
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_killed_with_sigkill_resumes_to_identical_weights(store: SynthStore, tmp_path: Path) -> None:
    epochs = 15
    total = epochs * STEPS_PER_EPOCH
    # uninterrupted reference (in-process; same single-thread arithmetic as the CLI runs)
    ref = train(_cfg("prp", store, tmp_path / "ref", f"optim.epochs={epochs}", "seed=5"))
    assert ref.steps == total

    run = tmp_path / "killed"
    cmd = [FREEZEFRAME, "pretrain", "--store", str(store.path), "--run-dir", str(run), "--epochs", str(epochs),
           "--seed", "5", *[a for s in TINY for a in ("--set", s)]]
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        try:
            while _line_count(run / "metrics.jsonl") < 6 or not (run / "checkpoints" / "last.pt").exists():
                assert proc.poll() is None, (tmp_path / "first.log").read_text()
                assert time.monotonic() < deadline, "the run never got going"
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)  # mid epoch 2 (or a little later), never graceful
        finally:
            if proc.poll() is None:  # also when an assertion above failed: never leave it running
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "checkpoints" / "final.pt").exists(), "the run finished before it was killed"
    # the resume point: last.pt, or prev.pt when the kill landed between save_checkpoint's two
    # renames (last.pt -> prev.pt, then the new last.pt): the same lookup the resume makes
    killed_at = int(RunDir(run).latest_checkpoint()["step"])
    assert 1 <= killed_at < total

    res = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming" in res.stderr and f"{total} steps" in res.stdout
    _assert_same_weights(run / "checkpoints" / "final.pt", tmp_path / "ref" / "checkpoints" / "final.pt")
    # metrics: every step exactly once, and the same losses as the uninterrupted run
    lines = _train_lines(run)
    assert [m["step"] for m in lines] == list(range(1, total + 1))
    ref_lines = _train_lines(tmp_path / "ref")
    assert [(m["loss"], m["lr"]) for m in lines] == [(m["loss"], m["lr"]) for m in ref_lines]
    assert json.loads((run / "summary.json").read_text())["steps"] == total


def test_finetune_from_prp_stopped_mid_epoch_resumes_to_identical_weights(
        store: SynthStore, prp_run: Path, tmp_path: Path) -> None:
    ft = ("model.num_classes=3", "optim.epochs=3", "eval_every=1", "seed=2", f'init="{prp_run}"')
    full = train(_cfg("finetune", store, tmp_path / "full", *ft))
    part_dir = tmp_path / "part"
    stopped = train(_cfg("finetune", store, part_dir, *ft, "max_steps=5"))  # mid epoch 2 of 3
    assert stopped.steps == 5
    # the same command without the early stop continues from step 5
    resumed = train(_cfg("finetune", store, part_dir, *ft))
    assert resumed.steps == full.steps == 3 * STEPS_PER_EPOCH
    _assert_same_weights(part_dir / "checkpoints" / "final.pt", full.run_dir / "checkpoints" / "final.pt")
    assert resumed.top1 == full.top1 and resumed.final_loss == full.final_loss
    assert json.loads((part_dir / "eval.json").read_text()) == json.loads((full.run_dir / "eval.json").read_text())
    lines = _train_lines(part_dir)
    assert [m["step"] for m in lines] == list(range(1, 13))
    assert [m["loss"] for m in lines] == [m["loss"] for m in _train_lines(full.run_dir)]
    evals = [m["step"] for m in _metrics(part_dir) if m["kind"] == "eval"]
    assert len(evals) == len(set(evals)) and evals[-1] == 12

    # fine-tuning starts from the PRP TMM with a fresh head. The first step already learns
    # (warmup starts at step + 1: lr = peak / warmup_steps, never 0), and AdamW's first step moves
    # every parameter by lr * g / (|g| + eps) <= lr, plus the decoupled decay lr * wd * |p|: the
    # TMM is the PRP one within that bound (float32 parameters)
    init = _state(prp_run / "checkpoints" / "final.pt")
    first = train(_cfg("finetune", store, tmp_path / "first", *ft, "max_steps=1"))
    lr = _metrics(first.run_dir)[0]["lr"]
    assert lr == pytest.approx(1e-3 * 2 / 64 / STEPS_PER_EPOCH, rel=1e-12)  # peak (batch 2, 1 rank) / warmup steps
    got = _state(first.run_dir / "checkpoints" / "final.pt")
    params = [k for k in init if k.startswith("tmm.") and k.endswith(("weight", "bias"))]
    assert len(params) >= 9
    wd = 1e-6
    for k in params:
        # + float32 rounding of p - update and of the difference read here: 2 ulp of |p|
        bound = lr * (1 + wd * init[k].abs()) + 2 * torch.finfo(torch.float32).eps * init[k].abs() + 1e-12
        assert torch.all((got[k] - init[k]).abs() <= bound), k
    assert any(not torch.equal(got[k], init[k]) for k in params)  # and it did learn
    assert not torch.equal(got["tmm.blocks.0.bn_a.running_mean"], init["tmm.blocks.0.bn_a.running_mean"])
    assert got["head.fc2.weight"].shape == (3, 16) and init["head.fc2.weight"].shape == (4, 16)


def test_rerunning_a_finished_run_changes_nothing(store: SynthStore, tmp_path: Path) -> None:
    cfg = _cfg("finetune", store, tmp_path / "ft", "model.num_classes=3", "optim.epochs=1", "seed=0")
    first = train(cfg)
    before = (tmp_path / "ft" / "metrics.jsonl").read_text()
    weights = _state(first.run_dir / "checkpoints" / "final.pt")
    again = train(cfg)
    assert again.steps == first.steps and again.top1 == first.top1
    assert (tmp_path / "ft" / "metrics.jsonl").read_text() == before  # no duplicated eval line
    after = _state(first.run_dir / "checkpoints" / "final.pt")
    assert all(torch.equal(weights[k], after[k]) for k in weights)


# --------------------------------------------------------------------------------------
# 5. refusals before training
# --------------------------------------------------------------------------------------
def _assert_nothing_trained(run_dir: Path) -> None:
    assert _metrics(run_dir) == []
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    assert not (run_dir / "checkpoints" / "final.pt").exists()


@pytest.mark.parametrize(
    ("task", "extra", "error", "message"),
    [
        ("prp", ["model.tmm.in_channels=32"], ConfigMismatchError,
         r"C=16 channels but model.tmm.in_channels=32; set model.tmm.in_channels=16"),
        ("prp", ['data.train_split="val"'], DataError, r"split 'val' .* has no videos"),
        ("finetune", ["model.num_classes=3", 'data.test_split="val"'], DataError, r"split 'val' .* has no videos"),
        ("finetune", ["model.num_classes=3", 'clip.short_video="clamp"', "clip.stride=50"], DataError,
         r"longer than every video .* wrap-around is off"),
        ("prp", ['prp.short_video="clamp"', "prp.stride=50"], DataError, r"shorter than a PRP clip .* wrap-around is off"),
        ("finetune", ["model.num_classes=2"], ConfigMismatchError, r"labels up to 2 .* set model.num_classes=3"),
        ("prp", ["model.num_classes=3"], ConfigMismatchError, r"4 rate classes .* set model.num_classes=4"),
    ],
    ids=["in-channels", "empty-train-split", "empty-test-split", "clip-clamp", "prp-clamp", "num-classes", "prp-classes"],
)
def test_refusals_before_any_training_step(store: SynthStore, tmp_path: Path, task: str, extra: list[str],
                                           error: type[Exception], message: str) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(error, match=message):
        train(_cfg(task, store, run_dir, "optim.epochs=1", *extra))
    _assert_nothing_trained(run_dir)


def test_refuses_init_from_another_architecture(store: SynthStore, prp_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ft"
    with pytest.raises(ConfigMismatchError, match=r"(?s)different model architecture.*tmm.hidden: checkpoint 8 vs config 12"):
        train(_cfg("finetune", store, run_dir, "model.num_classes=3", "model.tmm.hidden=12", f'init="{prp_run}"'))
    _assert_nothing_trained(run_dir)
    with pytest.raises(FreezeframeError, match="no checkpoint at"):
        train(_cfg("finetune", store, run_dir, "model.num_classes=3", f'init="{tmp_path / "nowhere"}"'))
    _assert_nothing_trained(run_dir)


def test_refuses_to_resume_a_run_with_another_config(store: SynthStore, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(_cfg("prp", store, run_dir, "optim.epochs=2", "max_steps=3"))
    last = run_dir / "checkpoints" / "last.pt"
    before = (last.read_bytes(), (run_dir / "metrics.jsonl").read_text(), (run_dir / "config.json").read_text())
    with pytest.raises(ConfigMismatchError, match=r"(?s)holds a run with a different config; use a new run directory.*"
                       r"optim.base_lr: run has 0.001, this command asks 0.5"):
        train(_cfg("prp", store, run_dir, "optim.epochs=2", "optim.base_lr=0.5"))
    after = (last.read_bytes(), (run_dir / "metrics.jsonl").read_text(), (run_dir / "config.json").read_text())
    assert after == before  # nothing trained, nothing rewritten
    # runtime knobs may change between attempts: this one resumes and finishes
    res = train(_cfg("prp", store, run_dir, "optim.epochs=2", "log_every=3", "checkpoint_every=2"))
    assert res.steps == 2 * STEPS_PER_EPOCH


def test_unknown_config_keys_are_refused(store: SynthStore, tmp_path: Path) -> None:
    with pytest.raises(FreezeframeError, match=r"unknown config key\(s\) \['optim.lrr'\]"):
        _cfg("prp", store, tmp_path / "run", "optim.lrr=1")
    with pytest.raises(FreezeframeError, match=r"unknown config key\(s\) \['model.tmm.hiden'\]"):
        _cfg("prp", store, tmp_path / "run", "model.tmm.hiden=4")
    # on the command line: a one-line error (exit 2), no traceback, nothing written
    res = subprocess.run([FREEZEFRAME, "pretrain", "--store", str(store.path), "--run-dir", str(tmp_path / "run"),
                          "--set", "optim.lrr=1"], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "optim.lrr" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------
# 6. stats, evaluate, report
# --------------------------------------------------------------------------------------
def test_stats_json_matches_tmm_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    res = _cli(["stats", "--json", "--in-channels", "16", "--hidden", "8", "--out-channels", "24", "--blocks", "2",
                "--temporal-kernel", "3", "--frames", "4", "--grid", "2", "--num-classes", "5", "--mlp-dim", "16"],
               monkeypatch)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert list(got) == ["tmm_conv_params", "tmm_params", "head_params", "tmm_macs"]
    s = tmm_stats(16, 24, 8, 2, 3, 4, 2, num_classes=5, mlp_dim=16)
    assert got == {"tmm_conv_params": s.tmm_conv_params, "tmm_params": s.tmm_params,
                   "head_params": s.head_params, "tmm_macs": s.tmm_macs}
    # closed form: block 0 = 16*8*3 + 8*8*9 + 8*24 + 16*24 (shortcut); block 1 = 24*8*3 + 576 + 192
    conv = (384 + 576 + 192 + 384) + (576 + 576 + 192)
    assert got["tmm_conv_params"] == conv
    assert got["tmm_params"] == conv + (16 + 16 + 48 + 48) + (16 + 16 + 48)
    assert got["head_params"] == 24 * 16 + 2 * 16 + 16 * 5 + 5
    assert got["tmm_macs"] == conv * 4 * 2 * 2
    # and the real modules agree
    from train.models import ModelConfig, TMMConfig, build_model

    m = build_model(ModelConfig(tmm=TMMConfig(16, 8, 24, 2, 3), mlp_dim=16, num_classes=5))
    assert sum(p.numel() for p in m.tmm.parameters()) == got["tmm_params"]
    assert sum(p.numel() for p in m.head.parameters()) == got["head_params"]


def test_evaluate_and_report_commands(store: SynthStore, prp_run: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ft = ("model.num_classes=3", "optim.epochs=2", "seed=4")
    scratch = train(_cfg("finetune", store, tmp_path / "scratch", *ft))
    pre = train(_cfg("finetune", store, tmp_path / "pretrained", *ft, f'init="{prp_run}"'))
    assert scratch.top1 is not None and pre.top1 is not None

    trained_eval = json.loads((pre.run_dir / "eval.json").read_text())
    (pre.run_dir / "eval.json").unlink()
    (pre.run_dir / "confusion.png").unlink()
    res = _cli(["evaluate", str(pre.run_dir)], monkeypatch)
    assert res.exit_code == 0, res.output
    ev = json.loads((pre.run_dir / "eval.json").read_text())
    assert ev == trained_eval  # same checkpoint, same deterministic test views
    assert (pre.run_dir / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"top-1 {100 * pre.top1:.2f}%" in res.stdout and "4 videos" in res.stdout

    res = _cli(["report", str(scratch.run_dir), str(pre.run_dir)], monkeypatch)
    assert res.exit_code == 0, res.output
    assert "Δ-Acc" in res.stdout  # the Delta-Acc table is printed only for paired runs
    delta = 100 * (pre.top1 - scratch.top1)
    pair_rows = [line.split() for line in res.stdout.splitlines() if "scratch" in line and "pretrained" in line]
    assert len(pair_rows) == 1, res.stdout  # one (PRP init, scratch) pair
    # ... then the exact paired McNemar p of the two runs on the same test videos (their eval.json)
    assert pair_rows[0][-4:-1] == [f"{100 * scratch.top1:.2f}", f"{100 * pre.top1:.2f}", f"{delta:+.2f}"], res.stdout
    ev_s = json.loads((scratch.run_dir / "eval.json").read_text())
    assert ev_s["video_ids"] == ev["video_ids"] and ev_s["targets"] == ev["targets"]
    p = paired_outcomes(ev["predictions"], ev_s["predictions"], ev["targets"]).p_value
    assert pair_rows[0][-1] == ("<0.001" if p < 0.001 else f"{p:.3f}"), res.stdout


# --------------------------------------------------------------------------------------
# 7. the TMM learns temporal order; average pooling cannot
# --------------------------------------------------------------------------------------
def test_tmm_learns_temporal_order_where_avgpool_stays_at_chance(tmp_path: Path) -> None:
    ramps = write_synthetic_store(tmp_path / "ramps.zarr", splits={"train": 16, "test": 10}, num_classes=2,
                                  lengths=(30, 40), features=ramp_features(), seed=1)
    common = ["model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
              "model.num_classes=2", "model.tmm.temporal_kernel=3", "clip.num_frames=8", "clip.stride=2",
              "test.num_clips=5", "test.num_frames=8", "test.stride=2", "optim.batch_size=4", "optim.epochs=12",
              "optim.base_lr=0.05", "optim.warmup_epochs=1", "optim.weight_decay=0.0", "data.workers=0", "seed=0",
              "checkpoint_every=1000", "log_every=1000"]
    acc = {}
    for arch in ("tmm", "avgpool"):
        cfg = resolve_train_config("finetune", None, None, [f'data.store="{ramps.path}"',
                                                            f'run_dir="{tmp_path / arch}"', f'model.arch="{arch}"',
                                                            *common])
        acc[arch] = train(cfg).top1
    assert acc["tmm"] >= 0.9, acc
    assert acc["avgpool"] <= 0.7, acc


def test_dataset_configs_apply_the_task_table() -> None:
    """`--dataset X` applies [common] then the task's own table ([pretrain] for PRP)."""
    from pipeline.paths import data_root
    from train.config import resolve_train_config

    root = data_root()  # the dataset file's paths are under the data root (pipeline.paths), not the cwd
    pre = resolve_train_config("prp", "ucf101", None, [])
    assert (pre.optim.epochs, pre.run_dir, pre.model.num_classes) == (800, str(root / "runs/ucf101-prp"), 4)
    ft = resolve_train_config("finetune", "ucf101", None, ['init=""'])
    assert (ft.model.num_classes, ft.run_dir, ft.init) == (101, str(root / "runs/ucf101-finetune"), "")
    assert resolve_train_config("finetune", "ucf101", None, []).init == str(root / "runs/ucf101-prp")
