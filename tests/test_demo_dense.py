"""The demo's dense section in its quick form: real MobileNetV2 weights, synthetic DAVIS-layout data,
raw / projected / copy-first propagation scored with the official DAVIS definitions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from extract.weights import mobilenet_checkpoint
from tests.stores import write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_projection(tmp: Path) -> Path:
    """A Co-Settle projection of 1280-channel tokens (MobileNetV2's width), trained briefly with the
    existing ``cosettle`` task on a small store: the stand-in for the cosettle section's run."""
    from train.config import resolve_train_config
    from train.loop import fit

    store = write_synthetic_store(tmp / "s.zarr", splits={"train": 4, "test": 2}, grid=(4, 4), channels=1280,
                                  dtype="float16", num_classes=2)
    cfg = resolve_train_config("cosettle", None, None, [
        f'data.store="{store.path}"', f'run_dir="{tmp / "proj"}"', "cosettle.return_view=plain", "optim.batch_size=2",
        "optim.epochs=1", "data.workers=0", "seed=0"])
    return fit(cfg).run_dir


@pytest.mark.slow
@pytest.mark.skipif(mobilenet_checkpoint() is None, reason="MobileNetV2 weights not cached: run `make weights`")
def test_quick_dense_section_scores_every_method_and_reruns_from_its_outputs(tmp_path: Path) -> None:
    from freezeframe.demo.dense import METHODS, QUICK, dense_section
    from freezeframe.demo.section import DemoContext
    from manifests.dense import build_dense
    from pipeline.labels import read_label_png
    from pipeline.store import open_store, verify_store

    run = train_projection(tmp_path)
    ctx = DemoContext(out=tmp_path / "demo", quick=True, console=Console(quiet=True))
    res = dense_section(ctx, projection=run)
    out = ctx.out / "dense"
    store = out / "stores" / "davis.zarr"
    assert verify_store(store) == []
    s = open_store(store)
    assert s.content["weights_sha256"] and s.feature_shape == (4, 7, 1280)  # real weights, 128 x 224 px / 32
    n = QUICK.synth.val_sequences
    scores = {m: json.loads((out / f"scores-{m}.json").read_text())["scores"] for m in METHODS}
    for m, sc in scores.items():
        assert len(sc["per_sequence"]) == n and 0.0 <= sc["JF_mean"] <= 1.0, m
    # the copy-first results are frame 0's mask everywhere; propagation keeps frame 0 as given
    videos = build_dense("davis2017", root=out / "data")
    v = videos[0]
    first = read_label_png(v.labels[0])
    for m in ("copy-first", "raw", "projected"):
        assert np.array_equal(read_label_png(out / "results" / m / v.video_id / f"{v.frame_names[0]}.png"), first)
    last = read_label_png(out / "results" / "copy-first" / v.video_id / f"{v.frame_names[-1]}.png")
    assert np.array_equal(last, first)
    assert scores["raw"] != scores["projected"]  # the projection changed the tokens
    # the report: every method in the table, n stated, the plots exist, a claim with its verdict
    md = res.markdown
    for label in METHODS.values():
        assert f"| {label} |" in md
    assert f"n = {n}" in md and "sign test p =" in md and "bootstrap" in md
    for png in ("scores.png", "masks.png"):
        assert (out / png).stat().st_size > 2000
        assert f"dense/{png}" in md
    assert res.claim is not None and isinstance(res.claim[1], bool)
    # a rerun reuses the store and every method's scores
    again = dense_section(ctx, projection=run)
    assert again.markdown == md
    assert again.seconds["propagate + score"] < res.seconds["propagate + score"]
