"""The contract every dataset follows: how it is built, what one sample holds and what a built dataset exposes.

A dataset is one module with a ``build`` function, named by ``_target_`` in its conf/dataset/<name>.yaml (typed by
its schema in gain_exp/config/schema.py). ``build`` takes that YAML's keys as keyword arguments plus the runtime arguments
the app passes to every builder (RUNTIME_ARGS, keyword-only; a builder that does not use one still accepts it) and
returns a DataSplits. run.py calls ``instantiate(cfg.dataset, **runtime)`` with exactly these, no signature inspection.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NotRequired, Protocol, Sequence, TypedDict

import torch
from torch.utils.data import Dataset

from gain_exp.output.files import CannotWrite, CorruptFile, atomic_write, load_state

log = logging.getLogger(__name__)

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
    # cue value); None: the data has no groups. Metrics: worst_group_acc, mean_group_acc, group_acc/<name>, cue_follow.
    groups: list[str] | None = None
    # per group: (its class, the class its cue value stands for, -1: none) (``cue_group_classes``); gives cue_follow
    group_classes: list[tuple[int, int]] | None = None
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


def resolve_val_bias(val_bias: float | str | None, bias: float, num_classes: int, dataset: str) -> float:
    """The val split's cue agreement probability: ``bias`` for None, ``1 / num_classes`` for ``balanced`` (every class x
    cue group equally likely), else the probability given (one sentence when it is none of these)."""
    if val_bias is None:
        return float(bias)
    if val_bias == "balanced":
        return 1.0 / num_classes
    if isinstance(val_bias, bool) or not isinstance(val_bias, (int, float)) or not 0.0 <= val_bias <= 1.0:
        raise ValueError(
            f"{dataset}: val_bias={val_bias} is not a probability; set it in [0, 1], balanced (1/{num_classes}: every"
            " class x cue group equally likely) or null (= bias)."
        )
    return float(val_bias)


def cue_group_names(classes: Sequence[str], cues: Sequence[str]) -> list[str]:
    """Groups of single-label data with a known spurious cue: one per (class, cue value), ``<class>_<cue>``, in
    class-major order; a sample's group id is ``cue_group_ids``."""
    return [f"{c}_{q}" for c in classes for q in cues]


def cue_group_classes(num_classes: int, cue_classes: Sequence[int]) -> list[tuple[int, int]]:
    """Per group of ``cue_group_names`` (class-major): its class and the class its cue value stands for
    (``cue_classes[q]``, -1: a cue value that stands for no class); the built-in benchmarks' cue value q is class q's."""
    return [(c, int(q)) for c in range(num_classes) for q in cue_classes]


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


# ------------------------------------------------------------------------------------------ box annotations

ANNOTATIONS = ("mask", "box")  # dataset.annotation: what the training split's L_e label maps are made of


def check_annotation(annotation: str, box_enlarge: float, dataset: str, boxes: str | None) -> None:
    """ValueError (one sentence) unless ``annotation`` is mask or box and ``box_enlarge`` >= 0; ``boxes`` says where
    the dataset's boxes come from, None: it has none, so annotation=box is refused."""
    if annotation not in ANNOTATIONS:
        raise ValueError(f"{dataset}: annotation={annotation!r} is unknown; use mask (pixel masks) or box (boxes).")
    if isinstance(box_enlarge, bool) or not isinstance(box_enlarge, (int, float)) or box_enlarge < 0:
        raise ValueError(
            f"{dataset}: box_enlarge={box_enlarge!r} must be a fraction >= 0 (0.1 makes each box side 10% longer)."
        )
    if annotation == "box" and boxes is None:
        raise ValueError(
            f"{dataset}: annotation=box needs bounding boxes, which this dataset does not have; use annotation=mask"
            " (the other option), or a dataset with boxes (voc2012, waterbirds, or the generated shapes and"
            " decoy_digits)."
        )


def annotation_extras(annotation: str) -> dict[str, str]:
    """``DataSplits.extras["annotation"]``: what L_e trains on and what val/test's localisation metrics score
    against (always the best annotation the split has: its pixel masks)."""
    return {"train": annotation, "scored_against": "mask"}


def box_masks(
    boxes: torch.Tensor | Sequence[Sequence[float]],
    classes: torch.Tensor | Sequence[int],
    size: tuple[int, int],
    enlarge: float = 0.0,
    ignore: torch.Tensor | Sequence[bool] | None = None,
) -> torch.Tensor:
    """H x W uint8 label map of filled boxes: label c + 1 inside each box of class c, 0 elsewhere.

    ``boxes`` M x 4 (x0, y0, x1, y1) in pixel-edge coordinates of an image of ``size`` (width, height): pixel (i, j)
    spans [j, j + 1) x [i, i + 1), so integer boxes cover columns x0 .. x1 - 1 (exclusive ends) and a pixel is inside
    when its centre is. ``enlarge`` grows each side by that fraction about the box's centre (0.1: 10% longer sides),
    then the box is clipped to the image. ``ignore`` (M bool) paints those boxes with IGNORE_INDEX instead of their
    class (e.g. VOC's difficult objects, which its masks mark void).

    Overlaps: boxes are painted from the largest area to the smallest, so where boxes of different classes overlap the
    smaller box's label wins (the smaller object is taken to be in front, the rule of Khoreva et al., "Simple Does It",
    CVPR 2017, for box-supervised segmentation); boxes of one class simply merge.
    """
    width, height = int(size[0]), int(size[1])
    seg = torch.zeros(height, width, dtype=torch.uint8)
    b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    if len(b) == 0:
        return seg
    labels = torch.as_tensor(classes, dtype=torch.long).reshape(-1) + 1
    if len(labels) != len(b) or bool(((labels < 1) | (labels >= IGNORE_INDEX)).any()):
        raise ValueError(f"box_masks needs one class in 0..253 per box; got {len(labels)} classes for {len(b)} boxes.")
    if ignore is not None:
        labels = torch.where(torch.as_tensor(ignore, dtype=torch.bool).reshape(-1), IGNORE_INDEX, labels)
    centre_x, centre_y = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    half_w = (b[:, 2] - b[:, 0]).clamp(min=0) * (1 + enlarge) / 2
    half_h = (b[:, 3] - b[:, 1]).clamp(min=0) * (1 + enlarge) / 2
    x0, x1 = (centre_x - half_w).clamp(0, width), (centre_x + half_w).clamp(0, width)
    y0, y1 = (centre_y - half_h).clamp(0, height), (centre_y + half_h).clamp(0, height)
    cols = torch.arange(width, dtype=torch.float64) + 0.5  # pixel centres
    rows = torch.arange(height, dtype=torch.float64) + 0.5
    for m in sorted(range(len(b)), key=lambda k: -float((x1[k] - x0[k]) * (y1[k] - y0[k]))):  # stable: ties keep order
        inside = ((rows >= y0[m]) & (rows <= y1[m])).unsqueeze(1) & ((cols >= x0[m]) & (cols <= x1[m])).unsqueeze(0)
        seg[inside] = int(labels[m])
    return seg


def boxes_from_seg(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M x 4 float boxes (x0, y0, x1, y1), exclusive ends, M long classes): the tight box of each class present in
    an H x W label map (values c + 1; 0 background and IGNORE_INDEX left out), in increasing class order. On data with
    one object per class (shapes, decoy_digits) that is one box per object: the tight box of its exact pixel mask, a
    valid box annotation of a synthetic dataset."""
    boxes, classes = [], []
    for value in torch.unique(seg).tolist():
        if value == 0 or value == IGNORE_INDEX:
            continue
        ys, xs = torch.nonzero(seg == value, as_tuple=True)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
        classes.append(value - 1)
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(classes, dtype=torch.long)


def box_label_maps(seg: torch.Tensor, enlarge: float = 0.0) -> torch.Tensor:
    """N x H x W uint8: each label map of ``seg`` (N x H x W) replaced by the filled boxes of its classes
    (``boxes_from_seg`` then ``box_masks``), for the generated datasets' training splits under annotation=box."""
    out = torch.zeros(seg.shape, dtype=torch.uint8)
    size = (seg.shape[-1], seg.shape[-2])
    for n in range(seg.shape[0]):
        boxes, classes = boxes_from_seg(seg[n])
        out[n] = box_masks(boxes, classes, size, enlarge)
    return out


@dataclass(frozen=True)
class ImageBoxes:
    """One image's box annotation: M x 4 boxes in pixel-edge coordinates of the image, M classes, M ignore flags and
    the image's (width, height)."""

    boxes: torch.Tensor
    classes: torch.Tensor
    size: tuple[int, int]
    ignore: torch.Tensor | None = None


class BoxReader:
    """A mask reader (``(key, target) -> H x W uint8 label map``) for file-backed datasets under annotation=box: the key
    (the image's path, standing in for a mask file) names a precomputed ImageBoxes, rendered by ``box_masks``."""

    def __init__(self, table: dict[Any, ImageBoxes], enlarge: float) -> None:
        self.table, self.enlarge = table, float(enlarge)

    def __call__(self, key: Any, target: torch.Tensor, max_pixels: int | None = None) -> torch.Tensor:
        entry = self.table[key]
        return box_masks(entry.boxes, entry.classes, entry.size, self.enlarge, entry.ignore)


def no_folder(path: Path) -> str:
    """Why ``path`` is not a usable folder, for a one-sentence error: "does not exist" or "is a file, not a folder"."""
    return "is a file, not a folder" if path.exists() else "does not exist"


def cached_splits(
    root: str | Path, params: dict, generate: Callable[[], dict[str, dict[str, torch.Tensor]]], dataset: str
) -> dict[str, dict[str, torch.Tensor]]:
    """A generated dataset's splits from ``root``/<hash of params>.pt, or ``generate()`` them and write that file.

    The cache is only a cache: an unreadable file is generated again, and a cache folder that cannot be written
    (read-only, disk full) leaves the splits in memory with a warning. A ``root`` that is a file is one sentence.
    """
    root = Path(root).expanduser()
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == root else f"is inside a file ({blocker})"
        raise ValueError(
            f"{dataset}: dataset.root={root} {where}, not a folder; point dataset.root at a folder for the generated "
            f"splits' cache (it is created if missing)."
        )
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    path = root / f"{key}.pt"
    if path.exists():
        try:
            return load_state(path)["splits"]
        except (CorruptFile, KeyError) as err:
            log.warning("%s: %s; generating the splits again", dataset, str(err).rstrip("."))
    data = generate()
    try:
        with atomic_write(path) as f:  # readers see either no file or a complete one
            torch.save({"params": params, "splits": data}, f)
    except CannotWrite as err:
        log.warning(
            "%s: cannot cache the generated splits in %s (%s); they stay in memory for this run and are generated "
            "again next time; set dataset.root to a writable folder to keep them",
            dataset,
            err.path,
            err.reason,
        )
    return data
