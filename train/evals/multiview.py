"""``multiview``: the multi-view classification test (AdViSe's protocol).

Every test video gives ``test.num_clips`` clips spread evenly over it x ``test.spatial_crops``
spatial crops (3: left/centre/right or top/centre/bottom, stored at extraction with
``test_crops=3``: the 30-view test); the model's logits are averaged over the views of a video,
then top-1, top-5, per-class accuracy and the confusion matrix are computed
(``train.metrics.EvalResult``). With 3 crops the result also holds the centre-crop-only
(10-view) top-1 and predictions, averaged from the same logits (no second pass).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from pipeline.store import FeatureStore
from train.data import CENTRE_CROP, TestViewConfig, TestViewDataset, collate, to_model_dtype
from train.evals.registry import register_evaluation
from train.evals.base import Evaluation
from train.metrics import EvalResult, evaluate_logits
from train.plots import plot_confusion
from train.rundir import RunDir
from train.schema import TrainConfig


@register_evaluation("multiview")
class MultiViewTest(Evaluation):
    section = "test"
    Config = TestViewConfig
    distributed = True  # under torchrun each rank scores every world-th video; logits are gathered

    def preflight(self, store: FeatureStore, cfg: TrainConfig) -> None:
        # refuses an empty test split, and test.spatial_crops=3 with test videos without stored crops, now
        TestViewDataset(store, cfg.data.test_split, self.options(cfg))

    @torch.no_grad()
    def run(self, model: nn.Module, store: FeatureStore, cfg: TrainConfig, device: torch.device) -> EvalResult:
        """Logits of every view ``(B, V, K)`` averaged over V per video; eval mode, restored after.

        Under torchrun (a process group) rank r scores videos r, r + world, ... on its own device
        and the per-video logits are gathered on every rank, in video order: the same result as
        one process, in 1/world of the time."""
        opts = self.options(cfg)
        ds = TestViewDataset(store, cfg.data.test_split, opts)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = list(range(rank, len(ds), world))
        loader = DataLoader(Subset(ds, mine), batch_size=8, num_workers=0, collate_fn=collate,
                            generator=torch.Generator())  # leaves the global RNG alone
        was_training = model.training
        model.eval()
        all_logits, all_centre, all_targets = [], [], []
        for x, y in loader:  # x: (B, V, T, H, W, C), V = clips x crops
            b, v = x.shape[:2]
            views = model(to_model_dtype(x.flatten(0, 1).to(device, non_blocking=True))).float().reshape(b, v, -1)
            all_logits.append(views.mean(1).cpu())
            all_centre.append(centre_mean(views, ds.crops).cpu())
            all_targets.append(y)
        model.train(was_training)
        empty = torch.zeros(0, cfg.model.num_classes)
        logits = torch.cat(all_logits) if all_logits else empty
        centre = torch.cat(all_centre) if all_centre else empty
        targets = torch.cat(all_targets) if all_targets else torch.zeros(0, dtype=torch.long)
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, (mine, logits, centre, targets))
            order = torch.tensor([i for p in parts for i in p[0]]).argsort()
            logits = torch.cat([p[1] for p in parts])[order]
            centre = torch.cat([p[2] for p in parts])[order]
            targets = torch.cat([p[3] for p in parts])[order]
        names = class_names(store, cfg.model.num_classes)
        res = evaluate_logits(logits, targets, names, views=ds.views, video_ids=ds.video_ids)
        res.spatial_crops, res.crops_note = ds.crops, ds.crops_note
        if ds.crops > 1:
            one = evaluate_logits(centre, targets, names, views=opts.num_clips, video_ids=ds.video_ids)
            res.centre_top1, res.centre_predictions = one.top1, one.predictions
        return res

    def plot(self, out: EvalResult, run: RunDir, title: str | None = None) -> list[Path]:  # type: ignore[override]
        return [plot_confusion(out, run.confusion_png, title=title)]


def centre_mean(view_logits: torch.Tensor, crops: int) -> torch.Tensor:
    """Logits ``(B, clips x crops, K)`` (view ``k * crops + c``) -> the mean over the clips of
    the centre crop alone ``(B, K)`` (:data:`train.data.CENTRE_CROP`)."""
    b, v, k = view_logits.shape
    return view_logits.reshape(b, v // crops, crops, k)[:, :, CENTRE_CROP[crops]].mean(1)


def class_names(store: FeatureStore, num_classes: int) -> list[str]:
    """The store's label names in class order (the index itself where a class has no video)."""
    names: list[str | None] = [None] * num_classes
    for vid in store.video_ids:
        e = store.meta(vid)
        if e.label is not None and e.label < len(names):
            names[e.label] = e.label_name
    return [n or str(i) for i, n in enumerate(names)]
