"""`make demo` end to end, in its quick form (real weights, tiny benchmark, 2 epochs), and
its reproducibility: the same seed gives the same weights (docs/demo.md, "Reproducibility")."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from extract.weights import mobilenet_checkpoint
from tests.stores import write_synthetic_store


def test_demo_training_is_the_same_alone_or_side_by_side(tmp_path: Path) -> None:
    """The demo's runs (the synth-motion config, 4x4x1280 features) end with ``torch.equal``
    weights and equal test logits whether they train one after another in this process or side
    by side in worker processes, and on ``train_threads`` threads whatever the caller's count (a
    different count gives different float reductions in the backward). A run that starts from
    another (``init``) is chained after it."""
    from freezeframe.demo.advise import DemoConfig, DemoRun, _plan_training
    from train.runpool import train_chains

    store = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 16, "test": 4}, num_classes=4,
                                  lengths=(16, 24), grid=(4, 4), channels=1280)
    cfg = DemoConfig(pretrain_epochs=1, finetune_epochs=2, seeds=2, train_threads=1, runs=(
        DemoRun("prp-kt3", "prp", "tmm", 3, seeded=False), DemoRun("tmm-kt3-scratch", "finetune", "tmm", 3),
        DemoRun("tmm-kt3-prp", "finetune", "tmm", 3, init="prp-kt3", seeded=False)))
    cfg = dataclasses.replace(cfg, synth=dataclasses.replace(cfg.synth, tasks=("motion",)))
    dirs = {}
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count must not reach the training
    try:
        for workers in (1, 2):
            chains, run_dirs = _plan_training(cfg, {"motion": store.path}, tmp_path / f"runs{workers}")
            assert [[Path(c.run_dir).name for c in chain] for chain in chains] == [
                ["prp-kt3", "tmm-kt3-prp"], ["tmm-kt3-scratch"], ["tmm-kt3-scratch-s1"]]
            train_chains(chains, workers=workers, threads=cfg.train_threads, console=Console(quiet=True))
            assert torch.get_num_threads() == 2  # restored afterwards
            dirs[workers] = [d for ds in run_dirs["motion"].values() for d in ds]
            assert _plan_training(cfg, {"motion": store.path}, tmp_path / f"runs{workers}")[0] == []  # all done
    finally:
        torch.set_num_threads(before)
    assert [d.name for d in dirs[1]] == ["tmm-kt3-scratch", "tmm-kt3-scratch-s1", "tmm-kt3-prp"]
    assert (tmp_path / "runs2" / "motion" / "tmm-kt3-prp.log").stat().st_size > 0  # worker logs
    for one, two in zip(dirs[1], dirs[2]):
        a, b = (torch.load(d / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)["model"]
                for d in (one, two))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert [json.loads((d / "provenance.json").read_text())["torch_threads"] for d in (one, two)] == [1, 1]
        assert json.loads((one / "eval.json").read_text()) == json.loads((two / "eval.json").read_text())
    assert json.loads((dirs[1][0] / "eval.json").read_text()) != json.loads((dirs[1][1] / "eval.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(mobilenet_checkpoint() is None, reason="MobileNetV2 weights not cached: run `make weights`")
def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path: Path) -> None:
    from freezeframe.demo import run_demo
    from freezeframe.demo.advise import QUICK
    from pipeline.store import open_store, verify_store

    report = run_demo(tmp_path / "demo", quick=True, only=["advise"])
    text = report.read_text()
    adv = tmp_path / "demo" / "advise"
    for task in ("motion", "appearance"):
        store = adv / "stores" / f"{task}.zarr"
        assert verify_store(store) == []
        s = open_store(store)
        assert s.attrs["content"]["backbone"] == "mobilenetv2-imagenet"
        assert s.attrs["content"]["weights_sha256"]  # the real checkpoint, not random weights
        assert len(s) == 4 * (QUICK.synth.train_per_class + QUICK.synth.test_per_class)
        assert (adv / f"comparison-{task}.png").stat().st_size > 2000
        for run in QUICK.runs:
            assert (adv / "runs" / task / run.name / "summary.json").exists()
    for run in QUICK.runs:
        if run.task == "finetune":
            assert f"| {run.name} |" in text
    assert "chance" in text and "## Timings" in text and "](advise/comparison-motion.png)" in text
    # rerunning is cheap: every step is found complete
    assert run_demo(tmp_path / "demo", quick=True, only=["advise"]) == report


def test_demo_refuses_an_unknown_section(tmp_path: Path) -> None:
    from freezeframe.demo import run_demo
    from pipeline.errors import FreezeframeError

    with pytest.raises(FreezeframeError, match="unknown demo section"):
        run_demo(tmp_path, only=["nope"])
    assert not (tmp_path / "report.md").exists()


def test_report_statistics_pair_videos_and_check_the_claim() -> None:
    """The demo's report states per-seed Wilson intervals, exact McNemar tests on the same test
    videos, and whether kt = 3 beats average pooling by >= 40 points with disjoint intervals."""
    from freezeframe.demo.advise import ArmResult, _claim, _comparisons
    from train.metrics import EvalResult

    targets = [i % 4 for i in range(96)]
    ids = [f"v{i}" for i in range(96)]

    def result(correct: int) -> EvalResult:
        preds = [t if i < correct else (t + 1) % 4 for i, t in enumerate(targets)]
        return EvalResult(top1=correct / 96, top5=1.0, per_class=[0.0] * 4, confusion=[[0] * 4] * 4,
                          class_names=["a", "b", "c", "d"], num_videos=96, views=10, video_ids=ids,
                          predictions=preds, targets=targets)

    arms = {"tmm-kt3-scratch": ArmResult("tmm-kt3-scratch", [result(72), result(70)]),
            "avgpool-scratch": ArmResult("avgpool-scratch", [result(24), result(26)])}
    assert arms["tmm-kt3-scratch"].mean_sd() == "74.0 +/- 1.5"  # 75.0 and 72.9
    assert arms["avgpool-scratch"].per_seed().startswith("25.0 [17, 35]")
    lines = _comparisons(arms)
    assert len(lines) == 2 and "only tmm-kt3-scratch right on 48 videos, only avgpool-scratch on 0" in lines[0]
    assert "p = 7.1e-15" in lines[0]  # 2 * 0.5**48
    assert "**holds**" in _claim(arms)
    arms["tmm-kt3-scratch"] = ArmResult("tmm-kt3-scratch", [result(72), result(60)])  # 35 points on seed 1
    assert "does NOT hold (1/2 seeds)" in _claim(arms)


def test_control_task_trains_fewer_epochs_than_motion() -> None:
    """The appearance control (it saturates) pays for the budget: control_epochs there, the full
    fine-tuning on motion, pretraining epochs for PRP; None falls back to finetune_epochs."""
    from freezeframe.demo.advise import DemoConfig, DemoRun, _epochs

    cfg = DemoConfig()
    ft, prp = DemoRun("tmm-kt3-scratch", "finetune", "tmm"), DemoRun("prp-kt3", "prp", "tmm")
    assert _epochs(cfg, ft, "motion") == cfg.finetune_epochs > _epochs(cfg, ft, "appearance") == cfg.control_epochs
    assert _epochs(cfg, prp, "motion") == cfg.pretrain_epochs
    assert _epochs(DemoConfig(control_epochs=None), ft, "appearance") == cfg.finetune_epochs
    assert cfg.synth.scene_pool == 24 and cfg.synth.test_per_class >= 24  # >= 24 unseen-scene test videos per class
