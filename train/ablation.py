"""A sweep's report in the shape of AdViSe's ablation tables.

The paper reports its ablations one factor at a time (compression of the cached tokens:
spatial pooling and channel pooling; TMM width; TMM depth), each row with the model's cost
(parameters, multiply-accumulates per clip: :mod:`train.stats`, the paper's convention) and
its accuracy, from scratch and after PRP pretraining, and the gain Delta-Acc (percentage
points). Here a table is a spec's ``[[tables]]`` entry (title + swept keys); its rows are the
sweep's points that change only those keys, plus the base point (no override) as reference.
Each table also gets a chart: top-1 against MACs per clip, one marker per row.

Sample sizes and intervals: each top-1 is printed with its Wilson 95 % interval over the run's
test videos (``46.9 [31, 63]``), the number of test videos ``n`` once under the table when every
row shares it (else a column), and each Delta-Acc with the exact paired McNemar p-value of the
PRP-initialised run against its scratch twin on the same videos (``-`` when an ``eval.json``
predates the per-video predictions). The charts draw the intervals as error bars.

The report itself is :func:`train.report.write_report` (every run, Delta-Acc pairs, curves)
with these tables as extra sections, written to ``<out>/report.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.store import read_header
from train import plots
from train.report import RunRecord, format_p, format_top1, load_run, mcnemar_p, write_report
from train.stats import head_params, tmm_stats_for_config
from train.sweep import PRP_FT_SUFFIX, SweepRun, SweepSpec, SweepTable, expand_sweep, run_names

__all__ = ["AblationRow", "ablation_rows", "render_ablation", "write_sweep_report"]


@dataclass(frozen=True)
class AblationRow:
    """One row: the point, its values of the table's keys, cost and accuracies (fractions).

    ``interval_scratch`` / ``interval_prp``: Wilson 95 % intervals (fractions) of the two top-1s;
    ``n_scratch`` / ``n_prp``: their test videos; ``p_value``: exact paired McNemar test of the PRP
    run against the scratch run on the same test videos. None where unknown (no run, no
    ``eval.json``, or one without per-video predictions).
    """

    point: str
    values: tuple[str, ...]
    tokens: int  # tokens per frame the TMM sees (after spatial pooling)
    channels: int  # channels the TMM sees (after channel pooling)
    params: int  # trainable parameters, TMM + head
    macs: int  # multiply-accumulates per clip of the TMM convolutions (0 without a TMM)
    top1_scratch: float | None
    top1_prp: float | None
    interval_scratch: tuple[float, float] | None = None
    interval_prp: tuple[float, float] | None = None
    n_scratch: int | None = None
    n_prp: int | None = None
    p_value: float | None = None

    @property
    def n(self) -> str:
        """The row's test videos as a cell: ``32``, ``32/30`` when the two runs differ, ``-``."""
        ns = list(dict.fromkeys(v for v in (self.n_scratch, self.n_prp) if v is not None))
        return "/".join(str(v) for v in ns) or "-"

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
        scratch_dir, prp_dir = Path(spec.out) / p.name, Path(spec.out) / (p.name + PRP_FT_SUFFIX)
        scratch: RunRecord | None = load_run(scratch_dir) if scratch_dir.is_dir() else None
        prp: RunRecord | None = load_run(prp_dir) if spec.delta and prp_dir.is_dir() else None
        out.append(AblationRow(
            p.name, tuple(_value_of(p, k, cfg) for k in table.keys), tokens, channels, params, macs,
            scratch.top1 if scratch else None, prp.top1 if prp else None,
            scratch.top1_interval if scratch else None, prp.top1_interval if prp else None,
            scratch.num_videos if scratch else None, prp.num_videos if prp else None,
            mcnemar_p(prp, scratch) if scratch and prp else None))
    return out


def render_ablation(table: SweepTable, rows: Sequence[AblationRow], delta: bool) -> str:
    """Markdown of one ablation table: top-1 (%) with its Wilson 95 % interval, ΔAcc (pp) with the
    McNemar p; ``n = ...`` on a line under the table when every row has the same test videos, else
    an ``n`` column."""
    shared = {r.n for r in rows} - {"-"}
    n_column = len(shared) > 1
    cols = [k.rsplit(".", 1)[-1] for k in table.keys] + ["tokens/frame", "C", "params", "GMACs/clip"]
    cols += (["n"] if n_column else []) + ["top-1 % scratch"]
    cols += ["top-1 % PRP", "ΔAcc (pp)", "McNemar p"] if delta else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [*r.values, str(r.tokens), str(r.channels), f"{r.params:,}", f"{r.macs / 1e9:.3f}"]
        cells += ([r.n] if n_column else []) + [format_top1(r.top1_scratch, r.interval_scratch, 1)]
        if delta:
            cells += [format_top1(r.top1_prp, r.interval_prp, 1), "-" if r.delta is None else f"{100 * r.delta:+.1f}",
                      format_p(r.p_value)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(shared) == 1:
        lines += ["", f"n = {shared.pop()} test videos per run; top-1 % [Wilson 95 % interval]"
                  + ("; McNemar p: exact paired test of PRP vs scratch on the same videos." if delta else ".")]
    return "\n".join(lines)


def write_sweep_report(spec: SweepSpec, configs: dict[str, Any]) -> Path:
    """``<out>/report.md``: the ablation tables (with a chart each) then every run
    (:func:`train.report.write_report`). ``configs``: run name -> resolved config, every run."""
    out = Path(spec.out)
    tables = spec.tables or [SweepTable("Ablation", list(dict.fromkeys(
        o.split("=", 1)[0] for p in expand_sweep(spec) for o in p.overrides)))]
    sections = ["## Ablation tables", "",
                "Params: trainable parameters of TMM + head; MACs: the TMM convolutions per clip "
                "(`freezeframe stats`, the paper's convention); top-1 of the multi-view test with its "
                "Wilson 95 % interval [low, high] over the test videos (n); "
                "ΔAcc = PRP-initialised - scratch, percentage points, with the exact paired McNemar p on "
                "the same test videos (p >= 0.05: not resolved by this test set).", ""]
    for i, t in enumerate(tables):
        rows = ablation_rows(spec, t, configs)
        if not rows:
            continue
        sections += [f"### {t.title}", "", render_ablation(t, rows, spec.delta), ""]
        points = [plots.AblationPoint(" ".join(r.values), r.macs, r.params, r.top1_scratch, r.top1_prp,
                                      r.interval_scratch, r.interval_prp) for r in rows]
        if any(p.top1_scratch is not None or p.top1_prp is not None for p in points):
            chart = plots.plot_ablation(points, out / f"ablation_{i}.png", title=t.title)
            sections += [f"![{t.title}: top-1 against MACs]({chart.name})", ""]
    names = [n for n in run_names(spec) if (out / n).is_dir()]
    return write_report([out / n for n in names], out / "report.md", title=f"sweep {out.name}",
                        extra_sections=["\n".join(sections)])
