"""The contract every dataset follows: what one sample holds and what a built dataset exposes."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TypedDict

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
    extras: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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
