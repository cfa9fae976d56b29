"""The stage-2 plug-in API: every registered task trains and resumes bit-exactly; the
resolver parses each task's own config section; losses equal their formulas.

The matrix runs over ``train.tasks.TASKS`` (like timm's tests over its model registry),
including ``dummy-anchor``, a task defined only in ``tests/dummy_task.py``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tests.dummy_task  # noqa: F401  (registers "dummy-anchor")
from pipeline.config import to_dict
from pipeline.errors import ConfigError, FreezeframeError
from pipeline.registry import RegistryError
from tests.stores import SynthStore, train_config, write_synthetic_store
from train.config import content_of, load_train_config, resolve_train_config
from train.data import ClipConfig
from train.data import TestViewConfig as ViewConfig
from train.evals import EVALUATIONS
from train.losses import accuracy, cross_entropy
import train.loop
from train.loop import fit
from train.rundir import RunDir
from train.sampling import PRPConfig
from train.tasks import TASKS

#: every section of every task in one override list (each task keeps its own)
TINY = [
    "model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
    "prp.num_frames=4", "prp.clips_per_video=2", "clip.num_frames=4", "clip.stride=2",
    "test.num_clips=3", "test.num_frames=4", "test.stride=2", "anchor.num_frames=4", "cosettle.return_view=plain",
    # long-form pretexts: 4-frame clips, one per video (stride past every video's end): 8 items
    "moco.stream.clip_frames=4", "moco.stream.stride_frames=64", "moco.queue_size=6", "moco.proj_hidden=16",
    "moco.proj_dim=8", "mfm.stream.clip_frames=4", "mfm.stream.stride_frames=64", "mfm.decoder_hidden=8",
    "distill.stream.clip_frames=4", "distill.stream.stride_frames=64",
    "optim.batch_size=2", "optim.warmup_epochs=1", "data.workers=0", "log_every=1", "checkpoint_every=1",
    "optim.epochs=2", "seed=7",
]
STEPS = 2 * 4  # 8 train videos, 2 per step, 2 epochs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> SynthStore:
    # 4 classes: the model's default 4 outputs fit both PRP's 4 rates and the labels
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "s.zarr", num_classes=4)


def _cfg(task: str, store: SynthStore, run_dir: Path, *extra: str):
    return train_config(task, store, run_dir, *TINY, *extra)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _train_lines(run: Path) -> list[dict]:
    return [m for m in RunDir(run).read_metrics() if m["kind"] == "train"]


def test_registry_holds_the_builtins_and_the_test_task() -> None:
    assert {"prp", "finetune", "dummy-anchor"} <= set(TASKS.names())
    assert "multiview" in EVALUATIONS
    with pytest.raises(RegistryError, match="unknown training task 'nope'; choose one of: .*finetune"):
        resolve_train_config("nope", None, None, [])


@pytest.mark.parametrize("task", TASKS.names())
def test_every_task_trains_and_resumes_bit_exactly(task: str, store: SynthStore, tmp_path: Path) -> None:
    """A full run vs. a run stopped after 3 steps (mid epoch 1; the checkpoint is all that
    survives, as after a kill) and rerun: same weights, optimiser, task state, losses, evals."""
    full = fit(_cfg(task, store, tmp_path / "full"))
    assert full.steps == STEPS and full.final_loss == full.final_loss  # finite
    part = tmp_path / "part"
    assert fit(_cfg(task, store, part, "max_steps=3")).steps == 3
    assert _ckpt(part / "checkpoints" / "last.pt")["step"] == 3
    resumed = fit(_cfg(task, store, part))
    assert resumed.steps == STEPS and resumed.final_loss == full.final_loss and resumed.evals == full.evals

    a, b = _ckpt(full.run_dir / "checkpoints" / "final.pt"), _ckpt(part / "checkpoints" / "final.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{task}: {k} differs after resume"
    # the optimiser and the RNG are in last.pt (the resume point) only; final.pt holds the model
    assert "optimizer" not in a and "torch_rng" not in a
    la, lb = _ckpt(full.run_dir / "checkpoints" / "last.pt"), _ckpt(part / "checkpoints" / "last.pt")
    assert la["step"] == lb["step"] == STEPS
    for sa, sb in zip(la["optimizer"]["state"].values(), lb["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(la["torch_rng"], lb["torch_rng"])
    assert json.dumps(a["task"], default=repr) == json.dumps(b["task"], default=repr)
    # every step logged once, the same numbers as the uninterrupted run
    lines, ref = _train_lines(part), _train_lines(full.run_dir)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert [{k: v for k, v in m.items() if k != "time"} for m in lines] == \
           [{k: v for k, v in m.items() if k != "time"} for m in ref]
    # the run directory: config round-trips, summary written last, one result file per evaluation
    run = RunDir(part)
    cfg = load_train_config(run.read_config())
    assert cfg == _cfg(task, store, part) and cfg.task_cfg is not None
    summary = run.read_summary()
    assert summary["steps"] == STEPS and summary["task"] == task
    for name in TASKS.get(task).evaluations:
        assert run.read_eval(name) == RunDir(full.run_dir).read_eval(name)
        for key, value in resumed.evals.items():
            assert summary[key] == value
    assert run.curves_png.read_bytes()[:4] == b"\x89PNG"


def test_task_state_is_checkpointed_and_restored(store: SynthStore, tmp_path: Path) -> None:
    """The test-only task's running mean feeds its loss: resuming must restore it."""
    part = tmp_path / "part"
    fit(_cfg("dummy-anchor", store, part, "max_steps=3"))
    state = _ckpt(part / "checkpoints" / "last.pt")["task"]
    assert state["updates"] == 3 and float(state["anchor"]) > 0
    fit(_cfg("dummy-anchor", store, part))
    final = _ckpt(part / "checkpoints" / "final.pt")["task"]
    assert final["updates"] == STEPS  # 3 before the stop + 5 after, counted across the resume
    anchors = [m["anchor"] for m in _train_lines(part)]
    assert anchors[0] == 0.0 and anchors[3] == pytest.approx(float(state["anchor"]))  # step 4 saw the restored mean


def test_each_task_gets_its_own_section(store: SynthStore, tmp_path: Path) -> None:
    prp = _cfg("prp", store, tmp_path)
    assert prp.task_cfg == PRPConfig(num_frames=4, clips_per_video=2) and prp.eval_cfg == {}
    ft = _cfg("finetune", store, tmp_path)
    assert ft.task_cfg == ClipConfig(num_frames=4, stride=2)
    assert ft.eval_cfg == {"multiview": ViewConfig(num_clips=3, num_frames=4, stride=2)}
    d = to_dict(ft)
    assert d["task_cfg"] == dataclasses.asdict(ft.task_cfg) and "prp" not in d and "clip" not in d
    assert load_train_config(json.loads(json.dumps(d))) == ft
    # runtime knobs are not content: they may change when a run resumes
    assert content_of(ft) == content_of(dataclasses.replace(ft, log_every=99, device="cpu", max_steps=3))
    assert content_of(ft) != content_of(dataclasses.replace(ft, seed=1))


def test_sections_are_type_checked_at_parse_time(store: SynthStore, tmp_path: Path) -> None:
    # a wrong type in any task's section is refused, even for another task
    with pytest.raises(ConfigError, match=r"prp.num_frames: expected an integer, got 'four'"):
        _cfg("finetune", store, tmp_path, "prp.num_frames=four")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['anchor.wieght'\]"):
        _cfg("prp", store, tmp_path, "anchor.wieght=1")
    with pytest.raises(ConfigError, match=r"optim.base_lr: expected a number"):
        _cfg("prp", store, tmp_path, "optim.base_lr=fast")
    with pytest.raises(ConfigError, match="task_cfg"):
        _cfg("prp", store, tmp_path, "task_cfg.num_frames=2")
    with pytest.raises(FreezeframeError, match="init .* is not used by task 'prp'"):
        fit(_cfg("prp", store, tmp_path / "run", 'init="somewhere"'))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_task_section_in_a_config_file(store: SynthStore, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("[common]\nseed = 3\n[dummy-anchor]\nanchor.weight = 2.0\n[finetune]\nclip.stride = 3\n")
    cfg = resolve_train_config("dummy-anchor", None, toml, [])
    assert cfg.seed == 3 and cfg.task_cfg.weight == 2.0
    assert resolve_train_config("finetune", None, toml, []).task_cfg.stride == 3


# --------------------------------------------------------------------------------------
# losses against their formulas
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3])
def test_cross_entropy_is_the_label_smoothing_formula(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    want = (-(1 - eps) * logp[torch.arange(7), y] - eps / 5 * logp.sum(1)).mean()
    got = cross_entropy(logits.float(), y, eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # bf16 logits (autocast) are promoted first: the loss equals that of the float32 copy
    b = logits.to(torch.bfloat16)
    assert torch.equal(cross_entropy(b, y, eps), cross_entropy(b.float(), y, eps))


def test_accuracy_by_hand() -> None:
    logits = torch.tensor([[0.1, 0.9], [2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert float(accuracy(logits, torch.tensor([1, 0, 0, 1]))) == 0.5


# --------------------------------------------------------------------------------------
# behaviour preserved by the plug-in refactor
# --------------------------------------------------------------------------------------
#: digests of final weights recorded with main's ``train.engine.train`` (commit 472f90b, before the
#: refactor) for exactly these two runs, CPU, one thread
BEFORE = {"prp": "18d3685746b24057", "ft": "5e3a60a2508a2cc1", "top1": 0.25}
TORCH_RECORDED = "2.14.1"


def _digest(path: Path) -> str:
    sd = _ckpt(path)["model"]
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _lr_before_issue_13(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """The schedule the digests of BEFORE were recorded with (lr 0 on the first step)."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


#: the same runs with warmup starting at step + 1 (no zero learning rate on the first step)
AFTER_WARMUP_FIX = {"prp": "4d617ed3bc798f0f", "ft": "f43d3a57e5779054", "top1": 0.25}


def test_same_weights_with_the_warmup_fix(tmp_path: Path) -> None:
    """The runs below with today's schedule: only the learning rate changed since BEFORE."""
    _same_weights(tmp_path, AFTER_WARMUP_FIX)


def test_same_weights_as_before_the_refactor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PRP (with augmentation) then fine-tuning from it, as recorded before tasks were plug-ins
    (with the learning-rate schedule of that time: every other change keeps the weights)."""
    monkeypatch.setattr(train.loop, "lr_at", _lr_before_issue_13)
    _same_weights(tmp_path, BEFORE)


def _same_weights(tmp_path: Path, BEFORE: dict) -> None:
    st = write_synthetic_store(tmp_path / "s.zarr", num_classes=3)
    tiny = [f'data.store="{st.path}"', *TINY[:-2]]
    fit(resolve_train_config("prp", None, None, [*tiny, f'run_dir="{tmp_path / "prp"}"', "optim.epochs=3", "seed=3",
                                                 'data.augment=["hflip"]']))
    ft = fit(resolve_train_config("finetune", None, None, [
        *tiny, f'run_dir="{tmp_path / "ft"}"', "optim.epochs=3", "seed=4", "model.num_classes=3", "eval_every=1",
        f'init="{tmp_path / "prp"}"']))
    got = {"prp": _digest(tmp_path / "prp/checkpoints/final.pt"), "ft": _digest(tmp_path / "ft/checkpoints/final.pt"),
           "top1": ft.top1}
    if got != BEFORE and not torch.__version__.startswith(TORCH_RECORDED):
        pytest.skip(f"digests recorded with torch {TORCH_RECORDED}, this is {torch.__version__}")
    assert got == BEFORE


def test_cli_refuses_a_wrong_type_in_one_line(store: SynthStore, tmp_path: Path) -> None:
    """``--set`` values are type-checked when parsed; the CLI prints the error without a traceback."""
    cmd = [str(Path(sys.executable).parent / "freezeframe"), "finetune", "--store", str(store.path),
           "--run-dir", str(tmp_path / "run"), "--set", "clip.stride=two"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "220"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "clip.stride: expected an integer, got 'two'" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()
