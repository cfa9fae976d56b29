"""A sweep's report in the shape of AdViSe's ablation tables.

The paper reports its ablations one factor at a time (compression of the cached tokens:
spatial pooling and channel pooling; TMM width; TMM depth), each row with the model's cost
(parameters, multiply-accumulates per clip: :mod:`train.stats`, the paper's convention) and
its accuracy, from scratch and after PRP pretraining, and the gain Delta-Acc (percentage
points). Here a table is a spec's ``[[tables]]`` entry (title + swept keys); its rows are the
sweep's points that change only those keys, plus the base point (no override) as reference.
Each table also gets a chart: top-1 against MACs per clip, one marker per row.

The report itself is :func:`train.report.write_report` (every run, Delta-Acc pairs, curves)
with these tables as extra sections, written to ``<out>/report.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.store import read_header
from train import plots
from train.report import load_run, write_report
from train.stats import head_params, tmm_stats_for_config
from train.sweep import PRP_FT_SUFFIX, SweepRun, SweepSpec, SweepTable, expand_sweep, run_names

__all__ = ["AblationRow", "ablation_rows", "render_ablation", "write_sweep_report"]


@dataclass(frozen=True)
class AblationRow:
    """One row: the point, its values of the table's keys, cost and accuracies (fractions)."""

    point: str
    values: tuple[str, ...]
    tokens: int  # tokens per frame the TMM sees (after spatial pooling)
    channels: int  # channels the TMM sees (after channel pooling)
    params: int  # trainable parameters, TMM + head
    macs: int  # multiply-accumulates per clip of the TMM convolutions (0 without a TMM)
    top1_scratch: float | None
    top1_prp: float | None

    @property
    def delta(self) -> float | None:
        if self.top1_scratch is None or self.top1_prp is None:
            return None
        return self.top1_prp - self.top1_scratch


def _cost(cfg: Any) -> tuple[int, int, int, int]:
    """(tokens per frame, channels, params, MACs per clip) of a resolved fine-tuning config."""
    h, w, c = read_header(cfg.data.store)["content"]["feature_shape"]
    m = cfg.model
    tokens = (m.spatial_pool ** 2) if m.spatial_pool else h * w
    channels = m.channel_pool or c
    if m.arch != "tmm":  # no TMM: the head on the pooled features
        return tokens, channels, head_params(channels, m.num_classes, m.mlp_dim), 0
    s = tmm_stats_for_config(m, cfg.task_cfg.num_frames, (h, w))
    return tokens, channels, s.tmm_params + s.head_params, s.tmm_macs


def _table_points(points: Sequence[SweepRun], table: SweepTable) -> list[SweepRun]:
    keys = set(table.keys)
    return [p for p in points if {o.split("=", 1)[0] for o in p.overrides} <= keys]


def _value_of(point: SweepRun, key: str, cfg: Any) -> str:
    for o in point.overrides:
        k, v = o.split("=", 1)
        if k == key:
            return v.strip('"')
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part, None)
    return "base" if obj is None else str(obj)


def ablation_rows(spec: SweepSpec, table: SweepTable, configs: dict[str, Any]) -> list[AblationRow]:
    """The rows of ``table``: ``configs`` maps every run name of the sweep to its resolved config."""
    out = []
    for p in _table_points(expand_sweep(spec), table):
        cfg = configs[p.name]
        tokens, channels, params, macs = _cost(cfg)
        scratch = load_run(Path(spec.out) / p.name).top1 if (Path(spec.out) / p.name).is_dir() else None
        prp_dir = Path(spec.out) / (p.name + PRP_FT_SUFFIX)
        prp = load_run(prp_dir).top1 if spec.delta and prp_dir.is_dir() else None
        out.append(AblationRow(p.name, tuple(_value_of(p, k, cfg) for k in table.keys), tokens, channels, params,
                               macs, scratch, prp))
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def render_ablation(table: SweepTable, rows: Sequence[AblationRow], delta: bool) -> str:
    """Markdown of one ablation table."""
    cols = [k.rsplit(".", 1)[-1] for k in table.keys] + ["tokens/frame", "C", "params", "GMACs/clip", "top-1 % scratch"]
    cols += ["top-1 % PRP", "ΔAcc (pp)"] if delta else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [*r.values, str(r.tokens), str(r.channels), f"{r.params:,}", f"{r.macs / 1e9:.3f}", _pct(r.top1_scratch)]
        if delta:
            cells += [_pct(r.top1_prp), "-" if r.delta is None else f"{100 * r.delta:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep_report(spec: SweepSpec, configs: dict[str, Any]) -> Path:
    """``<out>/report.md``: the ablation tables (with a chart each) then every run
    (:func:`train.report.write_report`). ``configs``: run name -> resolved config, every run."""
    out = Path(spec.out)
    tables = spec.tables or [SweepTable("Ablation", list(dict.fromkeys(
        o.split("=", 1)[0] for p in expand_sweep(spec) for o in p.overrides)))]
    sections = ["## Ablation tables", "",
                "Params: trainable parameters of TMM + head; MACs: the TMM convolutions per clip "
                "(`freezeframe stats`, the paper's convention); top-1 of the multi-view test; "
                "ΔAcc = PRP-initialised - scratch, percentage points.", ""]
    for i, t in enumerate(tables):
        rows = ablation_rows(spec, t, configs)
        if not rows:
            continue
        sections += [f"### {t.title}", "", render_ablation(t, rows, spec.delta), ""]
        points = [plots.AblationPoint(" ".join(r.values), r.macs, r.params, r.top1_scratch, r.top1_prp) for r in rows]
        if any(p.top1_scratch is not None or p.top1_prp is not None for p in points):
            chart = plots.plot_ablation(points, out / f"ablation_{i}.png", title=t.title)
            sections += [f"![{t.title}: top-1 against MACs]({chart.name})", ""]
    names = [n for n in run_names(spec) if (out / n).is_dir()]
    return write_report([out / n for n in names], out / "report.md", title=f"sweep {out.name}",
                        extra_sections=["\n".join(sections)])
