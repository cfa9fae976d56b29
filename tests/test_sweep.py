"""``freezeframe sweep SPEC.toml``: a grid and list of overrides, one run directory per point
named from its overrides, reruns resume/skip, jobs share the runs, a report at the end."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from freezeframe.cli import app
from pipeline.errors import ConfigError
from tests.stores import write_synthetic_store
from train.config import resolve_train_config
from train.sweep import expand_sweep, load_sweep, sweep_configs

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
    r = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.toml")])
    assert r.exit_code == 0, r.output
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
    assert all(c.data.store == "data/stores/motion.zarr" and not c.init for c in cfgs)
