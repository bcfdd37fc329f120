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
from torch.utils.data import Dataset
from tqdm import tqdm

from gain_exp.config.schema import EvalMetricsSchema
from gain_exp.core.attention import normalise
from gain_exp.core.faithfulness import FaithfulnessMetrics, deletion_insertion, spurious_energy
from gain_exp.core.gain import GAIN
from gain_exp.core.losses import GAINLoss, map_masks
from gain_exp.core.metrics import ClassificationMetrics, GroupMetrics, LocalisationMetrics, am_score_drop
from gain_exp.data.base import DataSplits
from gain_exp.output.files import jsonable
from gain_exp.output.panels import Panel, denormalise
from gain_exp.train.runtime import Runtime
from gain_exp.train.signals import StopSafeLoader


@dataclass
class BatchResult:
    """What one evaluated batch contributes; results are gathered across processes and folded in batch order."""

    batch: int
    logits: torch.Tensor
    targets: torch.Tensor
    loss_sum: float
    loc: LocalisationMetrics
    drops: torch.Tensor
    faith: FaithfulnessMetrics = field(default_factory=FaithfulnessMetrics)
    groups: GroupMetrics | None = None  # per-group correct / counts, on data with groups
    panels: list[Panel] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-image results, when asked for


@dataclass
class Evaluation:
    """A split's metrics (keys prefixed with ``split/``), its first panels in split order, (binary data with
    quotas) the first ``positives`` positive and ``negatives`` negative images' panels, and (``rows=True``) one
    per-image results row per image of the split, in split order (see ``Evaluator.image_rows``)."""

    metrics: dict[str, float]
    panels: list[Panel]
    chosen: list[Panel] | None = None
    rows: list[dict[str, Any]] | None = None


EXPLANATION_METRICS = ("spurious_energy", "deletion_insertion")
STAGES = ("epoch", "test", "off")


def explanation_metrics(cfg: EvalMetricsSchema | None, stage: str) -> set[str]:
    """The ``trainer.eval_metrics`` that run at ``stage``: ``epoch`` ones at every evaluation, ``test`` ones at test."""
    if cfg is None:
        return set()
    return {
        m for m in EXPLANATION_METRICS if getattr(cfg, m) == "epoch" or (getattr(cfg, m) == "test" and stage == "test")
    }


@dataclass
class Maps:
    """What a run shows for a batch of images: the first map of each image (None: the image has none), its logits,
    and the classes each map explains."""

    attention: list[torch.Tensor | None]  # H x W in [0, 1] (min-max, as the evaluator scores them), on the CPU
    logits: torch.Tensor  # B x K
    explained: list[list[int]]  # per image: the classes its map explains


class Evaluator:
    """Scores splits with the (unwrapped) GAIN module; ``workers`` DataLoader processes, ``progress`` bars."""

    def __init__(
        self,
        gain: GAIN,
        loss: GAINLoss,
        data: DataSplits,
        runtime: Runtime,
        *,
        batch_size: int,
        workers: int,
        amp: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        progress: bool,
        memory_format: torch.memory_format = torch.contiguous_format,
        eval_metrics: EvalMetricsSchema | None = None,
    ) -> None:
        self.gain, self.loss, self.data, self.runtime = gain, loss, data, runtime
        self.eval_metrics = eval_metrics  # trainer.eval_metrics: what runs when (None: none of them)
        self._explain: set[str] = set()  # the explanation metrics of the split being evaluated
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.mean, self.std = mean, std
        self.memory_format = memory_format
        self._amp = (lambda: torch.autocast(runtime.device.type, dtype=torch.bfloat16)) if amp else nullcontext
        # One map per (image, true class) on multi-label data, whatever the training formulation: a batch map
        # explains the sum of the image's classes, so scoring it against the union of their masks would measure an
        # easier task than a per_label run's and the two formulations would not compare on equal terms.
        self.formulation = "per_label" if data.multi_label else None

    @torch.no_grad()
    def evaluate(
        self,
        dataset: Dataset,
        split: str,
        panels: int = 0,
        quota: tuple[int, int] | None = None,
        rows: bool = False,
        stage: str = "epoch",
    ) -> Evaluation:
        """Metrics of one split and the panels of its first ``panels`` images (and of its first positives and
        negatives, ``quota`` = (positives, negatives), on binary data); ``rows``: every image's results row too.
        ``stage``: ``epoch`` (a validation) or ``test``, which picks the ``eval_metrics`` that run."""
        self._explain = explanation_metrics(self.eval_metrics, stage)
        self.gain.eval()
        rt = self.runtime
        n = len(dataset)
        batches = [list(range(b, min(b + self.batch_size, n))) for b in range(0, n, self.batch_size)]
        mine = list(range(rt.rank, len(batches), rt.world_size))
        loader = StopSafeLoader(
            dataset,
            batch_sampler=[batches[b] for b in mine],
            num_workers=self.workers,
            pin_memory=rt.device.type == "cuda",
        )
        results, left = [], [panels, *(quota or (0, 0))]  # still wanted here: first images, positives, negatives
        for b, batch in zip(mine, tqdm(loader, desc=f"eval {split}", disable=not self.progress, leave=False)):
            result = self._batch(b, batch, left, rows)
            results.append(result)
        results = sorted((r for part in rt.gather(results) for r in part), key=lambda r: r.batch)
        made = [p for r in results for p in r.panels]
        chosen = None
        if quota is not None:
            pos = [p for p in made if p.positive][: quota[0]]
            neg = [p for p in made if not p.positive][: quota[1]]
            chosen = sorted(pos + neg, key=lambda p: p.index)
        return Evaluation(
            self._metrics(results, split),
            [p for p in made if p.first][:panels],
            chosen,
            [row for r in results for row in r.rows] if rows else None,
        )

    @torch.no_grad()
    def batch_panels(self, batch: dict[str, Any], limit: int) -> list[Panel]:
        """Panels of the first ``limit`` images of any batch (e.g. a training batch), by the model as it is now,
        in evaluation mode (no batch-norm update, no random stream used)."""
        was_training = self.gain.training
        self.gain.eval()
        try:
            return self._batch(-1, batch, [limit, 0, 0]).panels
        finally:
            self.gain.train(was_training)

    @torch.no_grad()
    def maps(self, batch: dict[str, Any], true_classes: bool = True) -> Maps:
        """The maps ``evaluate`` scores for a batch, without scoring them: the same forward (memory format,
        autocast, eval mode; GAIN takes Grad-CAM's gradient from a detached feature leaf) minus the mining stream,
        explaining the true classes (``true_classes=False``: the predicted ones), min-max normalised."""
        device = self.runtime.device
        images = batch["image"].to(device, memory_format=self.memory_format)
        targets = batch["target"].to(device) if true_classes else None
        was_training = self.gain.training
        self.gain.eval()
        try:
            with self._amp():
                out = self.gain(images, targets, mining=False, formulation=self.formulation)
        finally:
            self.gain.train(was_training)
        scored = normalise(out.attention.float(), "minmax")
        attention: list[torch.Tensor | None] = [None] * len(images)
        explained: list[list[int]] = [[] for _ in range(len(images))]
        for n, b in enumerate(out.image_index.tolist()):
            if attention[b] is None:
                attention[b] = scored[n].cpu()
                explained[b] = out.map_targets[n].nonzero().flatten().tolist()
        return Maps(attention, out.logits.float().cpu(), explained)

    def _batch(self, index: int, batch: dict[str, Any], left: list[int], with_rows: bool = False) -> BatchResult:
        """One batch's results; ``left`` = panels still wanted (first images, positives, negatives), updated;
        ``with_rows``: with every image's results row."""
        device = self.runtime.device
        images, targets = batch["image"].to(device, memory_format=self.memory_format), batch["target"].to(device)
        seg, has_mask = batch["seg"].to(device), batch["has_mask"].to(device)
        with self._amp():
            out = self.gain(images, targets, formulation=self.formulation)  # explains the true classes
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
        made = self._panels(batch, out, scored, drop, truth, valid, has_mask, left) if any(left) else []
        table = self.image_rows(batch, out, logits, scored, drop, truth, valid, has_mask) if with_rows else []
        faith = self._faithfulness(batch, images, out, scored, valid) if index >= 0 else FaithfulnessMetrics()
        groups = None
        if self.data.groups is not None and "group" in batch:
            groups = GroupMetrics(self.data.groups, self.data.group_classes)
            groups.update(logits, targets, batch["group"])
        return BatchResult(
            index, logits.cpu(), targets.float().cpu(), loss_sum, loc, drop.cpu(), faith, groups, made, table
        )

    def _faithfulness(
        self, batch: dict[str, Any], images: torch.Tensor, out: Any, scored: torch.Tensor, valid: torch.Tensor
    ) -> FaithfulnessMetrics:
        """The batch's ``eval_metrics``: spurious-region energy (samples that mark the region; maps without any
        attention are skipped) and deletion /
        insertion AUC of the first ``eval_metrics.images`` images of the split, each curve following the class
        its map explains (one per map: the evaluator explains each label of multi-label data on its own)."""
        faith = FaithfulnessMetrics()
        cfg = self.eval_metrics
        if "spurious_energy" in self._explain and "spurious" in batch:
            region = batch["spurious"].to(scored.device)[out.image_index]
            # a map with no attention at all (typically a class the model does not see) puts none on the cue
            # either; it is left out (counted in spurious_skipped) rather than scored 0, which would flatter it
            empty = (scored * valid).flatten(1).sum(dim=1) == 0
            faith.update_spurious(spurious_energy(scored, region, valid).masked_fill(empty, math.nan))
        if "deletion_insertion" in self._explain:
            keep = batch["index"].to(scored.device)[out.image_index] < (
                cfg.images if cfg.images is not None else math.inf
            )
            if keep.any():
                explained = out.map_targets[keep]
                classes = (
                    (explained * out.logits.float()[out.image_index][keep])
                    .masked_fill(explained == 0, -math.inf)
                    .argmax(dim=1)
                )

                def model_fn(x: torch.Tensor) -> torch.Tensor:
                    with self._amp():
                        return self.gain(x, attention=False).logits.float()

                deletion, insertion = deletion_insertion(
                    model_fn,
                    images[out.image_index][keep],
                    scored[keep],
                    classes,
                    cfg.steps,
                    cfg.baseline,
                    multi_label=self.data.multi_label,
                    batch_size=max(len(images), 64),
                )
                faith.update(deletion, insertion)
        return faith

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
        faith = FaithfulnessMetrics()
        for r in results:
            faith.add(r.faith)
        explained = {
            k: v
            for k, v in faith.compute().items()
            if ("deletion_insertion" in self._explain and k in ("faith_n", "deletion_auc", "insertion_auc"))
            or ("spurious_energy" in self._explain and k.startswith("spurious_"))
        }
        metrics = {**cls.compute(), **loc.compute(), **explained, "loss_cl": loss_sum / max(count, 1)}
        if d.groups is not None:  # every sample carries its group; counts add exactly over batches and processes
            groups = GroupMetrics(d.groups, d.group_classes)
            for r in results:
                if r.groups is not None:
                    groups.add(r.groups)
            metrics |= groups.compute()
        drops = torch.cat([r.drops for r in results]) if results else torch.empty(0)
        metrics["am_drop"] = float(torch.nanmean(drops)) if drops.numel() else math.nan
        return {f"{split}/{k}": v for k, v in metrics.items()}

    def image_rows(self, batch, out, logits, scored, drop, truth, valid, has_mask) -> list[dict[str, Any]]:
        """One JSON-ready results row per image of the batch, from the batch's already computed maps and drops.

        ``index`` (position in the split), ``true`` / ``pred`` class names (``pred`` as
        ``GAIN.predicted_classes``), ``probs`` (softmax, or sigmoid when multi-label, per class in class order),
        ``score`` (the largest of them), and per map of the image (one, or on multi-label data one per true class
        whatever the training formulation) the class(es) it ``explains``, its ``am_drop`` (true-class score drop on the masked image,
        as the split's am_drop) and, on images with a pixel mask, its ``iou`` and ``pointing`` (0/1) scored exactly
        as the split's loc_iou / pointing_game (None where the map was not scored). ``am_drop`` / ``iou`` of the row
        are the means over its maps.
        """
        names = self.data.classes
        probs = (logits.sigmoid() if self.data.multi_label else logits.softmax(1)).cpu()
        pred = self.gain.predicted_classes(logits).cpu()
        targets, masked = batch["target"].cpu(), has_mask.cpu()
        scored, truth, valid, drop = scored.cpu(), truth.cpu(), valid.cpu(), drop.cpu()
        explains = out.map_targets.cpu()
        maps: dict[int, list[dict[str, Any]]] = {}
        for n, b in enumerate(out.image_index.tolist()):
            scores: dict[str, float] = {}
            if bool(masked[b]):
                loc = LocalisationMetrics()
                loc.update(scored[n : n + 1], truth[n : n + 1], valid[n : n + 1])
                scores = loc.compute()
            maps.setdefault(b, []).append(
                {
                    "explains": [names[c] for c in explains[n].nonzero().flatten().tolist()],
                    "am_drop": jsonable(float(drop[n])),
                    "iou": jsonable(scores.get("loc_iou")),
                    "pointing": jsonable(scores.get("pointing_game")),
                }
            )
        rows = []
        groups = self.data.groups if "group" in batch else None
        for b in range(len(targets)):
            mine = maps.get(b, [])
            g = int(batch["group"][b]) if groups is not None else -1
            group = {"group": groups[g] if g >= 0 else None} if groups is not None else {}
            rows.append(
                {
                    "index": int(batch["index"][b]),
                    **group,
                    "true": [names[c] for c in targets[b].nonzero().flatten().tolist()],
                    "pred": [names[c] for c in pred[b].nonzero().flatten().tolist()],
                    "score": jsonable(float(probs[b].max())),
                    "probs": [jsonable(float(p)) for p in probs[b]],
                    "am_drop": _mean([m["am_drop"] for m in mine]),
                    "iou": _mean([m["iou"] for m in mine]),
                    "maps": mine,
                }
            )
        return rows

    def _panels(self, batch, out, scored, drop, truth, valid, has_mask, left: list[int]) -> list[Panel]:
        """Panels for the first map of each image of the batch that is still wanted: among the first ``left[0]``
        images, or (binary data) the first ``left[1]`` positives / ``left[2]`` negatives. Updates ``left``.

        ``scored`` (min-max maps) and ``drop`` (AM-score drop per map) are the batch's, already computed.
        """
        negative = self.data.negative_class
        names = self.data.classes
        probs = out.logits.float().sigmoid() if self.data.multi_label else out.logits.float().softmax(1)
        pred = self.gain.predicted_classes(out.logits.float())
        seen: set[int] = set()
        panels = []
        for n, b in enumerate(out.image_index.tolist()):
            if b in seen:
                continue
            seen.add(b)
            positive = negative is None or bool(batch["target"][b][negative] < 0.5)
            first, quota = left[0] > 0, left[1 if positive else 2] > 0
            if not (first or quota):
                continue
            left[0] -= first
            left[1 if positive else 2] -= quota
            masked = out.masked_images[n].float().cpu()
            loc = LocalisationMetrics()
            gt = truth[n].cpu() if bool(has_mask[b]) else None
            if gt is not None:
                loc.update(scored[n : n + 1].cpu(), gt.unsqueeze(0), valid[n : n + 1].cpu())  # as the split's loc_iou
            panels.append(
                Panel(
                    index=int(batch["index"][b]),
                    image=denormalise(batch["image"][b], self.mean, self.std),
                    attention=scored[n].cpu(),
                    mask=out.mask[n].float().cpu(),
                    masked_image=denormalise(masked, self.mean, self.std),
                    gt_mask=gt,
                    true_classes=[names[c] for c in batch["target"][b].nonzero().flatten().tolist()],
                    pred_classes=[names[c] for c in pred[b].nonzero().flatten().tolist()],
                    explained=", ".join(names[c] for c in out.map_targets[n].nonzero().flatten().tolist()),
                    score=float(probs[b].max()),
                    am_drop=float(drop[n]),
                    iou=loc.compute().get("loc_iou"),
                    positive=positive,
                    first=first,
                )
            )
        return panels


def _mean(values: list[float | None]) -> float | None:
    """Mean of the defined values (None when none is)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
