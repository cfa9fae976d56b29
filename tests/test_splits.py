"""Splits at training time (issue 13): a split table chosen when training replaces the splits
(and labels) recorded at extraction, checked against the store's videos; manifest builders hold
out a fraction or read a split file. Real synthetic stores, real training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from freezeframe.cli.manifest import app as manifest_app
from pipeline.errors import ConfigMismatchError, ManifestError, StoreError
from pipeline.manifest import read_manifest
from pipeline.splits import SplitEntry, read_split_table, write_split_table
from pipeline.store import open_store
from tests.stores import SynthStore, train_config
from train.data import open_training_store
from train.loop import fit
from train.tasks import get_task

TINY = [
    "model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
    "clip.num_frames=4", "clip.stride=2", "test.num_clips=2", "test.num_frames=4", "test.stride=2",
    "optim.batch_size=2", "optim.warmup_epochs=1", "data.workers=0", "model.num_classes=3",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(store: SynthStore | Path, run_dir: Path, *extra: str):
    return train_config("finetune", store, run_dir, *TINY, *extra)  # the default store: 8 train, 4 test


def _fold(store: SynthStore, path: Path) -> Path:
    """Another split of the same store: train = train-000..003 + test-000..003, test = train-004..007
    (relabelled 2, 2, 1, 1), and train-007 left out."""
    table = {}
    for v in store.videos:
        n = int(v.video_id[-3:])
        if v.split == "test" or n < 4:
            table[v.video_id] = SplitEntry("train")
        elif n < 7:
            table[v.video_id] = SplitEntry("test", label=2 if n < 6 else 1, label_name="relabelled", has_label=True)
    return write_split_table(table, path)


def test_a_split_table_chosen_when_training(store: SynthStore, tmp_path: Path) -> None:
    table = _fold(store, tmp_path / "fold2.jsonl")
    cfg = _cfg(store, tmp_path / "run", f'data.splits="{table}"', "optim.epochs=1")
    st = open_training_store(cfg)
    assert st.splits() == {"train": 8, "test": 3}  # train-007 is in no split
    assert st.split_ids("test") == ["train-004", "train-005", "train-006"]
    assert [st.meta(v).label for v in st.split_ids("test")] == [2, 2, 1]
    assert st.meta("test-001").label == store.split("test")[1].label  # no label in the table: the store's
    ds = get_task("finetune")(cfg, st, torch.device("cpu")).train_dataset(0)
    assert sorted(ds.video_ids) == sorted([f"train-{i:03d}" for i in range(4)] + [f"test-{i:03d}" for i in range(4)])
    res = fit(cfg)
    assert res.steps == 4
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_videos"] == 3
    # the store itself is unchanged: another run without a table sees the extraction's splits
    assert open_store(store.path).splits() == {"train": 8, "test": 4}
    # resume checks the table's content: another table under the same name is refused
    fit(_cfg(store, tmp_path / "run2", f'data.splits="{table}"', "optim.epochs=2", "max_steps=2"))
    rows = [json.loads(x) for x in table.read_text().splitlines()]
    rows[0]["split"] = "test"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigMismatchError, match=r"split_table: the run was trained on '[0-9a-f]{8}"):
        fit(_cfg(store, tmp_path / "run2", f'data.splits="{table}"', "optim.epochs=2"))


def test_a_manifest_is_a_split_table(store: SynthStore, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"video_id": v.video_id, "path": f"/videos/{v.video_id}.mp4",
                                            "split": "val" if v.split == "test" else "train", "label": v.label,
                                            "label_name": f"class{v.label}"}) + "\n" for v in store.videos))
    st = open_training_store(_cfg(store, tmp_path / "r", f'data.splits="{manifest}"'))
    assert st.splits() == {"train": 8, "val": 4}


def test_videos_missing_from_the_store_are_listed_in_one_error(store: SynthStore, tmp_path: Path) -> None:
    table = {v.video_id: SplitEntry(v.split) for v in store.videos}
    table.update({"ghost-001": SplitEntry("train"), "ghost-002": SplitEntry("test")})
    path = write_split_table(table, tmp_path / "t.jsonl")
    with pytest.raises(StoreError, match=r"(?s)2 video\(s\) of split table .*t.jsonl are not in store .* \(12 are\); "
                       r"extract them.*  - ghost-001\n  - ghost-002$"):
        fit(_cfg(store, tmp_path / "run", f'data.splits="{path}"'))
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video_id": "a", "split": "train", "label": 1.7}\n{"video_id": "", "split": "x"}\nnot json\n'
                   '{"video_id": "b", "split": ["train"]}\n')
    with pytest.raises(ManifestError) as err:
        read_split_table(bad)
    assert len(err.value.problems) == 4 and "label of 'a' must be an integer >= 0 or null, got 1.7" in str(err.value)


def test_manifest_holdout_and_split_file(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    for cls, n in (("cat", 8), ("dog", 4), ("yak", 1)):
        for i in range(n):
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / f"{i}.mp4").write_bytes(b"")
    out = tmp_path / "m.jsonl"

    def build(*args: str) -> list:
        r = CliRunner().invoke(manifest_app, ["folder-per-class", "--root", str(root), "--out", str(out), *args])
        assert r.exit_code == 0, r.output
        return read_manifest(out)

    rows = build("--holdout", "0.25", "--holdout-seed", "3")
    val = sorted(r.video_id for r in rows if r.split == "val")
    assert [v.split("/")[0] for v in val] == ["cat", "cat", "dog"]  # 2 of 8 cats, 1 of 4 dogs, the lone yak stays
    assert len(rows) == 13 and build("--holdout", "0.25", "--holdout-seed", "3") == rows  # deterministic
    assert sorted(r.video_id for r in build("--holdout", "0.25", "--holdout-seed", "4") if r.split == "val") != val
    table = write_split_table({"cat/0": SplitEntry("test"), "dog/1": SplitEntry("train")}, tmp_path / "t.jsonl")
    rows = build("--split-file", str(table))
    assert [(r.video_id, r.split, r.label) for r in rows] == [("cat/0", "test", 0), ("dog/1", "train", 1)]
    ghost = write_split_table({"cat/99": SplitEntry("test")}, tmp_path / "g.jsonl")
    r = CliRunner().invoke(manifest_app, ["folder-per-class", "--root", str(root), "--out", str(out),
                                          "--split-file", str(ghost)])
    assert r.exit_code == 2 and "1 video(s) of split file" in r.stderr and "cat/99" in r.stderr
