"""``propagation``: label propagation on a dense benchmark (DAVIS-2017, JHMDB, VIP).

The CRW protocol (:mod:`train.dense.propagate`) on a dense store of the benchmark's frames
(``freezeframe dense-extract``). With ``tokens = "model"`` the trained model maps every
token ``(..., C) -> (..., C')`` before propagation (a Co-Settle projection); with ``"raw"``
the stored tokens are used as they are. Results go to ``out`` (default
``<run_dir>/propagation-<benchmark>``) in the official layout; the scores are the
benchmark's (DAVIS: ``J_mean``, ``F_mean``, ``JF_mean``, ``per_sequence``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manifests.dense import build_dense
from pipeline.errors import FreezeframeError
from pipeline.store import FeatureStore
from train.dense.evaluate import BENCHMARKS, propagate_store, score_results
from train.dense.propagate import PropagationConfig
from train.evals.base import Evaluation
from train.evals.registry import register_evaluation
from train.schema import TrainConfig

DEFAULT_SPLIT = {"davis2017": "val", "vip": "val", "jhmdb": "test"}


@dataclass(frozen=True)
class PropagationEvalConfig:
    """The ``[propagation]`` section.

    Attributes:
        benchmark: ``davis2017``, ``jhmdb`` or ``vip``.
        root: the benchmark's folder in its official layout.
        store: dense store of its frames (``freezeframe dense-extract``).
        split: the split (empty: val for DAVIS and VIP, test for JHMDB).
        out: results folder (empty: ``<run_dir>/propagation-<benchmark>``).
        tokens: ``model`` (map tokens through the trained model) or ``raw``.
        topk: 0 = the benchmark's (7; VIP 10).
        context, radius, temperature: the CRW protocol's.
    """

    benchmark: str = "davis2017"
    root: str = ""
    store: str = ""
    split: str = ""
    out: str = ""
    tokens: str = "model"
    topk: int = 0
    context: int = 20
    radius: float = 20.0
    temperature: float = 0.7


@dataclass(frozen=True)
class PropagationOutput:
    """Scores of a propagation run (JSON of the benchmark's scorer) and where results are."""

    benchmark: str
    results: str
    scores: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "results": self.results, **self.scores}

    def summary(self) -> dict[str, float]:
        key = BENCHMARKS.get(self.benchmark).headline
        return {key: float(self.scores[key])}


@register_evaluation("propagation")
class PropagationEval(Evaluation):
    section = "propagation"
    Config = PropagationEvalConfig

    def _videos(self, opts: PropagationEvalConfig):
        if not opts.root or not opts.store:
            raise FreezeframeError(
                "the propagation evaluation needs propagation.root (the benchmark folder) and "
                "propagation.store (a dense store from `freezeframe dense-extract`)"
            )
        if opts.tokens not in ("model", "raw"):
            raise FreezeframeError(f"propagation.tokens must be 'model' or 'raw', got {opts.tokens!r}")
        bench = BENCHMARKS.get(opts.benchmark)
        return build_dense(bench.manifest_format, root=opts.root, split=opts.split or DEFAULT_SPLIT[opts.benchmark])

    def preflight(self, store: FeatureStore, cfg: TrainConfig) -> None:
        self._videos(self.options(cfg))  # every manifest problem now, not after training
        if not Path(self.options(cfg).store).exists():
            raise FreezeframeError(f"propagation.store {self.options(cfg).store!r} does not exist")

    @torch.no_grad()
    def run(self, model: nn.Module, store: FeatureStore, cfg: TrainConfig, device: torch.device) -> PropagationOutput:
        opts = self.options(cfg)
        videos = self._videos(opts)
        bench = BENCHMARKS.get(opts.benchmark)
        pcfg = PropagationConfig(context=opts.context, radius=opts.radius, temperature=opts.temperature,
                                 topk=opts.topk or bench.topk)
        out = opts.out or str(Path(cfg.run_dir or ".") / f"propagation-{opts.benchmark}")
        was_training = model.training
        model.eval()

        def project(tokens: torch.Tensor) -> torch.Tensor:
            return model(tokens.to(device)).float().cpu()

        try:
            propagate_store(opts.store, videos, out, pcfg, projection=project if opts.tokens == "model" else None,
                            device=device)
        finally:
            model.train(was_training)
        return PropagationOutput(opts.benchmark, out, score_results(opts.benchmark, videos, out))
