"""Built-in "decoy digits": real handwritten digit scans with a corner patch whose colour is a spurious label cue.

The Decoy MNIST protocol of Ross et al. (IJCAI 2017, "Right for the Right Reasons"; docs/methods.md, "Protocols") on the
1,797 8 x 8 scans that ship inside scikit-learn (``sklearn.datasets.load_digits``, UCI optical digits; no download).
Each scan (ink 0..16) is upsampled bilinearly into the centre of a black image of side ``image_size``, leaving a
border as wide as the decoy patch, as MNIST's 20 px digit box sits inside its 28 px image. The patch is a square of
side round(image_size * patch_fraction) in a random corner of that border, so it never touches the digit. Its colour
names the digit c, where c is the label y with probability ``bias`` (1.0: always, as in Ross et al.) in train, val and
test_biased, and a uniformly random digit, independent of y, in test_unbiased (Ross et al.'s test: the shade of a
random digit). ``decoy=grey`` paints Ross et al.'s grey level 255 - 25 c; ``decoy=colour`` the hue c / 10 at full
saturation and value, a cue a global-average-pooled CNN picks up where the grey levels are not (docs/results/methods-table.md).
``patch_fraction=0.142857`` (4/28) and ``decoy=grey`` is Ross et al.'s 4 x 4 swatch on 28 px MNIST.

Images are RGB with the scan's grey level replicated, so ImageNet-normalised backbones apply. Pixel masks (for L_e and
the localisation metrics) are the strokes: seg = y + 1 where the upsampled scan is brighter than ``mask_threshold`` of
full ink, 0 elsewhere (never inside the patch); with ``annotation=box`` the training split's L_e label maps are the
tight box of those strokes (a valid box annotation of a synthetic dataset; val and tests keep the strokes), and with
``annotation=decoy`` every pixel but the patch (Ross et al.'s annotation: only the swatch is marked irrelevant). Every
sample also carries ``spurious``, an H x W bool map of the patch, so an evaluator can measure attention on the decoy,
and its group (digit x patch digit, e.g. ``3_patch_7``);
``val_bias`` gives the val split its own agreement probability (0.1: every group equally likely, a group-balanced
validation set for selection by worst-group accuracy).

The 1,797 scans are split by the seed into disjoint train / val / test pools; test_biased and test_unbiased show the
same test scans with their own decoys.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from gain_exp.data.base import (
    DataSplits,
    TensorSplit,
    annotation_extras,
    box_label_maps,
    cached_splits,
    check_annotation,
    choose_masks,
    cue_group_classes,
    cue_group_ids,
    cue_group_names,
    derive_seed,
    mask_count,
    resolve_val_bias,
)

log = logging.getLogger(__name__)

NAME = "decoy_digits dataset"  # how errors name this dataset
# Bump when the generator's code changes its output, so stale cache files are never read back (the constants below
# are hashed into the cache key already).
GENERATOR_VERSION = 1

NUM_SCANS = 1797  # sklearn.datasets.load_digits
SCAN_SIZE = 8
INK_MAX = 16.0  # the scans' full-ink value
CLASSES = [str(d) for d in range(10)]
SHADE_TOP, SHADE_STEP = 255, 25  # decoy=grey: patch grey level 255 - 25 c for digit c (Ross et al.)
DECOYS = ("colour", "grey")
UPSAMPLE = "bilinear"
MAX_PATCH_FRACTION = 0.3  # the digit box, 1 - 2 * patch_fraction of the side, keeps at least 0.4 of it
SPLITS = ("train", "val", "test_biased", "test_unbiased")
# annotation=decoy: the training split's L_e label maps mark every pixel but the decoy patch as relevant, Ross et al.'s
# annotation A of Decoy MNIST (dtak/rrr rrr/decoy_mnist.py: the swatch's pixels are the irrelevant ones).
DECOY_ANNOTATION = "decoy"
# Corners as (row, column) of the patch's top-left pixel in units of (image_size - patch): TL, TR, BL, BR.
CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def patch_size(image_size: int, patch_fraction: float) -> int:
    """Side of the decoy patch: round(image_size * patch_fraction), at least 1 (Ross et al.: 4 px of 28)."""
    return max(1, round(image_size * patch_fraction))


def decoy_colours(cue: torch.Tensor, decoy: str) -> torch.Tensor:
    """N x 3 uint8 patch colour for cue digits c: grey 255 - 25 c (Ross et al.: 255 for 0 down to 30 for 9), or colour,
    the hue h = c / 10 at full saturation and value: channel = 255 (1 - clamp(min(k, 4 - k), 0, 1)) with
    k = (m + 6 h) mod 6, m = 5, 3, 1 for R, G, B (the standard HSV-to-RGB formula)."""
    if decoy == "grey":
        return (SHADE_TOP - SHADE_STEP * cue).to(torch.uint8).view(-1, 1).expand(-1, 3)
    h = cue.float().view(-1, 1) / len(CLASSES)
    k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6) % 6
    return ((1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)) * 255).round().to(torch.uint8)


def patch_masks(corner: torch.Tensor, image_size: int, p: int) -> torch.Tensor:
    """N x H x W bool: each image's p x p decoy patch, from its corner index (0 TL, 1 TR, 2 BL, 3 BR)."""
    offsets = torch.tensor(CORNERS, dtype=torch.long)[corner.long()] * (image_size - p)  # N x 2 (row, col)
    coords = torch.arange(image_size)
    rows = (coords >= offsets[:, :1]) & (coords < offsets[:, :1] + p)  # N x H
    cols = (coords >= offsets[:, 1:]) & (coords < offsets[:, 1:] + p)  # N x W
    return rows.unsqueeze(2) & cols.unsqueeze(1)


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too, so the app prints it as one sentence)."""


@functools.lru_cache(maxsize=1)  # importing scikit-learn takes seconds; read the scans once per process
def load_scans() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digit scans (N x 8 x 8 float, ink 0..16) and labels (N long) of sklearn.datasets.load_digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingExtra(
            f"{NAME}: scikit-learn is not installed and holds the digit scans; install it with"
            " pip install 'gain-exp[digits]' (or pip install 'scikit-learn>=1.3')."
        ) from err
    digits = load_digits()
    return torch.as_tensor(digits.images, dtype=torch.float32), torch.as_tensor(digits.target, dtype=torch.long)


class DecoyDigitsDataset(TensorSplit):
    """One split: uint8 RGB images with their decoy, labels and masks; the spurious cue is the decoy patch."""

    def __init__(
        self,
        images: torch.Tensor,
        patch: int,
        labels: torch.Tensor,
        cue: torch.Tensor,
        corner: torch.Tensor,
        source: torch.Tensor,
        use_mask: torch.Tensor,
        mask_threshold: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        # images: N x 3 x H x W uint8, the grey scan replicated plus the decoy patch
        spurious = patch_masks(corner, images.shape[-1], patch)  # N x H x W bool
        strokes = (images[:, 0].float() > mask_threshold * 255) & ~spurious  # the scan is grey: any channel
        seg = torch.where(strokes, (labels + 1).view(-1, 1, 1), 0).to(torch.uint8)  # N x H x W
        super().__init__(
            images,
            seg,
            F.one_hot(labels, len(CLASSES)).float(),
            use_mask,
            CLASSES,
            False,
            mean,
            std,
            spurious=spurious,
            groups=cue_group_ids(labels, cue, len(CLASSES)),
        )
        self.labels = labels  # N long: the digit
        self.cue = cue  # N long: the digit whose colour the patch carries
        self.corner = corner  # N long: 0 TL, 1 TR, 2 BL, 3 BR
        self.source = source  # N long: index of the scan in load_digits


def build(
    root: str = "data_cache/decoy_digits",
    image_size: int = 64,
    n_train: int = 1000,
    n_val: int = 297,
    n_test: int = 500,
    bias: float = 1.0,
    decoy: str = "colour",
    patch_fraction: float = 0.25,
    mask_threshold: float = 0.25,
    masks_to_use: float | int = 0.1,
    val_bias: float | str | None = None,
    annotation: str = "mask",
    box_enlarge: float = 0.0,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    seed: int = 0,
    batch_size: int = 1,  # part of the builder contract (data/base.py); unused here
) -> DataSplits:
    """Build (or load from the disk cache) the decoy-digits splits (a DatasetBuilder, see data/base.py)."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)  # Hydra passes ListConfig
    _validate(image_size, n_train, n_val, n_test, bias, decoy, patch_fraction, mask_threshold, mean, std)
    if annotation != DECOY_ANNOTATION:  # decoy: this dataset's own annotation, Ross et al.'s (see the module doc)
        check_annotation(annotation, box_enlarge, NAME, boxes="the tight box of each digit's strokes")
    val_bias = resolve_val_bias(val_bias, bias, len(CLASSES), NAME)
    n_masked = mask_count(masks_to_use, n_train, NAME)
    params = dict(
        version=GENERATOR_VERSION,
        constants=_generator_constants(),
        image_size=int(image_size),
        n_train=int(n_train),
        n_val=int(n_val),
        n_test=int(n_test),
        bias=float(bias),
        decoy=str(decoy),
        patch=patch_size(int(image_size), float(patch_fraction)),
        seed=int(seed),
    )
    if val_bias != float(bias):  # absent otherwise: earlier caches stay valid
        params["val_bias"] = val_bias
    data = cached_splits(
        root, params, lambda: generate(**{k: v for k, v in params.items() if k not in ("version", "constants")}), NAME
    )
    # Which training images carry masks is fixed by the seed alone; a smaller budget is a subset of a larger one.
    train_use = choose_masks(torch.ones(n_train, dtype=torch.bool), n_masked, seed, NAME)

    def make(split: str, use_mask: torch.Tensor | None) -> DecoyDigitsDataset:
        d = data[split]
        n = d["images"].shape[0]
        return DecoyDigitsDataset(
            d["images"],
            params["patch"],
            d["labels"],
            d["cue"],
            d["corner"],
            d["source"],
            use_mask if use_mask is not None else torch.zeros(n, dtype=torch.bool),
            float(mask_threshold),
            mean,
            std,
        )

    train = make("train", train_use)
    if annotation == "box":  # L_e on the tight box of the strokes (a synthetic box annotation); spurious: the patch
        train.seg = box_label_maps(train.seg, box_enlarge)
    elif (
        annotation == DECOY_ANNOTATION
    ):  # Ross et al.'s A: only the decoy patch is irrelevant, every other pixel is not
        train.seg = torch.where(train.spurious, 0, (train.labels + 1).view(-1, 1, 1)).to(torch.uint8)
    return DataSplits(
        train=train,
        val=make("val", None),
        tests={"test_biased": make("test_biased", None), "test_unbiased": make("test_unbiased", None)},
        classes=list(CLASSES),
        multi_label=False,
        groups=cue_group_names(CLASSES, [f"patch_{c}" for c in CLASSES]),  # digit x patch colour: 3_patch_7, ...
        group_classes=cue_group_classes(len(CLASSES), range(len(CLASSES))),  # patch_7 stands for digit 7
        extras={
            "bias": float(bias),
            "val_bias": val_bias,
            "num_masked_train": n_masked,
            "patch_size": params["patch"],
            "annotation": annotation_extras(annotation),
        },
    )


def _validate(
    image_size: int,
    n_train: int,
    n_val: int,
    n_test: int,
    bias: float,
    decoy: str,
    patch_fraction: float,
    mask_threshold: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> None:
    """Raise ValueError with one sentence for the first bad argument."""
    if decoy not in DECOYS:
        raise ValueError(f"{NAME}: decoy={decoy!r} is not a decoy kind; set it to colour or grey.")
    if not 0.0 < patch_fraction <= MAX_PATCH_FRACTION:
        raise ValueError(
            f"{NAME}: patch_fraction={patch_fraction} is out of range; set it in (0, {MAX_PATCH_FRACTION}] so the"
            " digit box between the patches keeps 0.4 of the side or more (Ross et al.: 4/28 = 0.143)."
        )
    box = image_size - 2 * patch_size(image_size, patch_fraction)
    if box < SCAN_SIZE:
        raise ValueError(
            f"{NAME}: image_size={image_size} leaves a {box} px digit box inside the decoy border, smaller than the"
            f" {SCAN_SIZE} px scans; set image_size to 32 or more."
        )
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 1:
            raise ValueError(f"{NAME}: {name}={n} must be a positive number of scans; set it to 1 or more.")
    if n_train + n_val + n_test > NUM_SCANS:
        raise ValueError(
            f"{NAME}: n_train + n_val + n_test = {n_train + n_val + n_test} exceeds the {NUM_SCANS} scans of"
            " load_digits (the splits are disjoint); lower them."
        )
    if not 0.0 <= bias <= 1.0:
        raise ValueError(f"{NAME}: bias={bias} is not a probability; set it in [0, 1] (0.1 means no cue).")
    if not 0.0 < mask_threshold < 1.0:
        raise ValueError(
            f"{NAME}: mask_threshold={mask_threshold} is not a share of full ink; set it strictly between 0 and 1."
        )
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(
            f"{NAME}: mean={tuple(mean)} and std={tuple(std)} must each have 3 values with std > 0; fix them."
        )


def _generator_constants() -> dict:
    """The module-level constants that shape the generated pixels (part of the cache key)."""
    return dict(shade=[SHADE_TOP, SHADE_STEP], upsample=UPSAMPLE, corners=CORNERS)


def generate(
    image_size: int,
    n_train: int,
    n_val: int,
    n_test: int,
    bias: float,
    decoy: str,
    patch: int,
    seed: int,
    val_bias: float | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """All four splits: disjoint scan pools drawn by the seed, each split's decoys from its own random stream (val's
    agreement probability is ``val_bias``, None: ``bias``)."""
    scans, labels = load_scans()
    order = torch.randperm(len(scans), generator=torch.Generator().manual_seed(derive_seed(seed, "pools")))
    pools = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val : n_train + n_val + n_test],
    }
    out = {}
    for split in SPLITS:
        source = pools["test" if split.startswith("test") else split]
        gen = torch.Generator().manual_seed(derive_seed(seed, split))
        y = labels[source]
        agree = val_bias if split == "val" and val_bias is not None else bias
        cue = draw_cue(y, agree, split == "test_unbiased", gen)
        corner = torch.randint(0, len(CORNERS), (len(source),), generator=gen)
        images = render(scans[source], cue, corner, image_size, patch, decoy)
        out[split] = {"images": images, "labels": y, "cue": cue, "corner": corner, "source": source}
    return out


def draw_cue(labels: torch.Tensor, bias: float, unbiased: bool, gen: torch.Generator) -> torch.Tensor:
    """The digit each patch's shade encodes: the label with probability bias, else another digit (uniform);
    a uniform digit independent of the label when unbiased."""
    k = len(CLASSES)
    if unbiased:
        return torch.randint(0, k, labels.shape, generator=gen)
    agree = torch.rand(labels.shape, generator=gen) < bias
    other = (labels + torch.randint(1, k, labels.shape, generator=gen)) % k  # uniform over the other 9 digits
    return torch.where(agree, labels, other)


def render(
    scans: torch.Tensor, cue: torch.Tensor, corner: torch.Tensor, image_size: int, patch: int, decoy: str
) -> torch.Tensor:
    """N x 3 x H x W uint8: each scan upsampled bilinearly into the centre box (grey in all three channels), the
    patch x patch decoy painted in its corner."""
    box = image_size - 2 * patch
    ink = F.interpolate((scans / INK_MAX).unsqueeze(1), size=(box, box), mode=UPSAMPLE, align_corners=False)
    images = torch.zeros(len(scans), 1, image_size, image_size, dtype=torch.uint8)
    images[:, :, patch : patch + box, patch : patch + box] = (ink.clamp(0, 1) * 255).round().to(torch.uint8)
    images = images.expand(-1, 3, -1, -1)
    colours = decoy_colours(cue, decoy).view(-1, 3, 1, 1).expand_as(images)
    return torch.where(patch_masks(corner, image_size, patch).unsqueeze(1), colours, images).contiguous()
