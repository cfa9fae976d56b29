"""train.metrics numbers by hand; train.report pairing / tables / Markdown; train.plots PNGs.

Run directories are written directly in tmp_path in the engine's documented format
(config.json, metrics.jsonl, summary.json, eval.json).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from rich.console import Console

from train.metrics import EvalResult, confusion_matrix, evaluate_logits, per_class_accuracy, topk_correct
from train.significance import mcnemar_exact, paired_outcomes, wilson_interval
from train.plots import AblationPoint, ComparisonRow, plot_ablation, plot_comparison, plot_confusion, plot_curves
from train.report import (
    RunDirError,
    compare_runs,
    comparison_rows,
    delta_acc,
    find_runs,
    load_run,
    mcnemar_p,
    read_metrics,
    render_delta_table,
    render_markdown,
    render_table,
    report_main,
    resolvable_difference,
    sample_size_note,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _ci(correct: int, n: int) -> str:
    """The report's interval cell, computed here from ``wilson_interval``: ``[34, 74]``."""
    lo, hi = wilson_interval(correct, n)
    return f"[{100 * lo:.0f}, {100 * hi:.0f}]"

# ---------------------------------------------------------------------------------------------
# metrics, checked against numbers worked out by hand

# 4 samples, 3 classes. Rankings (best first): s0 [1,2,0], s1 [0,1,2], s2 [2,0,1], s3 [1,0,2]
LOGITS = torch.tensor(
    [
        [0.1, 0.9, 0.5],
        [2.0, 1.0, 0.0],
        [0.3, 0.1, 0.8],
        [0.2, 0.7, 0.1],
    ]
)
TARGETS = torch.tensor([1, 2, 0, 1])
# top-1 hits: s0 (1) yes, s1 (pred 0, true 2) no, s2 (pred 2, true 0) no, s3 (1) yes -> 2
# top-2 hits: s0 yes, s1 {0,1} no, s2 {2,0} yes, s3 yes -> 3 ; top-3 (and top-5 clamped) -> 4


def test_topk_correct_by_hand() -> None:
    assert topk_correct(LOGITS, TARGETS, ks=(1, 2, 3, 5)) == {1: 2, 2: 3, 3: 4, 5: 4}
    assert topk_correct(LOGITS, TARGETS) == {1: 2, 5: 4}
    with pytest.raises(ValueError):
        topk_correct(LOGITS, TARGETS[:3])
    with pytest.raises(ValueError):
        topk_correct(LOGITS, torch.tensor([0, 1, 2, 3]))  # class 3 does not exist


def test_confusion_and_per_class_by_hand() -> None:
    preds = np.array([1, 0, 2, 1])  # argmax of LOGITS
    conf = confusion_matrix(preds, TARGETS.numpy(), num_classes=4)  # class 3 has no samples
    expected = np.array(
        [
            [0, 0, 1, 0],  # true 0 -> predicted 2
            [0, 2, 0, 0],  # true 1 -> 1, 1
            [1, 0, 0, 0],  # true 2 -> 0
            [0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64
    acc = per_class_accuracy(conf)
    np.testing.assert_allclose(acc[:3], [0.0, 1.0, 0.0])
    assert math.isnan(acc[3])
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), num_classes=3)


def test_evaluate_logits_and_json_round_trip(tmp_path: Path) -> None:
    logits = torch.cat([LOGITS, torch.zeros(4, 1)], dim=1)  # 4 classes, class 3 never true
    res = evaluate_logits(logits, TARGETS, ["a", "b", "c", "d"], views=3)
    assert res.top1 == pytest.approx(0.5) and res.top5 == pytest.approx(1.0)
    assert res.num_videos == 4 and res.views == 3
    assert res.confusion[0] == [0, 0, 1, 0] and res.confusion[1][1] == 2
    assert res.per_class[1] == 1.0 and math.isnan(res.per_class[3])
    d = res.to_json()
    assert d["per_class"][3] is None  # strict JSON: NaN written as null
    text = json.dumps(d, allow_nan=False)
    back = EvalResult.from_json(text)
    assert back.confusion == res.confusion and back.class_names == res.class_names and math.isnan(back.per_class[3])
    back2 = EvalResult.load(res.save(tmp_path / "eval.json"))
    assert back2.top1 == res.top1 and back2.views == 3


# ---------------------------------------------------------------------------------------------
# fake run directories


def _config(name: str, *, task: str = "finetune", arch: str = "tmm", kt: int = 3, init: str | None = None,
            seed: int = 0, lr: float = 1e-3, store: str = "/stores/ucf101.zarr", num_classes: int = 5) -> dict:
    return {
        "task": task,
        "name": name,
        "seed": seed,
        "model": {
            "arch": arch,
            "tmm": {"in_channels": 32, "hidden": 16, "out_channels": 64, "blocks": 2, "temporal_kernel": kt},
            "mlp_dim": 128,
            "spatial_pool": None,
            "channel_pool": None,
            "num_classes": num_classes,
        },
        "optim": {"base_lr": lr, "weight_decay": 0.05, "epochs": 3, "warmup_epochs": 1, "batch_size": 8},
        "init": init,
        "data": {"store": store, "split": "train"},
    }


def _write_run(root: Path, cfg: dict, top1: float | None = None, *, epochs: int = 3, steps_per_epoch: int = 4,
               num_classes: int = 5, with_summary: bool = True) -> Path:
    run = root / cfg["name"]
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "provenance.json").write_text("{}")
    lines, step = [], 0
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            loss = 2.0 * math.exp(-0.1 * step)
            lines.append({"kind": "train", "epoch": e, "step": step, "loss": loss, "acc": min(1.0, 0.05 * step),
                          "lr": 1e-3 * min(1.0, step / steps_per_epoch), "time": 0.5 * step})
        lines.append({"kind": "eval", "epoch": e, "step": step, "top1": 0.2 + 0.1 * e, "top5": 0.9, "loss": 1.5 - 0.1 * e})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = {"name": cfg["name"], "task": cfg["task"], "epochs": epochs, "steps": step, "seconds": 0.5 * step,
               "final_loss": lines[-2]["loss"], "final_train_acc": lines[-2]["acc"]}
    if top1 is not None:
        names = [f"class_{i}" for i in range(num_classes)]
        n_per = 4
        conf = np.zeros((num_classes, num_classes), dtype=int)
        correct = round(top1 * num_classes * n_per)
        for c in range(num_classes):  # spread `correct` hits over the classes, misses go to the next class
            hits = min(n_per, max(0, correct - c * n_per))
            conf[c, c] = hits
            conf[c, (c + 1) % num_classes] = n_per - hits
        res = EvalResult(top1=float(np.trace(conf) / conf.sum()), top5=0.95,
                         per_class=list(per_class_accuracy(conf)), confusion=conf.tolist(), class_names=names,
                         num_videos=int(conf.sum()), views=2)
        res.save(run / "eval.json")
        summary.update(top1=res.top1, top5=res.top5)
    if with_summary:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "runs"
    prp = _write_run(root, _config("prp-kt3", task="prp", init=None, num_classes=4))
    init = str(prp)
    r = {"prp": prp}
    # a matched pair (scratch 0.40 vs PRP 0.55) for TMM kt=3, seed 0
    r["scratch"] = _write_run(root, _config("ft-kt3-scratch"), top1=0.40)
    r["prp_ft"] = _write_run(root, _config("ft-kt3-prp", init=init), top1=0.55)
    # a second pair for avgpool (scratch 0.30 vs PRP 0.25: negative gain)
    r["avg_scratch"] = _write_run(root, _config("ft-avg-scratch", arch="avgpool"), top1=0.30)
    r["avg_prp"] = _write_run(root, _config("ft-avg-prp", arch="avgpool", init=init), top1=0.25)
    # PRP-initialised runs whose twin differs in more than init: different seed / lr -> no pair
    r["seed1_prp"] = _write_run(root, _config("ft-kt3-prp-seed1", init=init, seed=1), top1=0.60)
    r["lr_prp"] = _write_run(root, _config("ft-kt1-prp-lr", kt=1, init=init, lr=5e-4), top1=0.50)
    r["kt1_scratch"] = _write_run(root, _config("ft-kt1-scratch", kt=1), top1=0.35)
    return r


def test_load_run_fields(runs: dict[str, Path]) -> None:
    rec = load_run(runs["prp_ft"])
    assert (rec.name, rec.task, rec.arch, rec.temporal_kernel, rec.blocks, rec.hidden, rec.out_channels) == (
        "ft-kt3-prp", "finetune", "tmm", 3, 2, 16, 64)
    assert rec.pretrained_from == str(runs["prp"]) and rec.init_label == "prp-kt3"
    assert rec.top1 == pytest.approx(0.55) and rec.top5 == pytest.approx(0.95)
    assert rec.epochs == 3 and rec.seconds == pytest.approx(6.0) and rec.dataset == "ucf101"
    assert rec.model_label == "TMM kt=3"
    prp = load_run(runs["prp"])
    assert prp.pretrained_from is None and prp.top1 == pytest.approx(0.4)  # last eval line of metrics.jsonl
    with pytest.raises(RunDirError, match="config.json"):
        load_run(runs["prp"].parent)


def test_incomplete_run_and_truncated_metrics(tmp_path: Path) -> None:
    run = _write_run(tmp_path, _config("live"), with_summary=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "epoch": 3, "st')  # a half-written last line
    assert len(read_metrics(run)) == 15
    rec = load_run(run)
    assert not rec.complete and rec.top1 == pytest.approx(0.4) and rec.seconds == pytest.approx(6.0)
    (run / "metrics.jsonl").write_text('{"kind": "train"\n{"kind": "eval", "epoch": 0}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl:1"):
        read_metrics(run)


def test_delta_acc_pairs_only_identical_configs(runs: dict[str, Path]) -> None:
    records = compare_runs([runs["prp"].parent])  # the folder of runs expands to all 8
    assert len(records) == 8 and records[0].task == "prp"
    deltas = delta_acc(records)
    pairs = {(d.pretrained.name, d.scratch.name): d.delta_acc for d in deltas}
    assert set(pairs) == {("ft-kt3-prp", "ft-kt3-scratch"), ("ft-avg-prp", "ft-avg-scratch")}
    assert pairs[("ft-kt3-prp", "ft-kt3-scratch")] == pytest.approx(0.15)
    assert pairs[("ft-avg-prp", "ft-avg-scratch")] == pytest.approx(-0.05)
    # dotted ignore keys: allowing the seed to differ pairs the seed-1 PRP run with the seed-0 scratch run too
    loose = {(d.pretrained.name, d.scratch.name) for d in delta_acc(records, ignore=("init", "name", "seed"))}
    assert ("ft-kt3-prp-seed1", "ft-kt3-scratch") in loose
    assert ("ft-kt1-prp-lr", "ft-kt1-scratch") not in loose  # lr still differs
    loose_lr = {(d.pretrained.name, d.scratch.name) for d in delta_acc(records, ignore=("init", "name", "optim.base_lr"))}
    assert ("ft-kt1-prp-lr", "ft-kt1-scratch") in loose_lr


def test_delta_acc_ignores_a_change_of_dataset(tmp_path: Path) -> None:
    a = _write_run(tmp_path, _config("s", store="/stores/a.zarr"), top1=0.4)
    b = _write_run(tmp_path, _config("p", store="/stores/b.zarr", init="/runs/prp"), top1=0.6)
    assert delta_acc([load_run(a), load_run(b)]) == []
    cfg = copy.deepcopy(_config("p2", store="/stores/a.zarr", init="/runs/prp"))
    c = _write_run(tmp_path, cfg, top1=0.6)
    [row] = delta_acc([load_run(a), load_run(c)])
    assert row.delta_acc == pytest.approx(0.2)


def test_tables_and_markdown(runs: dict[str, Path]) -> None:
    records = compare_runs(list(runs.values()))
    deltas = delta_acc(records)
    console = Console(record=True, width=250)
    console.print(render_table(records, deltas))
    console.print(render_delta_table(deltas))
    text = console.export_text()
    assert "ft-kt3-prp" in text and "+15.00" in text and "-5.00" in text and "55.00" in text
    md = render_markdown(records, deltas)
    table_rows = [line for line in md.splitlines() if line.startswith("| ft-") or line.startswith("| prp-")]
    assert len(table_rows) == 8
    row = next(line for line in table_rows if line.startswith("| ft-kt3-prp |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["ft-kt3-prp", "finetune", "ucf101", "TMM kt=3"]
    # 0.55 of 20 test videos: top-1 with its Wilson 95 % interval (the fixture has 5 classes: no top-5)
    assert f"55.00 {_ci(11, 20)}" in cells and "+15.00" in cells and "prp-kt3" in cells
    assert "| ucf101 | TMM kt=3 | 0 | ft-kt3-scratch | ft-kt3-prp | prp-kt3 | 40.00 | 55.00 | +15.00 |" in md
    assert "Mean Δ-Acc over 2 pair(s): **+5.00 pp**" in md


def _assert_png(path: Path, min_h: int = 200, min_w: int = 200) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 2000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_h and img.shape[1] >= min_w and img.shape[2] in (3, 4)
    assert float(img[..., :3].std()) > 0.02  # not a blank canvas
    return img


def test_plots_are_valid_pngs(runs: dict[str, Path], tmp_path: Path) -> None:
    curves = plot_curves(runs["prp_ft"])
    assert curves == runs["prp_ft"] / "curves.png"
    img = _assert_png(curves, 500, 900)  # 11 x 6.5 in at 110 dpi
    res = EvalResult.load(runs["prp_ft"] / "eval.json")
    conf_png = _assert_png(plot_confusion(res, tmp_path / "conf.png", title="ft-kt3-prp"))
    assert conf_png.shape != img.shape
    rows = [ComparisonRow("TMM kt=3", "scratch", 0.40), ComparisonRow("TMM kt=3", "PRP", 0.55),
            ComparisonRow("TMM kt=3", "PRP", 0.60), ComparisonRow("avgpool", "scratch", 0.3)]
    _assert_png(plot_comparison(rows, tmp_path / "cmp.png", title="ucf101", chance=0.2))
    with pytest.raises(ValueError):
        plot_comparison([], tmp_path / "empty.png")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(_config("empty")))
    with pytest.raises(RunDirError, match="no training or eval lines"):
        plot_curves(empty)


def test_write_report_links_images(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "report.md"
    path = write_report([runs["prp"], runs["scratch"], runs["prp_ft"]], out, title="UCF101 study",
                        extra_sections=["## Notes\n\nhello"])
    md = path.read_text()
    assert md.startswith("# UCF101 study")
    # top-1 with its Wilson interval; n = 20 stated once; no top-5 (5 classes); McNemar p "-": the
    # fixture's eval.json has no per-video predictions (written before they were recorded)
    assert f"| ft-kt3-prp | finetune | ucf101 | TMM kt=3 | 2 | prp-kt3 | 0 | 3 | 55.00 {_ci(11, 20)} | +15.00 | - |" in md
    assert "**n = 20**" in md and "top-5" not in md.split("## Runs")[1].split("## Δ-Acc")[0].split("\n")[2]
    chart = out.with_name("report_top1.png")
    _assert_png(chart)
    assert "](report_top1.png)" in md
    assert "](../runs/ft-kt3-prp/curves.png)" in md and "](../runs/ft-kt3-prp/confusion.png)" in md
    assert "](../runs/prp-kt3/confusion.png)" not in md  # pretraining runs have no eval.json
    _assert_png(runs["prp_ft"] / "confusion.png")
    assert md.rstrip().endswith("hello")
    # the CLI entry prints the table and writes the report
    assert report_main([runs["scratch"], runs["prp_ft"]], tmp_path / "r2.md") == 0
    printed = capsys.readouterr().out
    assert "ft-kt3-scratch" in printed and "+15.00" in printed and (tmp_path / "r2.md").is_file()
    with pytest.raises(RunDirError):
        find_runs([tmp_path / "nope"])


# ---------------------------------------------------------------------------------------------
# sample sizes, intervals, McNemar p, top-5 only where meaningful


def _write_predicted_run(root: Path, name: str, preds: list[int], targets: list[int], *, num_classes: int,
                         init: str | None = None, ids: list[str] | None = None, top5: float = 0.9) -> Path:
    """A fine-tuning run whose ``eval.json`` holds per-video predictions (as ``evaluate`` writes them)."""
    cfg = _config(name, init=init, num_classes=num_classes)
    run = _write_run(root, cfg, num_classes=num_classes)
    conf = confusion_matrix(np.array(preds), np.array(targets), num_classes)
    correct = sum(p == t for p, t in zip(preds, targets))
    EvalResult(top1=correct / len(preds), top5=top5, per_class=list(per_class_accuracy(conf)),
               confusion=conf.tolist(), class_names=[f"c{i}" for i in range(num_classes)],
               num_videos=len(preds), video_ids=ids or [f"v{i:02d}" for i in range(len(preds))],
               predictions=preds, targets=targets).save(run / "eval.json")
    return run


def _md_rows(md: str, header_start: str) -> tuple[list[str], dict[str, list[str]]]:
    """Columns and rows (by first cell) of the Markdown table whose header starts with ``header_start``."""
    lines = md.splitlines()
    i = next(j for j, line in enumerate(lines) if line.startswith(header_start))
    cols = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = {}
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return cols, rows


def test_top1_interval_and_mcnemar_p_on_hand_built_predictions(tmp_path: Path) -> None:
    """12 videos, 3 classes. Scratch right on v00-v04 (5), PRP right on v03-v10 (8): only PRP
    right on v05-v10 (6 videos), only scratch on v00-v02 (3) -> McNemar on (6, 3)."""
    targets = [i % 3 for i in range(12)]
    wrong = [(t + 1) % 3 for t in targets]
    scratch = [targets[i] if i < 5 else wrong[i] for i in range(12)]
    prp = [targets[i] if 3 <= i <= 10 else wrong[i] for i in range(12)]
    a = _write_predicted_run(tmp_path, "s", scratch, targets, num_classes=3)
    b = _write_predicted_run(tmp_path, "p", prp, targets, num_classes=3, init="/runs/prp")
    records = compare_runs([a, b])
    rec_s, rec_p = sorted(records, key=lambda r: r.name != "s")
    assert (rec_s.num_videos, rec_s.correct, rec_p.correct) == (12, 5, 8)
    assert rec_s.top1_interval == wilson_interval(5, 12)
    want_p = mcnemar_exact(6, 3).p_value  # only PRP right 6, only scratch right 3
    assert want_p == pytest.approx(paired_outcomes(prp, scratch, targets).p_value)
    assert want_p == pytest.approx(2 * sum(math.comb(9, i) for i in range(4)) / 2 ** 9)  # = 0.5078125
    [d] = delta_acc(records)
    assert d.p_value == pytest.approx(want_p)
    md = render_markdown(records, [d])
    cols, rows = _md_rows(md, "| run |")
    assert "n" not in cols and "**n = 12**" in md  # one test-set size: stated once
    assert "top-5 %" not in cols  # 3 classes
    assert rows["p"][cols.index("top-1 %")] == f"66.67 {_ci(8, 12)}"
    assert rows["s"][cols.index("top-1 %")] == f"41.67 {_ci(5, 12)}"
    assert rows["p"][cols.index("McNemar p")] == f"{want_p:.3f}" == "0.508"
    assert rows["s"][cols.index("McNemar p")] == "-"  # scratch is not a pair's PRP side
    dcols, drows = _md_rows(md, "| dataset |")
    assert drows["ucf101"][dcols.index("McNemar p")] == "0.508"
    assert drows["ucf101"][dcols.index("Δ-Acc (pp)")] == "+25.00"
    console = Console(record=True, width=250)
    console.print(render_table(records, [d]))
    text = console.export_text()
    assert "n = 12 test videos" in text and f"66.67 {_ci(8, 12)}" in text and "0.508" in text
    # paired by video id, not by position: the same predictions listed in another order give the same p
    order = list(range(11, -1, -1))
    c = _write_predicted_run(tmp_path / "rev", "p", [prp[i] for i in order], [targets[i] for i in order],
                             num_classes=3, init="/runs/prp", ids=[f"v{i:02d}" for i in order])
    assert mcnemar_p(load_run(c), rec_s) == pytest.approx(want_p)
    # other videos: nothing to pair -> no p
    e = _write_predicted_run(tmp_path / "other", "p", prp, targets, num_classes=3, init="/runs/prp",
                             ids=[f"w{i:02d}" for i in range(12)])
    assert mcnemar_p(load_run(e), rec_s) is None
    [d2] = delta_acc([rec_s, load_run(e)])
    assert d2.p_value is None and "| +25.00 | - |" in render_markdown([rec_s, load_run(e)], [d2])


def test_top5_column_only_with_more_than_5_classes(tmp_path: Path) -> None:
    t3 = [i % 3 for i in range(9)]
    t10 = [i % 10 for i in range(20)]
    three = _write_predicted_run(tmp_path, "three", t3, t3, num_classes=3, top5=1.0)
    ten = _write_predicted_run(tmp_path, "ten", [(t + 1) % 10 if i < 5 else t for i, t in enumerate(t10)], t10,
                               num_classes=10, top5=0.85)
    cols3, _ = _md_rows(render_markdown(compare_runs([three])), "| run |")
    assert "top-5 %" not in cols3 and "top-1 %" in cols3
    cols10, rows10 = _md_rows(render_markdown(compare_runs([ten])), "| run |")
    assert rows10["ten"][cols10.index("top-5 %")] == "85.00"
    assert rows10["ten"][cols10.index("top-1 %")] == f"75.00 {_ci(15, 20)}"
    # both: the column stays for the 10-class run, "-" for the 3-class one; sizes differ -> an n column
    cols, rows = _md_rows(render_markdown(compare_runs([three, ten])), "| run |")
    assert rows["ten"][cols.index("top-5 %")] == "85.00" and rows["three"][cols.index("top-5 %")] == "-"
    assert rows["ten"][cols.index("n")] == "20" and rows["three"][cols.index("n")] == "9"
    # the class count comes from eval.json, not the config: a config saying 10 with a 3-class eval hides it
    cfg = json.loads((three / "config.json").read_text())
    cfg["model"]["num_classes"] = 10
    (three / "config.json").write_text(json.dumps(cfg))
    rec = load_run(three)
    assert rec.num_classes == 10 and rec.classes == 3 and not rec.top5_meaningful


def test_sample_size_note_is_computed(tmp_path: Path) -> None:
    t = [i % 4 for i in range(32)]
    a = _write_predicted_run(tmp_path, "a", [x if i < 15 else (x + 1) % 4 for i, x in enumerate(t)], t, num_classes=4)
    b = _write_predicted_run(tmp_path, "b", [x if i < 7 else (x + 1) % 4 for i, x in enumerate(t)], t, num_classes=4,
                             init="/runs/prp")
    records = compare_runs([a, b])
    note = sample_size_note(records)
    mean = (15 + 7) / 64  # 34.4 %
    lo, hi = wilson_interval(11, 32)  # round(0.34375 * 32) = 11
    half = (hi - lo) / 2
    assert resolvable_difference(32, mean) == pytest.approx((half, math.sqrt(2) * half))
    assert note is not None and note.startswith("**Sample size.** 32 test videos per run (4 classes, chance 25.0 %).")
    assert f"({100 * mean:.1f} %)" in note and f"±{100 * half:.0f} points" in note
    assert f"under ~{100 * math.sqrt(2) * half:.0f} points" in note and "under ~22 points" in note
    md = write_report([a, b], tmp_path / "r.md").read_text()
    assert md.index("**Sample size.** 32 test videos") < md.index("## Runs")  # at the top
    # runs of different sizes: the smallest decides
    c = _write_predicted_run(tmp_path, "c", t[:20], t[:20], num_classes=4)
    assert "20 to 32 test videos per run" in sample_size_note(compare_runs([a, c]))  # type: ignore[operator]
    assert sample_size_note([load_run(_write_run(tmp_path / "x", _config("no-eval")))]) is None


def test_comparison_and_ablation_charts_draw_wilson_error_bars(tmp_path: Path) -> None:
    t = [i % 3 for i in range(12)]
    run = _write_predicted_run(tmp_path, "a", [x if i < 6 else (x + 1) % 3 for i, x in enumerate(t)], t, num_classes=3)
    [row] = comparison_rows(compare_runs([run]))
    assert row.interval == wilson_interval(6, 12)
    plain = [AblationPoint("base", 10**8, 1000, 0.5, 0.6), AblationPoint("2", 4 * 10**8, 2000, 0.4, None)]
    with_bars = [AblationPoint(p.label, p.macs, p.params, p.top1_scratch, p.top1_prp,
                               wilson_interval(round(12 * p.top1_scratch), 12),
                               None if p.top1_prp is None else wilson_interval(round(12 * p.top1_prp), 12))
                 for p in plain]
    a = _assert_png(plot_ablation(plain, tmp_path / "plain.png"))
    b = _assert_png(plot_ablation(with_bars, tmp_path / "bars.png"))
    assert a.shape == b.shape and float(np.abs(a - b).sum()) > 0  # the bars change the picture
