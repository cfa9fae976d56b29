"""Training refuses what it cannot trust (issue 14): damaged features, diverged losses,
incomplete or changed stores, unfinished or foreign init runs, damaged checkpoints, torn metric
lines, a second process on a run directory, out-of-range config values; finished runs are not
trained again. Tiny synthetic stores (``tests.stores``), real training, one torch thread."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from pipeline.errors import ConfigError, ConfigMismatchError, FreezeframeError
from tests.stores import TINY_TRAIN, SynthStore, indexed_features, write_synthetic_store, train_config
from train.data import DataError, NonFiniteFeaturesError
from train.loop import DivergedError, fit
from train.rundir import RunDir, RunDirError

TINY = [*TINY_TRAIN, "test.num_clips=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(task: str, store: Path | Path, run_dir: Path, *extra: str):
    return train_config(task, store, run_dir, *TINY, *extra)


def _quiet() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=250, no_color=True), buf


def _bad_features(bad_video: int, value: float):
    """Indexed noise features, with every value of video number ``bad_video`` set to ``value``."""
    base = indexed_features()

    def make(rng: np.random.Generator, number: int, label: int, length: int) -> np.ndarray:
        x = base(rng, number, label, length)
        if number == bad_video:
            x[2:] = value
        return x

    return make


def test_nan_features_stop_the_run_naming_video_and_frame(tmp_path: Path) -> None:
    st = write_synthetic_store(tmp_path / "s.zarr", features=_bad_features(2, float("nan")))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteFeaturesError, match=r"video 'train-002' frame \d+ in store .* \(shard 00000\) has "
                       r"NaN/inf features.*freezeframe verify.*data.skip_bad_videos=true"):
        fit(_cfg("prp", st.path, run, "optim.epochs=2"))
    assert not (run / "summary.json").exists() and not (run / "checkpoints" / "final.pt").exists()
    # from a DataLoader worker: the same one-line message, not the worker's traceback
    with pytest.raises(NonFiniteFeaturesError) as err:
        fit(_cfg("prp", st.path, tmp_path / "run-w", "optim.epochs=2", "data.workers=1"))
    assert str(err.value).startswith("video 'train-002' frame") and "Traceback" not in str(err.value)
    # asked to: the bad video is left out, counted and reported
    con, buf = _quiet()
    res = fit(_cfg("prp", st.path, tmp_path / "skip", "optim.epochs=1", "data.skip_bad_videos=true"), con)
    assert np.isfinite(res.final_loss)
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["skipped_videos"] == 1
    assert "left out 1 training video(s) with NaN/inf features: train-002" in buf.getvalue()


def test_a_diverging_loss_stops_the_run(tmp_path: Path) -> None:
    st = write_synthetic_store(tmp_path / "s.zarr", features=_bad_features(0, 3e38))  # finite, overflows
    run = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"the loss is (nan|inf) at step 1 .*features were finite"):
        fit(_cfg("prp", st.path, run, "optim.epochs=1", "data.in_memory=\"no\"", "seed=0",
                 "optim.batch_size=8"))  # all 8 videos in the first batch
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "summary.json").exists()


def test_an_incomplete_store_is_refused_unless_asked(tmp_path: Path) -> None:
    st = write_synthetic_store(tmp_path / "s.zarr")  # 12 videos, 3 shards
    (st.path / "markers" / "00000.json").unlink()  # shard 0 not finished
    with pytest.raises(DataError, match=r"store .* is incomplete: 2 of 3 shards extracted \(7 of 12 videos\); "
                       r"finish it by rerunning `freezeframe extract`.*data.allow_incomplete=true"):
        fit(_cfg("prp", st.path, tmp_path / "run", "optim.epochs=1"))
    assert not (tmp_path / "run").exists()
    res = fit(_cfg("prp", st.path, tmp_path / "run", "optim.epochs=1", "data.allow_incomplete=true"))
    assert res.steps == 1  # the 3 train videos of shard 1: one step of 2


def test_resume_refuses_a_store_that_changed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    write_synthetic_store(path)
    run = tmp_path / "run"
    fit(_cfg("prp", path, run, "optim.epochs=2", "max_steps=2"))
    before = (run / "checkpoints" / "last.pt").read_bytes()
    shutil.rmtree(path)
    write_synthetic_store(path, grid=(3, 3))  # re-extracted at another geometry between two attempts
    with pytest.raises(ConfigMismatchError, match=r"(?s)trained on a store that has changed.*content_hash: .*"
                       r"feature_shape: the run was trained on \[2, 2, 16\], the store now has \[3, 3, 16\]"):
        fit(_cfg("prp", path, run, "optim.epochs=2"))
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_init_refuses_unfinished_runs_and_other_features(tmp_path: Path, store: SynthStore) -> None:
    prp = tmp_path / "prp"
    fit(_cfg("prp", store.path, prp, "optim.epochs=2", "max_steps=3"))  # stopped early: not finished
    ft = ("model.num_classes=3", "optim.epochs=1", f'init="{prp}"')
    with pytest.raises(FreezeframeError, match=r"init .*did not finish training \(checkpoint final.pt at step 3\); "
                       r"finish it first.*init_unfinished=true"):
        fit(_cfg("finetune", store.path, tmp_path / "ft", *ft))
    assert not (tmp_path / "ft" / "metrics.jsonl").exists()
    assert fit(_cfg("finetune", store.path, tmp_path / "ft", *ft, "init_unfinished=true")).steps == 4
    # a killed run has only last.pt: refused as well
    fit(_cfg("prp", store.path, prp, "optim.epochs=2"))  # finish it
    assert fit(_cfg("finetune", store.path, tmp_path / "ft2", *ft)).steps == 4
    other = write_synthetic_store(tmp_path / "other.zarr", grid=(3, 3))
    with pytest.raises(ConfigMismatchError, match=r"(?s)init .* was trained on features of another kind.*"
                       r"init_other_store=true.*feature_shape: init was trained on \[2, 2, 16\], this store has "
                       r"\[3, 3, 16\]"):
        fit(_cfg("finetune", other.path, tmp_path / "ft3", *ft))
    assert fit(_cfg("finetune", other.path, tmp_path / "ft3", *ft, "init_other_store=true")).steps == 4
    (prp / "checkpoints" / "final.pt").unlink()
    with pytest.raises(FreezeframeError, match=r"did not finish training \(checkpoint last.pt"):
        (prp / "summary.json").unlink()
        state = torch.load(prp / "checkpoints" / "last.pt", weights_only=True)
        state["finished"] = False  # as a run killed mid-way leaves it
        torch.save(state, prp / "checkpoints" / "last.pt")
        fit(_cfg("finetune", store.path, tmp_path / "ft4", *ft))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, store: SynthStore) -> None:
    ref = fit(_cfg("prp", store.path, tmp_path / "ref", "optim.epochs=2", "seed=3"))
    run = tmp_path / "run"
    fit(_cfg("prp", store.path, run, "optim.epochs=2", "seed=3", "max_steps=3"))
    last, prev = run / "checkpoints" / "last.pt", run / "checkpoints" / "prev.pt"
    assert prev.exists()
    last.write_bytes(last.read_bytes()[:1000])  # torn by a full disk / a copy
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "ep')  # a half-written last metrics line
    con, buf = _quiet()
    res = fit(_cfg("prp", store.path, run, "optim.epochs=2", "seed=3"), con)
    assert "warning: checkpoint" in buf.getvalue() and "resuming from the previous checkpoint" in buf.getvalue()
    assert res.steps == ref.steps
    a, b = _weights(run / "checkpoints" / "final.pt"), _weights(ref.run_dir / "checkpoints" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in RunDir(run).read_metrics() if m["kind"] == "train"]
    assert steps == list(range(1, ref.steps + 1))
    # both damaged: a clear error, not a traceback
    last.write_bytes(b"junk")
    prev.write_bytes(b"junk")
    (run / "summary.json").unlink()
    with pytest.raises(RunDirError, match=r"damaged.*the previous one too.*delete .*checkpoints to start the run over"):
        fit(_cfg("prp", store.path, run, "optim.epochs=2", "seed=3"))


def test_a_finished_run_rerun_prints_its_summary_and_writes_nothing(tmp_path: Path, store: SynthStore) -> None:
    cfg = _cfg("finetune", store.path, tmp_path / "ft", "model.num_classes=3", "optim.epochs=1")
    first = fit(cfg)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "ft").rglob("*") if p.is_file()}
    con, buf = _quiet()
    again = fit(cfg, con)
    assert (again.steps, again.final_loss, again.top1, again.top5) == (first.steps, first.final_loss, first.top1,
                                                                     first.top5)
    assert "is finished: " in buf.getvalue() and "top1" in buf.getvalue()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == files


def test_one_process_per_run_directory(tmp_path: Path, store: SynthStore) -> None:
    run = RunDir(tmp_path / "run")
    with run.lock():
        with pytest.raises(RunDirError, match=r"being trained by another process now .*run.lock"):
            fit(_cfg("prp", store.path, run.path, "optim.epochs=1"))
    assert not run.last.exists()
    assert fit(_cfg("prp", store.path, run.path, "optim.epochs=1")).steps == 4  # released with its holder


def test_out_of_range_values_are_listed_in_one_error(store: SynthStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg("finetune", store.path, tmp_path / "r", "optim.batch_size=0", "checkpoint_every=0", "log_every=-1",
             'data.in_memory="maybe"', "clip.stride=0", "test.num_clips=0", "optim.epochs=0")
    msg = str(err.value)
    for line in ("optim: batch_size must be >= 1, got 0", "optim: epochs must be >= 1, got 0",
                 "checkpoint_every must be >= 1, got 0", "log_every must be >= 1, got -1",
                 "data: in_memory must be one of ['auto', 'yes', 'no'], got 'maybe'",
                 "clip: stride must be >= 1, got 0", "test: num_clips must be >= 1, got 0"):
        assert f"  - {line}" in msg, msg
    assert msg.count("\n  - ") == 7


def test_evaluations_elsewhere_get_their_own_file_and_label(tmp_path: Path, store: SynthStore) -> None:
    from train.evaluate import evaluate_run
    from train.report import load_run, render_markdown

    run = RunDir(tmp_path / "ft")
    fit(_cfg("finetune", store.path, run.path, "model.num_classes=3", "optim.epochs=1"))
    own = run.eval_file("multiview").read_bytes()
    confusion = run.confusion_png.read_bytes()
    ev = evaluate_run(run.path, split="train", device="cpu")
    assert ev.tag == "split=train" and ev.file == run.path / "eval-multiview@split=train.json" and ev.plots == []
    assert run.eval_file("multiview").read_bytes() == own and run.confusion_png.read_bytes() == confusion
    saved = json.loads(ev.file.read_text())
    assert saved["num_videos"] == 8 and saved["evaluated_on"] == {"store": str(store.path), "splits": "", "split": "train"}
    record = load_run(run.path)
    assert record.top1 == json.loads(own)["top1"]  # the run's own test, not the train split's
    assert record.other_evals == {"split=train": saved["top1"]}
    assert f"split=train: {100 * saved['top1']:.2f}" in render_markdown([record])
    # the run's own store and split: its own file again
    assert evaluate_run(run.path, split="test", device="cpu").file == run.eval_file("multiview")


def test_evaluate_refuses_a_run_without_a_classification_head(tmp_path: Path, store: SynthStore) -> None:
    from train.evaluate import evaluate_run

    prp = fit(_cfg("prp", store.path, tmp_path / "prp", "optim.epochs=1")).run_dir
    with pytest.raises(FreezeframeError, match=r"is a 'prp' run: 'multiview' does not apply to it \(its task runs "
                       r"no evaluation; a PRP head predicts playback rates, not classes\)"):
        evaluate_run(prp, device="cpu")
    assert not list(prp.glob("eval*.json"))


def test_cli_print_config_and_one_line_refusals(tmp_path: Path, store: SynthStore) -> None:
    from typer.testing import CliRunner

    from freezeframe.cli import app

    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["finetune", "--store", str(store.path), "--run-dir", str(run), "--epochs", "7",
                                 "--print-config", "--set", "keep_last=2"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.stdout)
    assert cfg["task"] == "finetune" and cfg["optim"]["epochs"] == 7 and cfg["keep_last"] == 2
    assert cfg["task_cfg"]["num_frames"] == 8 and not run.exists()  # printed, nothing trained
    prp = fit(_cfg("prp", store.path, tmp_path / "prp", "optim.epochs=1")).run_dir
    for args, needle in ((["evaluate", str(prp)], "is a 'prp' run: 'multiview' does not apply"),
                         (["pretrain", "--store", str(store.path), "--run-dir", str(run), "--set", "optim.batch_size=0",
                           "--set", "checkpoint_every=0"], "optim: batch_size must be >= 1, got 0")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
    assert "checkpoint_every must be >= 1, got 0" in r.stderr
