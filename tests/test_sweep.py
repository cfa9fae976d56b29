"""``freezeframe sweep SPEC.toml``: a grid and list of overrides, one run directory per point
named from its overrides, reruns resume/skip, jobs share the runs, a report at the end."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from freezeframe.cli import app
from pipeline.dist import RankInfo
from pipeline.errors import ConfigError
from pipeline.paths import project_root
from tests.stores import write_synthetic_store
from train.config import resolve_train_config
from train.metrics import EvalResult
from train.ablation import AblationRow, render_ablation
from train.significance import mcnemar_exact, paired_outcomes, wilson_interval
from train.stats import tmm_stats
from train.sweep import SweepTable, expand_sweep, load_sweep, rank_device, run_names, sweep_configs, sweep_share

TINY = ["model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
        "clip.num_frames=4", "clip.stride=2", "test.num_clips=2", "test.num_frames=4", "test.stride=2",
        "optim.batch_size=2", "optim.warmup_epochs=1", "data.workers=0", "model.num_classes=3", "optim.epochs=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(tmp_path: Path, store: Path, extra: str = "") -> Path:
    sets = ", ".join(f"'{s}'" for s in [f'data.store="{store}"', *TINY])
    path = tmp_path / "sweep.toml"
    path.write_text(f'task = "finetune"\nout = "{tmp_path / "runs"}"\nset = [{sets}]\n{extra}'
                    '[grid]\n"model.tmm.temporal_kernel" = [1, 3]\n\n[[runs]]\n"model.arch" = "avgpool"\n')
    return path


def test_sweep_names_runs_shares_them_and_reports(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", num_classes=3)
    spec = load_sweep(_spec(tmp_path, store.path))
    runs = expand_sweep(spec)
    assert [(r.name, r.overrides) for r in runs] == [
        ("temporal_kernel=1", ("model.tmm.temporal_kernel=1",)),
        ("temporal_kernel=3", ("model.tmm.temporal_kernel=3",)),
        ("arch=avgpool", ('model.arch="avgpool"',)),
    ]
    share = [c.run_dir for c in sweep_configs(spec, resolve_train_config, 1, 2)]
    assert share == [str(tmp_path / "runs" / "temporal_kernel=3")]  # run 1 of 3 -> job 1 of 2
    # two points side by side in worker processes (train.runpool), one thread each
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.toml"), "--parallel", "2", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "3 chains (3 runs) on 2 worker processes x 1 thread(s)" in r.output, r.output
    assert all((tmp_path / "runs" / f"{n}.log").stat().st_size > 0 for n in ("temporal_kernel=1", "arch=avgpool"))
    names = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert names == ["arch=avgpool", "temporal_kernel=1", "temporal_kernel=3"]
    report = (tmp_path / "runs" / "report.md").read_text()
    assert all(n in report for n in names) and "TMM kt=1" in report and "avgpool" in report
    summaries = {n: (tmp_path / "runs" / n / "summary.json").stat().st_mtime_ns for n in names}
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.toml")])  # rerun: nothing is trained again
    assert r.exit_code == 0 and r.output.count("is finished") == 3, r.output
    assert {n: (tmp_path / "runs" / n / "summary.json").stat().st_mtime_ns for n in names} == summaries


def test_a_bad_point_is_refused_before_any_run(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", num_classes=3)
    path = _spec(tmp_path, store.path)
    path.write_text(path.read_text() + '\n[[runs]]\n"optim.batch_size" = 0\n')
    with pytest.raises(ConfigError, match="optim: batch_size must be >= 1, got 0"):
        sweep_configs(load_sweep(path), resolve_train_config)
    r = CliRunner().invoke(app, ["sweep", str(path)])
    assert r.exit_code == 2 and "batch_size must be >= 1" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert r.exit_code == 0 and "batch_size=0" in r.stdout and "temporal_kernel=1: model.tmm.temporal_kernel=1" in r.stdout


def test_the_shipped_sweep_resolves() -> None:
    """The embedded benchmark's sweep: 2 x 2 grid + the avgpool baseline, every point a valid config."""
    spec = load_sweep(Path(__file__).resolve().parent.parent / "train/configs/sweeps/synth-motion.toml")
    cfgs = sweep_configs(spec, resolve_train_config)
    assert [Path(c.run_dir).name for c in cfgs] == [
        "temporal_kernel=1,spatial_pool=1", "temporal_kernel=1,spatial_pool=2", "temporal_kernel=3,spatial_pool=1",
        "temporal_kernel=3,spatial_pool=2", "arch=avgpool"]
    assert {c.model.spatial_pool for c in cfgs[:4]} == {1, 2} and cfgs[4].model.arch == "avgpool"
    # the shipped configs' paths are under the project root (pipeline.paths), not the current directory
    assert all(c.data.store == str(project_root() / "data/stores/motion.zarr") and not c.init for c in cfgs)


def _ablation_spec(tmp_path: Path, store: Path) -> Path:
    sets = ", ".join(f"'{s}'" for s in [f'data.store="{store}"', 'init=""', *TINY])
    pre = ", ".join(f"'{s}'" for s in [f'data.store="{store}"', "model.tmm.in_channels=16", "model.tmm.hidden=8",
                                        "model.tmm.out_channels=16", "model.mlp_dim=16", "prp.num_frames=4",
                                        "prp.clips_per_video=2", "optim.batch_size=2", "optim.warmup_epochs=1",
                                        "data.workers=0", "optim.epochs=1", "prp.short_video=\"wrap\""])
    path = tmp_path / "ablations.toml"
    path.write_text(f'task = "finetune"\nout = "{tmp_path / "runs"}"\nset = [{sets}]\ndelta = true\n'
                    f'pretrain_set = [{pre}]\n'
                    '[[runs]]\n[[runs]]\n"model.spatial_pool" = 1\n[[runs]]\n"model.tmm.blocks" = 2\n'
                    '[[tables]]\ntitle = "Spatial pooling"\nkeys = ["model.spatial_pool"]\n'
                    '[[tables]]\ntitle = "Depth"\nkeys = ["model.tmm.blocks"]\n')
    return path


def _top1_cell(cell: str) -> tuple[float, tuple[int, int]]:
    """``"46.9 [31, 63]"`` -> ``(46.9, (31, 63))``."""
    m = re.fullmatch(r"(\d+\.\d) \[(\d+), (\d+)\]", cell)
    assert m, f"not a top-1 cell with its interval: {cell!r}"
    return float(m[1]), (int(m[2]), int(m[3]))


def test_sweep_shares_by_rank_and_reports_ablation_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two torchrun-style ranks share the 3 points (point k -> rank k % 2), each trains its runs
    alone (no process group), the last writes the paper-shaped report: per table the base point
    and the points changing only its keys, params and MACs from `stats`, scratch / PRP top-1, ΔAcc."""
    store = write_synthetic_store(tmp_path / "s.zarr", num_classes=3, grid=(2, 2))
    spec_path = _ablation_spec(tmp_path, store.path)
    spec = load_sweep(spec_path)
    names = ["base@prp", "base@prp-ft", "base", "spatial_pool=1@prp", "spatial_pool=1@prp-ft", "spatial_pool=1",
             "blocks=2@prp", "blocks=2@prp-ft", "blocks=2"]
    assert run_names(spec) == names
    cfgs = {Path(c.run_dir).name: c for c in sweep_configs(spec, resolve_train_config)}
    assert cfgs["blocks=2@prp"].task == "prp" and cfgs["blocks=2@prp-ft"].init == str(tmp_path / "runs" / "blocks=2@prp")
    assert not cfgs["blocks=2"].init and cfgs["blocks=2"].model.tmm.blocks == 2
    for rank in (1, 0):  # rank 1 first: rank 0 finishes last and writes the report
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        r = CliRunner().invoke(app, ["sweep", str(spec_path)])
        assert r.exit_code == 0, r.output
        assert f"sweep job {rank} of 2: {3 if rank else 6} of 9 runs" in r.output
        assert os.environ["RANK"] == str(rank)  # restored after the runs
        done = sorted(p.name for p in (tmp_path / "runs").iterdir() if (p / "summary.json").is_file())
        assert done == sorted(names[3:6] if rank else names), done
        assert (tmp_path / "runs" / "report.md").is_file() == (rank == 0)
    report = (tmp_path / "runs" / "report.md").read_text()
    spatial = report.split("### Spatial pooling")[1].split("###")[0]
    assert ("| spatial_pool | tokens/frame | C | params | GMACs/clip | top-1 % scratch | top-1 % PRP | ΔAcc (pp) "
            "| McNemar p |") in spatial
    rows = [line for line in spatial.splitlines() if line.startswith("| ") and "spatial_pool" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| base", "| 1"]  # base row then the pooled point
    s = tmm_stats(16, 16, 8, 1, 3, 4, 1, num_classes=3, mlp_dim=16)  # spatial_pool=1: a 1x1 grid
    cells = rows[1].strip("| ").split(" | ")
    assert cells[1:5] == ["1", "16", f"{s.tmm_params + s.head_params:,}", f"{s.tmm_macs / 1e9:.3f}"]
    (scratch, s_ci), (prp, p_ci), delta = _top1_cell(cells[5]), _top1_cell(cells[6]), float(cells[7])
    assert delta == pytest.approx(prp - scratch, abs=0.051)  # the cells are rounded to 0.1
    # each top-1 with the Wilson 95 % interval of its run's test videos, n stated once under the table,
    # ΔAcc with the exact McNemar p of the two runs' per-video predictions
    ev_s = EvalResult.load(tmp_path / "runs" / "spatial_pool=1" / "eval.json")
    ev_p = EvalResult.load(tmp_path / "runs" / "spatial_pool=1@prp-ft" / "eval.json")
    for ev, top1, ci in ((ev_s, scratch, s_ci), (ev_p, prp, p_ci)):
        correct = sum(p == t for p, t in zip(ev.predictions, ev.targets))
        lo, hi = wilson_interval(correct, ev.num_videos)
        assert top1 == pytest.approx(100 * correct / ev.num_videos, abs=0.051)
        assert ci == (round(100 * lo), round(100 * hi))
    assert ev_s.video_ids == ev_p.video_ids and ev_s.targets == ev_p.targets
    p_value = paired_outcomes(ev_p.predictions, ev_s.predictions, ev_s.targets).p_value
    assert cells[8] == ("<0.001" if p_value < 0.001 else f"{p_value:.3f}")
    assert f"n = {ev_s.num_videos} test videos per run" in spatial
    # the sample-size note at the top, and no top-5 column for 3 classes
    assert report.index(f"**Sample size.** {ev_s.num_videos} test videos per run (3 classes") < report.index("## Runs")
    assert "top-5 %" not in report and "no top-5: 5 classes or fewer" in report
    depth = report.split("### Depth")[1].split("###")[0]
    assert "| blocks |" in depth and "| 2 |" in depth and "| 1 |" in depth  # base (1 block) and 2 blocks
    assert (tmp_path / "runs" / "ablation_0.png").stat().st_size > 0 and "ablation_1.png" in report
    assert all(n in report for n in names)  # every run in the run table too


def test_sweep_share_reads_the_launcher() -> None:
    assert sweep_share(env={}) == (0, 1)
    assert sweep_share(env={"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    assert sweep_share(env={"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3)
    assert sweep_share(2, 5, env={"RANK": "3", "WORLD_SIZE": "4"}) == (2, 5)  # explicit wins
    # a rank's device is fixed before the launcher variables are hidden: its own GPU, or the CPU
    rank = RankInfo(rank=3, world=4, local_rank=3, local_world=4, launcher="torchrun")
    want = f"cuda:{3 % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    assert rank_device("auto", rank) == want and rank_device("cuda:1", rank) == "cuda:1"


@pytest.mark.parametrize("name", ["synth-motion-ablations", "ucf101-ablations"])
def test_the_shipped_ablation_sweeps_resolve(name: str) -> None:
    """The paper-shaped specs: a base point, one factor at a time, every point with a PRP twin."""
    spec = load_sweep(Path(__file__).resolve().parent.parent / f"train/configs/sweeps/{name}.toml")
    assert spec.delta and [t.title.split(":")[0] for t in spec.tables] == [
        "Compression of the cached tokens", "Compression of the cached tokens", "TMM width", "TMM depth"]
    cfgs = sweep_configs(spec, resolve_train_config)
    assert len(cfgs) == 3 * len(expand_sweep(spec)) and expand_sweep(spec)[0].name == "base"
    tasks = [c.task for c in cfgs]
    assert tasks == ["prp", "finetune", "finetune"] * len(expand_sweep(spec))
    assert all(c.init == "" or c.init is None or c.init.endswith("@prp") for c in cfgs)


def test_render_ablation_states_n_once_or_as_a_column() -> None:
    """Hand-built rows: top-1 cells with their Wilson interval, ΔAcc with the McNemar p (``-`` without
    per-video predictions), ``n`` under the table when shared, a column when the rows differ."""
    table = SweepTable("Width", ["model.tmm.hidden"])
    p = mcnemar_exact(2, 9).p_value  # PRP right alone on 2 videos, scratch alone on 9
    base = AblationRow("base", ("128",), 16, 256, 1000, 2 * 10**9, 15 / 32, 8 / 32,
                       wilson_interval(15, 32), wilson_interval(8, 32), 32, 32, p)
    old = AblationRow("hidden=64", ("64",), 16, 256, 500, 10**9, 12 / 32, 10 / 32,
                      wilson_interval(12, 32), wilson_interval(10, 32), 32, 32, None)
    md = render_ablation(table, [base, old], delta=True)
    rows = [line.strip("| ").split(" | ") for line in md.splitlines() if line.startswith("| ") and "hidden" not in line]
    lo, hi = wilson_interval(15, 32)
    assert rows[0][5] == f"46.9 [{100 * lo:.0f}, {100 * hi:.0f}]" == "46.9 [31, 64]"
    assert rows[0][7:] == ["-21.9", f"{p:.3f}"] and p == pytest.approx(sum(math.comb(11, i) for i in range(3)) / 2 ** 10)
    assert rows[1][8] == "-"  # an eval.json without per-video predictions
    assert "n = 32 test videos per run" in md and " n |" not in md
    other = AblationRow("hidden=64", ("64",), 16, 256, 500, 10**9, 12 / 30, None, wilson_interval(12, 30), None, 30)
    md = render_ablation(table, [base, other], delta=True)
    header = md.splitlines()[0].strip("| ").split(" | ")
    rows = [line.strip("| ").split(" | ") for line in md.splitlines()[2:]]
    assert header[5] == "n" and [r[5] for r in rows] == ["32", "30"] and "test videos per run" not in md
    assert rows[1][6] == f"40.0 {_ci_cell(12, 30)}" and rows[1][7:] == ["-", "-", "-"]


def _ci_cell(correct: int, n: int) -> str:
    lo, hi = wilson_interval(correct, n)
    return f"[{100 * lo:.0f}, {100 * hi:.0f}]"
