"""train.runpool: chains of runs side by side in worker processes. Equality of the results
with a sequential run is tested on the demo's own runs (tests/test_demo.py); here: what a
failure looks like, and that a finished run is not trained again."""
from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from pipeline.errors import FreezeframeError
from tests.stores import TINY_TRAIN, SynthStore, train_config
from train.rundir import RunDir
from train.runpool import ChainFailed, auto_workers, log_path, train_chains


def _cfg(store: SynthStore, run_dir: Path, *extra: str):
    return train_config("finetune", store, run_dir, *TINY_TRAIN, "model.num_classes=3", "test.num_clips=2",
                        "optim.epochs=1", 'init=""', *extra)


def test_a_failed_run_names_itself_and_its_log_and_the_others_finish(store: SynthStore, tmp_path: Path) -> None:
    good = _cfg(store, tmp_path / "good")
    bad = _cfg(store, tmp_path / "bad", f'init="{tmp_path / "no-such-run"}"')  # init from nothing: fit refuses
    after_bad = _cfg(store, tmp_path / "after-bad")
    with pytest.raises(ChainFailed, match=rf"run {tmp_path / 'bad'} failed: \w+Error: .*no-such-run.* "
                       rf"\(log: {tmp_path / 'bad'}.log\)") as err:
        train_chains([[bad, after_bad], [good]], workers=2, threads=1, console=Console(quiet=True))
    assert isinstance(err.value, FreezeframeError)  # the CLI prints it as one line
    assert RunDir(good.run_dir).complete  # the other chain finished
    assert not (tmp_path / "after-bad").exists()  # a chain stops at its first failure
    assert "Traceback" in log_path(bad).read_text()
    # sequential: the run's own error, unchanged
    with pytest.raises(FreezeframeError, match="no-such-run"):
        train_chains([[bad]], workers=1, threads=1, console=Console(quiet=True))


def test_finished_runs_are_returned_not_retrained(store: SynthStore, tmp_path: Path) -> None:
    cfgs = [_cfg(store, tmp_path / f"r{k}", f"seed={k}") for k in range(2)]
    first = train_chains([[c] for c in cfgs], workers=2, threads=1, console=Console(quiet=True))
    stamps = [(Path(c.run_dir) / "summary.json").stat().st_mtime_ns for c in cfgs]
    again = train_chains([[c] for c in cfgs], workers=1, threads=1, console=Console(quiet=True))
    assert [r[0].top1 for r in again] == [r[0].top1 for r in first] and first[0][0].steps > 0
    assert [(Path(c.run_dir) / "summary.json").stat().st_mtime_ns for c in cfgs] == stamps
    assert auto_workers(1) >= 1 and auto_workers(10_000) == 1
