"""Evaluation of one split: classification, localisation and AM-score metrics, plus the attention panels.

Under several processes each one scores every W-th batch of the split (the batches themselves are the same as in
one process), the per-batch results are gathered in batch order, and the metrics are computed from them exactly as
one process would: every image counts once and the numbers equal a single-process run's.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from gain_exp.attention import normalise
from gain_exp.data.base import DataSplits
from gain_exp.gain import GAIN
from gain_exp.losses import GAINLoss, map_masks
from gain_exp.metrics import ClassificationMetrics, LocalisationMetrics, am_score_drop
from gain_exp.runtime import Runtime
from gain_exp.viz import Panel, denormalise


@dataclass
class BatchResult:
    """What one evaluated batch contributes; results are gathered across processes and folded in batch order."""

    batch: int
    logits: torch.Tensor
    targets: torch.Tensor
    loss_sum: float
    loc: LocalisationMetrics
    drops: torch.Tensor
    panels: list[Panel] = field(default_factory=list)


@dataclass
class Evaluation:
    """A split's metrics (keys prefixed with ``split/``) and its first panels in split order."""

    metrics: dict[str, float]
    panels: list[Panel]


class Evaluator:
    """Scores splits with the (unwrapped) GAIN module; ``workers`` DataLoader processes, ``progress`` bars."""

    def __init__(self, gain: GAIN, loss: GAINLoss, data: DataSplits, runtime: Runtime, *, batch_size: int,
                 workers: int, amp: bool, mean: tuple[float, ...], std: tuple[float, ...], progress: bool,
                 worker_init_fn: Any = None, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.gain, self.loss, self.data, self.runtime = gain, loss, data, runtime
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.mean, self.std = mean, std
        self.worker_init_fn = worker_init_fn
        self.memory_format = memory_format
        self._amp = (lambda: torch.autocast(runtime.device.type, dtype=torch.bfloat16)) if amp else nullcontext

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, split: str, panels: int = 0) -> Evaluation:
        """Metrics of one split and the panels of its first ``panels`` images."""
        self.gain.eval()
        rt = self.runtime
        n = len(dataset)
        batches = [list(range(b, min(b + self.batch_size, n))) for b in range(0, n, self.batch_size)]
        mine = list(range(rt.rank, len(batches), rt.world_size))
        loader = DataLoader(dataset, batch_sampler=[batches[b] for b in mine], num_workers=self.workers,
                            worker_init_fn=self.worker_init_fn, pin_memory=rt.device.type == "cuda")
        results, made = [], 0
        for b, batch in zip(mine, tqdm(loader, desc=f"eval {split}", disable=not self.progress, leave=False)):
            result = self._batch(b, batch, panels - made)
            made += len(result.panels)
            results.append(result)
        results = sorted((r for part in rt.gather(results) for r in part), key=lambda r: r.batch)
        return Evaluation(self._metrics(results, split), [p for r in results for p in r.panels][:panels])

    def _batch(self, index: int, batch: dict[str, Any], panels: int) -> BatchResult:
        device = self.runtime.device
        images, targets = batch["image"].to(device, memory_format=self.memory_format), batch["target"].to(device)
        seg, has_mask = batch["seg"].to(device), batch["has_mask"].to(device)
        with self._amp():
            out = self.gain(images, targets)  # explains the true classes
        logits = out.logits.float()
        loss_sum = float(self.loss.classification(logits, targets)) * len(images)
        truth, valid = map_masks(out, seg)
        rows = has_mask[out.image_index]
        # Scored on the min-max view of each map whatever gain.normalisation is (for max and none it is the
        # same map up to scale), so runs that differ in normalisation compare on equal terms.
        scored = normalise(out.attention.float(), "minmax")
        loc = LocalisationMetrics()
        if rows.any():
            loc.update(scored[rows], truth[rows], valid[rows])
        drop = am_score_drop(logits[out.image_index], out.am_logits.float(), out.map_targets, self.data.multi_label)
        made = self._panels(batch, out, scored, drop, truth, valid, has_mask, panels) if panels > 0 else []
        return BatchResult(index, logits.cpu(), targets.float().cpu(), loss_sum, loc, drop.cpu(), made)

    def _metrics(self, results: list[BatchResult], split: str) -> dict[str, float]:
        d = self.data
        cls = ClassificationMetrics(d.classes, d.multi_label, d.negative_class)
        loc = LocalisationMetrics()
        loss_sum, count = 0.0, 0
        for r in results:
            cls.update(r.logits, r.targets)
            loc.add(r.loc)
            loss_sum += r.loss_sum
            count += len(r.logits)
        metrics = {**cls.compute(), **loc.compute(), "loss_cl": loss_sum / max(count, 1)}
        drops = torch.cat([r.drops for r in results]) if results else torch.empty(0)
        metrics["am_drop"] = float(torch.nanmean(drops)) if drops.numel() else math.nan
        return {f"{split}/{k}": v for k, v in metrics.items()}

    def _panels(self, batch, out, scored, drop, truth, valid, has_mask, limit: int) -> list[Panel]:
        """Panels for the first map of each of the first ``limit`` images of the batch.

        ``scored`` (min-max maps) and ``drop`` (AM-score drop per map) are the batch's, already computed.
        """
        names = self.data.classes
        probs = out.logits.float().sigmoid() if self.data.multi_label else out.logits.float().softmax(1)
        pred = self.gain.predicted_classes(out.logits.float())
        seen: set[int] = set()
        panels = []
        for n, b in enumerate(out.image_index.tolist()):
            if b in seen or len(panels) >= limit:
                continue
            seen.add(b)
            masked = out.masked_images[n].float().cpu()
            loc = LocalisationMetrics()
            gt = truth[n].cpu() if bool(has_mask[b]) else None
            if gt is not None:
                loc.update(scored[n:n + 1].cpu(), gt.unsqueeze(0), valid[n:n + 1].cpu())  # as the split's loc_iou
            panels.append(Panel(
                index=int(batch["index"][b]),
                image=denormalise(batch["image"][b], self.mean, self.std),
                attention=scored[n].cpu(), mask=out.mask[n].float().cpu(),
                masked_image=denormalise(masked, self.mean, self.std), gt_mask=gt,
                true_classes=[names[c] for c in batch["target"][b].nonzero().flatten().tolist()],
                pred_classes=[names[c] for c in pred[b].nonzero().flatten().tolist()],
                explained=", ".join(names[c] for c in out.map_targets[n].nonzero().flatten().tolist()),
                score=float(probs[b].max()),
                am_drop=float(drop[n]),
                iou=loc.compute().get("loc_iou"),
            ))
        return panels
