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


def class_masks(seg: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x H x W label maps -> B x K x H x W float masks (ignore pixels count as 0)."""
    one_hot = torch.nn.functional.one_hot(seg.clamp(max=num_classes).long(), num_classes + 1)
    return one_hot[..., 1:].permute(0, 3, 1, 2).float() * (seg != IGNORE_INDEX).unsqueeze(1)


def derive_seed(seed: int, purpose: str) -> int:
    """A stable 63-bit seed for one purpose, so purposes (splits, mask budgets) never share a random stream."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
