"""Classification and attention-localisation metrics, accumulated over an epoch (thin over torchmetrics)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torchmetrics.functional.classification as tmf

NAN = float("nan")

# what a GAIN user watches, per split, in the order shown: classification, then where the attention is
HEADLINE = (
    "acc",
    "worst_group_acc",
    "mAP",
    "loc_iou",
    "pointing_game",
    "energy_pg",
    "spurious_energy",
    "deletion_auc",
    "insertion_auc",
)


class ClassificationMetrics:
    """Epoch-level classification metrics as a flat dict of floats with stable key names.

    Single-label: ``acc`` (top-1, micro), ``acc_macro``, ``acc/<class>`` (recall of that class) and
    ``top<k>_acc`` for each k in ``top_k`` with k < K. Binary (K == 2 and ``negative_class`` set) adds
    ``pos_acc``, ``neg_acc``, ``auroc`` (on the positive class's softmax probability) and
    ``sens@fpr<x>`` for each x in ``fpr_levels`` (best sensitivity with false-positive rate <= x).

    Multi-label: ``mAP``, ``AP/<class>``, ``f1_macro`` (sigmoid >= 0.5) and ``top<k>_acc`` = share of
    images whose k highest-scoring classes contain at least one true label (images without any true
    label are left out of it).

    A value that is undefined on the data seen is NaN, never a made-up 0: a class without positives
    gives ``acc/<class>`` / ``AP/<class>`` NaN and is left out of ``acc_macro``, ``mAP`` and ``f1_macro``
    (torchmetrics would count it as 0 or 1); ``auroc`` and ``sens@fpr<x>`` are NaN unless both classes
    occur. Keys never depend on the data, so they can become table columns.
    """

    def __init__(
        self,
        classes: list[str],
        multi_label: bool,
        negative_class: int | None = None,
        fpr_levels: Sequence[float] = (0.01, 0.05, 0.1),
        top_k: Sequence[int] = (1, 3),
    ) -> None:
        if negative_class is not None and not 0 <= negative_class < len(classes):
            raise ValueError(
                f"negative_class={negative_class} is not a class index for {len(classes)} classes; "
                f"set it to one of 0..{len(classes) - 1} or None."
            )
        self.classes = list(classes)
        self.multi_label = multi_label
        self.negative_class = negative_class
        self.fpr_levels = tuple(fpr_levels)
        self.top_k = tuple(k for k in top_k if k < len(classes))
        self.binary = not multi_label and len(classes) == 2 and negative_class is not None
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.classes)

    def reset(self) -> None:
        """Forget everything seen since the last reset."""
        self._logits.clear()
        self._targets.clear()

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: B x K logits and B x K one-/multi-hot float targets."""
        if logits.shape != targets.shape or logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"update expects logits and targets of shape B x {self.num_classes}, got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}."
            )
        # Kept on the CPU: AP and AUROC need every score of the epoch, and GPU memory is for training.
        self._logits.append(logits.detach().float().cpu())
        self._targets.append(targets.detach().float().cpu())

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen since the last reset ({} if nothing was seen)."""
        if not self._logits:
            return {}
        logits = torch.cat(self._logits)
        targets = torch.cat(self._targets)
        if self.multi_label:
            return self._multi_label(logits, targets.round().long())
        return self._single_label(logits, targets.argmax(dim=1))

    def _single_label(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        k = self.num_classes
        support = torch.bincount(labels, minlength=k)
        recall = tmf.multiclass_accuracy(logits, labels, num_classes=k, average=None)
        recall = torch.where(support > 0, recall, NAN)
        out = {
            "acc": tmf.multiclass_accuracy(logits, labels, num_classes=k, average="micro").item(),
            "acc_macro": _nanmean(recall),
        }
        out |= {f"acc/{name}": r for name, r in zip(self.classes, recall.tolist())}
        for top in self.top_k:
            out[f"top{top}_acc"] = tmf.multiclass_accuracy(
                logits, labels, num_classes=k, average="micro", top_k=top
            ).item()
        if self.binary:
            out |= self._binary(logits, labels, recall)
        return out

    def _binary(self, logits: torch.Tensor, labels: torch.Tensor, recall: torch.Tensor) -> dict[str, float]:
        positive = 1 - self.negative_class
        prob = logits.softmax(dim=1)[:, positive]
        is_pos = (labels == positive).long()
        out = {"pos_acc": recall[positive].item(), "neg_acc": recall[self.negative_class].item()}
        # torchmetrics returns 0 (with a warning) when one class is missing: that would read as a real score.
        both = 0 < is_pos.sum().item() < len(is_pos)
        out["auroc"] = tmf.binary_auroc(prob, is_pos).item() if both else NAN
        for x in self.fpr_levels:
            sens = NAN
            if both:
                sens = tmf.binary_sensitivity_at_specificity(prob, is_pos, min_specificity=1 - x)[0].item()
            out[f"sens@fpr{x:g}"] = sens
        return out

    def _multi_label(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        k = self.num_classes
        present = targets.sum(dim=0) > 0
        probs = logits.sigmoid()
        with warnings.catch_warnings():
            # A class without positives warns on every evaluation; its AP becomes NaN just below.
            warnings.filterwarnings("ignore", message="No positive samples")
            ap = tmf.multilabel_average_precision(probs, targets, num_labels=k, average=None)
        ap = torch.where(present, ap, NAN)
        f1 = tmf.multilabel_f1_score(probs, targets, num_labels=k, threshold=0.5, average=None)
        out = {"mAP": _nanmean(ap), "f1_macro": _nanmean(torch.where(present, f1, NAN))}
        out |= {f"AP/{name}": v for name, v in zip(self.classes, ap.tolist())}
        labelled = targets.sum(dim=1) > 0
        for top in self.top_k:
            idx = logits[labelled].topk(top, dim=1).indices
            hit = targets[labelled].gather(1, idx).amax(dim=1).float()
            out[f"top{top}_acc"] = hit.mean().item() if len(hit) else NAN
        return out


class GroupMetrics:
    """Top-1 accuracy per group (e.g. class x spurious-cue value, Sagawa et al. 2020) from exact sums and counts.

    ``group_acc/<name>`` and ``group_n/<name>`` per group, ``worst_group_acc`` (the lowest accuracy of the groups
    seen) and ``mean_group_acc`` (their unweighted mean). A group without samples has ``group_acc`` NaN and is left
    out of both summaries (NaN when no group was seen): an empty group is never scored. Samples with a negative group
    id have no group and are not counted. ``add`` folds in another batch's or process's counts, so the result is the
    same however the split was batched or sharded.

    With ``classes`` (per group: its class and the class its cue value stands for, -1 for none; ``cue_group_classes``)
    it also reports ``cue_follow``: of the images whose cue stands for another class than their label (the
    cue-conflicting groups), the share predicted as the cue's class (0: always right there, 1/K: random guesses,
    1: the cue alone decides), with their count ``cue_conflict_n``; NaN when no such image was seen.
    """

    def __init__(self, names: Sequence[str], classes: Sequence[tuple[int, int]] | None = None) -> None:
        self.names = list(names)
        if classes is not None and len(classes) != len(self.names):
            raise ValueError(f"classes gives {len(classes)} (class, cue class) pairs for {len(self.names)} groups.")
        self.classes = None if classes is None else torch.tensor([list(c) for c in classes], dtype=torch.long)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen since the last reset."""
        self.correct = torch.zeros(len(self.names), dtype=torch.long)
        self.count = torch.zeros(len(self.names), dtype=torch.long)
        self.to_cue = torch.zeros(len(self.names), dtype=torch.long)  # predictions naming the cue's class

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor) -> None:
        """Add a batch: B x K logits, B x K one-hot targets and B long group ids (< 0: no group)."""
        if len(logits) != len(groups) or len(targets) != len(groups):
            raise ValueError(
                f"update expects one group id per image, got {len(groups)} ids for {len(logits)} logits "
                f"and {len(targets)} targets."
            )
        groups = groups.detach().long().cpu()
        if len(groups) and int(groups.max()) >= len(self.names):
            raise ValueError(f"group id {int(groups.max())} is not one of the {len(self.names)} groups {self.names}.")
        pred = logits.detach().argmax(dim=1).cpu()
        correct = (pred == targets.detach().argmax(dim=1).cpu()).long()
        kept = groups >= 0
        ids, size = groups[kept], len(self.names)
        self.correct += torch.bincount(ids, weights=correct[kept], minlength=size).round().long()
        self.count += torch.bincount(ids, minlength=size)
        if self.classes is not None:
            to_cue = (pred[kept] == self.classes[ids, 1]).long()
            self.to_cue += torch.bincount(ids, weights=to_cue, minlength=size).round().long()

    def add(self, other: GroupMetrics) -> None:
        """Fold in what ``other`` has seen (one batch, or another process's share) as if seen here."""
        self.correct += other.correct
        self.count += other.count
        self.to_cue += other.to_cue

    def compute(self) -> dict[str, float]:
        """The metrics over everything seen since the last reset."""
        acc = torch.where(self.count > 0, self.correct / self.count.clamp(min=1), NAN).double()
        seen = acc[self.count > 0]
        out = {
            "worst_group_acc": seen.min().item() if len(seen) else NAN,
            "mean_group_acc": seen.mean().item() if len(seen) else NAN,
        }
        if self.classes is not None:
            label, cue = self.classes.unbind(dim=1)
            conflict = (cue >= 0) & (cue != label)
            n = int(self.count[conflict].sum())
            out["cue_follow"] = int(self.to_cue[conflict].sum()) / n if n else NAN
            out["cue_conflict_n"] = float(n)
        out |= {f"group_acc/{name}": a for name, a in zip(self.names, acc.tolist())}
        out |= {f"group_n/{name}": float(n) for name, n in zip(self.names, self.count.tolist())}
        return out


LOC_THRESHOLD = 0.5  # the cut of a [0, 1] attention map that loc_iou scores (and W&B's attention mask layer shows)


class LocalisationMetrics:
    """Epoch-level agreement of attention maps with ground-truth object masks.

    ``loc_iou``: mean IoU of (map >= threshold) with the mask. ``pointing_game``: share of maps whose
    maximum lies within ``tolerance`` px (Euclidean, as TorchRay, boundary included) of a mask pixel;
    a flat map (max == min) points nowhere and counts as a miss rather than hitting wherever ties fall.
    ``energy_pg``: mean share of a map's total value that lies inside the mask (0 for an all-zero map).
    Pixels marked invalid are left out of all three; maps whose mask has no valid object pixel, and NaN maps (a
    backbone without a spatial map has none), are skipped and counted in ``loc_skipped``; ``loc_n`` maps were scored. The three scores are only in
    the dict once at least one map was scored. Maps are expected normalised to [0, 1].
    """

    def __init__(self, threshold: float = LOC_THRESHOLD, tolerance: int = 15) -> None:
        self.threshold = threshold
        self.tolerance = tolerance
        self.reset()

    def reset(self) -> None:
        """Forget everything seen since the last reset."""
        self._iou = 0.0
        self._hits = 0.0
        self._energy = 0.0
        self._n = 0
        self._skipped = 0

    @torch.no_grad()
    def update(self, attention: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add N x H x W maps in [0, 1], N x H x W object masks and optional N x H x W valid-pixel masks."""
        shapes = [attention.shape, gt.shape] + ([] if valid is None else [valid.shape])
        if attention.ndim != 3 or any(s != attention.shape for s in shapes):
            raise ValueError(
                "update expects attention, gt and valid of the same shape N x H x W, got "
                f"{', '.join(str(tuple(s)) for s in shapes)}."
            )
        att = attention.detach().float()
        valid = torch.ones_like(att, dtype=torch.bool) if valid is None else valid.bool()
        obj = (gt > 0.5) & valid
        used = obj.flatten(1).any(dim=1) & ~att.flatten(1).isnan().any(dim=1)  # NaN: the model has no map
        self._skipped += int((~used).sum())
        att, obj, valid = att[used], obj[used], valid[used]
        if len(att) == 0:
            return
        self._n += len(att)

        pred = (att >= self.threshold) & valid
        inter = (pred & obj).flatten(1).sum(dim=1)
        union = (pred | obj).flatten(1).sum(dim=1)  # >= 1: every kept map has an object pixel
        self._iou += (inter / union).sum().item()

        att_valid = att * valid
        total = att_valid.flatten(1).sum(dim=1)
        inside = (att_valid * obj).flatten(1).sum(dim=1)
        self._energy += torch.where(total > 0, inside / total.clamp(min=1e-12), 0.0).sum().item()

        self._hits += self._pointing_hits(att, obj, valid)

    def _pointing_hits(self, att: torch.Tensor, obj: torch.Tensor, valid: torch.Tensor) -> float:
        n, h, w = att.shape
        flat = att.masked_fill(~valid, float("-inf")).flatten(1)
        peak, idx = flat.max(dim=1)
        low = att.masked_fill(~valid, float("inf")).flatten(1).amin(dim=1)
        py, px = (idx // w).view(n, 1, 1), (idx % w).view(n, 1, 1)
        # Distance from the peak to every pixel is O(HW) per map, cheaper than dilating the mask by a disc.
        ys = torch.arange(h, device=att.device).view(1, h, 1)
        xs = torch.arange(w, device=att.device).view(1, 1, w)
        near = (ys - py) ** 2 + (xs - px) ** 2 <= self.tolerance**2
        hit = (near & obj).flatten(1).any(dim=1) & (peak > low)
        return hit.sum().item()

    def add(self, other: LocalisationMetrics) -> None:
        """Fold in what ``other`` has seen (e.g. one batch, or another process's share) as if seen here."""
        self._iou += other._iou
        self._hits += other._hits
        self._energy += other._energy
        self._n += other._n
        self._skipped += other._skipped

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen since the last reset."""
        out = {"loc_n": float(self._n), "loc_skipped": float(self._skipped)}
        if self._n:
            out |= {
                "loc_iou": self._iou / self._n,
                "pointing_game": self._hits / self._n,
                "energy_pg": self._energy / self._n,
            }
        return out


def am_score_drop(
    logits: torch.Tensor, am_logits: torch.Tensor, classes_onehot: torch.Tensor, multi_label: bool
) -> torch.Tensor:
    """Per-row drop of the true classes' score from image to masked image (N; NaN for rows without a class).

    The score is the softmax probability (single-label) or the sigmoid (multi-label) of each true class,
    averaged over the row's true classes. Average over a split with ``torch.nanmean``.
    """
    squash = torch.sigmoid if multi_label else (lambda x: x.softmax(dim=1))
    weights = classes_onehot.float()
    drop = (squash(logits.detach().float()) - squash(am_logits.detach().float())) * weights
    return drop.sum(dim=1) / weights.sum(dim=1)


def _nanmean(values: torch.Tensor) -> float:
    """Mean of the defined entries; NaN when none is defined."""
    kept = values[~values.isnan()]
    return kept.mean().item() if len(kept) else NAN
