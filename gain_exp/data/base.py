"""The contract every dataset follows: how it is built, what one sample holds and what a built dataset exposes.

A dataset is one module with a ``build`` function, named by ``_target_`` in its conf/dataset/<name>.yaml (typed by
its schema in gain_exp/config/schema.py). ``build`` takes that YAML's keys as keyword arguments plus the runtime arguments
the app passes to every builder (RUNTIME_ARGS, keyword-only; a builder that does not use one still accepts it) and
returns a DataSplits. run.py calls ``instantiate(cfg.dataset, **runtime)`` with exactly these, no signature inspection.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NotRequired, Protocol, Sequence, TypedDict

import torch
from torch.utils.data import Dataset

IGNORE_INDEX = 255  # label-map value excluded from L_e and localisation metrics (VOC's border label)


class Sample(TypedDict):
    """One sample as every dataset returns it (default collate stacks these into a batch)."""

    image: torch.Tensor  # 3 x H x W float, normalised with the backbone's mean/std
    target: torch.Tensor  # K float, multi-hot (multi-label) or one-hot (single-label)
    seg: torch.Tensor  # H x W long label map: 0 background, c + 1 class c, 255 ignore; zeros if no mask
    has_mask: torch.Tensor  # bool scalar: seg is a real pixel mask (drives localisation metrics)
    use_mask: torch.Tensor  # bool scalar: this sample's mask may feed L_e (the masks_to_use budget)
    index: int  # position of the sample in its split
    spurious: NotRequired[torch.Tensor]  # H x W bool: where a known spurious cue lives (built-in benchmarks)
    group: NotRequired[
        torch.Tensor
    ]  # long scalar: the sample's group (class x cue value), an index of DataSplits.groups


@dataclass
class DataSplits:
    """A built dataset: named splits plus what the model and metrics need to know about the labels."""

    train: Dataset
    val: Dataset
    tests: dict[str, Dataset]  # name -> split evaluated at the end, e.g. {"test_biased": ..., "test_unbiased": ...}
    classes: list[str]
    multi_label: bool  # True: BCE + mAP; False: cross-entropy + accuracy
    negative_class: int | None = None  # binary datasets: index of the "negative" class (AM on positives only)
    train_sampler: torch.utils.data.Sampler | None = None  # optional custom sampler for train
    # names of the groups every sample of every split carries as ``group`` (single-label data with a known cue: class x
    # cue value); None: the data has no groups. Metrics: worst_group_acc, mean_group_acc, group_acc/<name>.
    groups: list[str] | None = None
    extras: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class TensorSplit(Dataset):
    """One split held in memory as uint8 tensors (the generated benchmarks: shapes, decoy_digits), normalised on
    access. ``images`` N x 3 x H x W, ``seg`` N x H x W label map, ``targets`` N x K float, ``use_mask`` N bool;
    ``spurious`` N x H x W bool where the split's known cue lives, None: the background (seg == 0); ``augment``:
    random horizontal flip of the image with its masks; ``groups`` N long group ids (``cue_group_ids``) or None."""

    def __init__(
        self,
        images: torch.Tensor,
        seg: torch.Tensor,
        targets: torch.Tensor,
        use_mask: torch.Tensor,
        classes: list[str],
        multi_label: bool,
        mean: Sequence[float],
        std: Sequence[float],
        spurious: torch.Tensor | None = None,
        augment: bool = False,
        groups: torch.Tensor | None = None,
    ) -> None:
        self.images, self.seg, self.targets, self.use_mask = images, seg, targets, use_mask
        self.spurious, self.groups = spurious, groups
        self.classes, self.multi_label, self.augment = classes, multi_label, augment
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Sample:
        image = self.images[index].float().div_(255.0)
        seg = self.seg[index].long()
        spurious = seg == 0 if self.spurious is None else self.spurious[index].clone()
        if self.augment and torch.rand(()) < 0.5:
            image, seg, spurious = image.flip(-1), seg.flip(-1), spurious.flip(-1)
        sample = Sample(
            image=(image - self._mean) / self._std,
            target=self.targets[index].clone(),
            seg=seg,
            has_mask=torch.tensor(True),
            use_mask=self.use_mask[index].clone(),
            index=index,
            spurious=spurious,
        )
        if self.groups is not None:
            sample["group"] = self.groups[index].clone()
        return sample


def cue_group_names(classes: Sequence[str], cues: Sequence[str]) -> list[str]:
    """Groups of single-label data with a known spurious cue: one per (class, cue value), ``<class>_<cue>``, in
    class-major order; a sample's group id is ``cue_group_ids``."""
    return [f"{c}_{q}" for c in classes for q in cues]


def cue_group_ids(labels: torch.Tensor, cue: torch.Tensor, num_cues: int) -> torch.Tensor:
    """N long group ids ``label * num_cues + cue`` (the index of ``cue_group_names``) from N long labels and cues."""
    return labels.long() * num_cues + cue.long()


RUNTIME_ARGS = ("mean", "std", "seed", "batch_size")  # what the app passes to every builder besides the YAML keys


class DatasetBuilder(Protocol):
    """``build(**yaml_keys, *, mean, std, seed, batch_size) -> DataSplits``: every dataset module's entry point."""

    def __call__(
        self, *, mean: Sequence[float], std: Sequence[float], seed: int, batch_size: int, **config: Any
    ) -> DataSplits:
        """mean/std: the backbone's input normalisation; seed: the run's seed; batch_size: trainer.batch_size."""
        ...


def derive_seed(seed: int, purpose: str) -> int:
    """A stable 63-bit seed for one purpose, so purposes (splits, mask budgets) never share a random stream."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def choose_masks(has_mask: torch.Tensor, masks_to_use: int | float, seed: int, dataset: str) -> torch.Tensor:
    """N bool: the training samples whose masks feed L_e, drawn by seed (a smaller budget is a subset of a larger)."""
    available = torch.nonzero(has_mask).flatten()
    n = mask_count(masks_to_use, len(available), dataset)
    gen = torch.Generator().manual_seed(derive_seed(seed, "masks"))
    chosen = torch.zeros(len(has_mask), dtype=torch.bool)
    chosen[available[torch.randperm(len(available), generator=gen)[:n]]] = True
    return chosen


def mask_count(masks_to_use: int | float, available: int, dataset: str) -> int:
    """Number of masks in the L_e budget: an int is a count, a float a fraction of the available masks."""
    if isinstance(masks_to_use, bool) or not isinstance(masks_to_use, (int, float)) or masks_to_use < 0:
        raise ValueError(
            f"{dataset}: masks_to_use={masks_to_use!r} is not valid; give a count (int >= 0) or a fraction in [0, 1]."
        )
    if isinstance(masks_to_use, int):
        if masks_to_use > available:
            raise ValueError(
                f"{dataset}: masks_to_use={masks_to_use} exceeds the {available} training images that have masks;"
                " lower it or give a fraction such as 1.0."
            )
        return masks_to_use
    if masks_to_use > 1.0:
        raise ValueError(
            f"{dataset}: masks_to_use={masks_to_use} is a fraction above 1; give a fraction in [0, 1] or an int count."
        )
    return int(round(masks_to_use * available))


def classes_without_images(
    classes: Sequence[str], train_targets: torch.Tensor, others: dict[str, torch.Tensor]
) -> dict[str, list[str]]:
    """{split: names} of the classes train has an image of but that split has none of (from N x K targets)."""
    in_train = train_targets.sum(0) > 0
    found = {}
    for split, targets in others.items():
        names = [classes[c] for c in range(len(classes)) if in_train[c] and not targets[:, c].sum() > 0]
        if names:
            found[split] = names
    return found


def describe_classes_without_images(found: dict[str, list[str]]) -> str:
    """'val: cat, dog; test: cat': the splits and classes of classes_without_images, for a warning."""
    return "; ".join(f"{split}: {', '.join(names)}" for split, names in found.items())
