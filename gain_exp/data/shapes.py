"""Built-in "biased shapes" dataset: shape classes on a background whose tint is a spurious class cue.

It mirrors the paper's biased boat/water test at a size that trains in minutes on a CPU. Each image
shows one (or, multi-label, several) shape objects with exact pixel masks on a textured background.
The background tint is the spurious cue: it names the image's class with probability `bias` in
train, val and test_biased, and is uniformly random (independent of the label) in test_unbiased.
Object colour, size, position and a small rotation are random and independent of the class.

Multi-label (`max_objects > 1`): each image holds 1..max_objects objects of distinct classes. With
probability `bias` the tint is that of one present class chosen uniformly, otherwise that of an
absent class chosen uniformly (any class when all are present); in test_unbiased it is uniform over
all classes. "Cue agrees" therefore means "the tint's class is present in the image".

Groups (single-label): one per (shape, tint), e.g. ``circle_on_square_tint``; ``val_bias`` draws the val split's tints
with its own agreement probability (1/K: every group equally likely), a group-balanced validation set for model
selection by worst-group accuracy. It uses group labels the training split never shows the model.

Texture background (``background="texture"``): the cue is a natural texture instead of a flat tint. Class c owns one
grey texture photograph from scikit-image's bundled data (TEXTURE_SOURCES, no download); each image's background is a
patch of its cue class's texture cropped at a random position, rotated by a random angle and zoomed by a random factor
(TEXTURE_SCALE_RANGE), at a random, class-independent brightness and contrast. Every texture is high-passed and
histogram-equalised to the same flat grey-level distribution, so a single pixel's colour, and the mean colour, say
next to nothing about the cue: only the spatial pattern does. Groups are shape x texture, e.g. ``circle_on_grass``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from typing import Callable, Sequence

import torch
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
    resolve_val_bias,
)
from gain_exp.data.decoy_digits import MissingExtra

log = logging.getLogger(__name__)

# Bump when the generator's code changes its output, so stale cache files are never read back (the
# tuning constants below are hashed into the cache key already).
GENERATOR_VERSION = 2

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "star", "ring", "diamond", "crescent")
MAX_CLASSES = len(SHAPE_NAMES)

# Object diameter as a fraction of the image side; smaller when several objects must fit side by side.
SIZE_RANGE_SINGLE = (0.25, 0.50)
SIZE_RANGE_MULTI = (0.22, 0.38)
MAX_ROTATION_DEG = 10.0  # small, so square (0 deg) and diamond (45 deg) stay distinct classes
TINT_STRENGTH = 0.75  # share of the background colour that is the class tint (rest: grey texture)
TINT_VALUE = 0.60  # HSV value of the tints: mid-bright, so dark and bright objects both stand out
TEXTURE_STRENGTH = 0.20  # amplitude of the low-frequency brightness texture on the background
PIXEL_NOISE = 0.05  # std of per-pixel Gaussian noise over the whole image
PLACEMENT_TRIES = 50  # candidate positions per extra object in multi-label mode
SPLITS = ("train", "val", "test_biased", "test_unbiased")
CHUNK = 256  # images rendered at once; bounds the float scratch memory

BACKGROUNDS = ("tint", "texture")  # dataset.background: what carries the cue
# background=texture. Class c's texture: (name, skimage.data function, crop rows/cols of the photograph or None).
# The first three are texture photographs (CC0); the rest are texture-like crops of other bundled photographs. All
# ship inside the scikit-image wheel (skimage/data/*.png|jpg), so none is downloaded.
TEXTURE_SOURCES: tuple[tuple[str, str, tuple[int, int, int, int] | None], ...] = (
    ("grass", "grass", None),  # CC0 (DeviantArt linolafett)
    ("gravel", "gravel", None),  # CC0 (CC0Textures Gravel04)
    ("brick", "brick", None),  # CC0 (CC0Textures Bricks25)
    ("tissue", "immunohistochemistry", None),  # stained colon tissue; no known copyright restrictions
    ("stars", "hubble_deep_field", (0, 768, 0, 768)),  # Hubble eXtreme Deep Field; NASA, public domain
    ("lawn", "camera", (250, 512, 410, 512)),  # the lawn right of the tripod; CC0 (Lav Varshney)
    ("vessels", "retina", (300, 1100, 450, 1250)),  # fundus blood vessels; CC0 (Mikael Haggstrom)
    ("fringes", "cell", (60, 340, 0, 280)),  # the hologram's background speckle, away from the cell; CC0
)
TEXTURE_SIZE = 256  # side (px) every texture crop is resampled to before patches are cut from it
TEXTURE_HIGHPASS_SIGMA = 16.0  # Gaussian sigma (px at TEXTURE_SIZE) of the illumination removed from each texture
TEXTURE_SCALE_RANGE = (0.25, 0.40)  # image side / texture side, uniform per image: the random zoom of the crop
TEXTURE_BRIGHTNESS = (0.42, 0.58)  # mean grey level of an image's background, uniform and independent of the class
TEXTURE_CONTRAST = (0.09, 0.15)  # std of the background's grey levels around that mean, uniform per image, any class


# Shape membership tests in object-local coordinates (u right, v down, unit radius). Every shape
# fits in the unit disc, so a centre at least one radius from the border keeps it inside the image.
def _circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u * u + v * v <= 1.0


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.70


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Equilateral, inscribed in the unit circle, apex up: vertices (0, -1) and (+-0.866, 0.5).
    return (v <= 0.5) & (u.abs() <= (v + 1.0) * (0.866 / 1.5))


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    au, av = u.abs(), v.abs()
    return ((au <= 0.30) & (av <= 0.95)) | ((av <= 0.30) & (au <= 0.95))


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r = torch.sqrt(u * u + v * v)
    sector = 2 * math.pi / 5
    theta = torch.atan2(u, -v)  # 0 points up, so one tip is at the top
    offset = (torch.remainder(theta + sector / 2, sector) - sector / 2).abs() / (sector / 2)
    return r <= 1.0 - 0.58 * offset  # tip radius 1, inner radius 0.42


def _ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _diamond(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u.abs() + v.abs() <= 1.0


def _crescent(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)


SHAPE_FNS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    _circle,
    _square,
    _triangle,
    _cross,
    _star,
    _ring,
    _diamond,
    _crescent,
)


class ShapesDataset(TensorSplit):
    """One split of the biased-shapes data; the spurious cue is the tinted or textured background (seg == 0)."""

    def __init__(
        self,
        images: torch.Tensor,
        seg: torch.Tensor,
        targets: torch.Tensor,
        cue: torch.Tensor,
        use_mask: torch.Tensor,
        classes: list[str],
        multi_label: bool,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        groups: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            images, seg, targets, use_mask, classes, multi_label, mean, std, augment=augment, groups=groups
        )
        self.cue = cue  # N long: the class whose tint (or texture) the background carries


def build(
    root: str = "data_cache/shapes",
    num_classes: int = 4,
    image_size: int = 64,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 1000,
    bias: float = 0.98,
    masks_to_use: float | int = 0.1,
    max_objects: int = 1,
    augment: bool = False,
    val_bias: float | str | None = None,
    background: str = "tint",
    annotation: str = "mask",
    box_enlarge: float = 0.0,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    seed: int = 0,
    batch_size: int = 1,  # part of the builder contract (data/base.py); shapes batches with the default sampler
) -> DataSplits:
    """Build (or load from the disk cache) the biased-shapes splits (a DatasetBuilder, see data/base.py)."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)  # Hydra passes ListConfig
    _validate(num_classes, image_size, n_train, n_val, n_test, bias, max_objects, mean, std)
    check_annotation(annotation, box_enlarge, "shapes dataset", boxes="the tight box of each exact mask")
    val_bias = resolve_val_bias(val_bias, bias, num_classes, "shapes dataset")
    n_masked = _mask_count(masks_to_use, n_train)
    params = dict(
        version=GENERATOR_VERSION,
        constants=_generator_constants(),
        num_classes=int(num_classes),
        image_size=int(image_size),
        n_train=int(n_train),
        n_val=int(n_val),
        n_test=int(n_test),
        bias=float(bias),
        max_objects=int(max_objects),
        seed=int(seed),
    )
    if val_bias != float(bias):  # absent otherwise: earlier caches stay valid
        params["val_bias"] = val_bias
    if background not in BACKGROUNDS:
        raise ValueError(f"shapes dataset: background={background!r} is unknown; set it to tint or texture.")
    if background != "tint":  # absent for tint: its caches stay valid
        params["background"] = background
        params["texture"] = _texture_key(num_classes)
    data = cached_splits(root, params, lambda: _generate_splits(params), "shapes")
    classes = list(SHAPE_NAMES[:num_classes])
    multi_label = max_objects > 1
    if background == "tint":
        cues = [f"on_{c}_tint" for c in classes]  # group names: circle_on_square_tint, ...
    else:
        cues = [f"on_{t[0]}" for t in TEXTURE_SOURCES[:num_classes]]  # group names: circle_on_grass, ...

    # Which training images carry masks is fixed by the seed alone, so it does not shift with the budget's
    # other settings and a smaller budget is a subset of a larger one.
    train_use = choose_masks(torch.ones(n_train, dtype=torch.bool), n_masked, seed, "shapes dataset")

    def make(split: str, use_mask: torch.Tensor | None, aug: bool) -> ShapesDataset:
        d = data[split]
        n = d["images"].shape[0]
        # single-label: one group per (shape, tint); multi-label images hold several classes and have no group
        groups = None if multi_label else cue_group_ids(d["targets"].argmax(1), d["cue"], num_classes)
        return ShapesDataset(
            d["images"],
            d["seg"],
            d["targets"],
            d["cue"],
            use_mask if use_mask is not None else torch.zeros(n, dtype=torch.bool),
            classes,
            multi_label,
            mean,
            std,
            augment=aug,
            groups=groups,
        )

    train = make("train", train_use, augment)
    if annotation == "box":  # L_e on the tight box of each object's exact mask (a synthetic box annotation)
        train.spurious, train.seg = (
            train.seg == 0,
            box_label_maps(train.seg, box_enlarge),
        )  # the cue stays the background
    return DataSplits(
        train=train,
        val=make("val", None, False),
        tests={"test_biased": make("test_biased", None, False), "test_unbiased": make("test_unbiased", None, False)},
        classes=classes,
        multi_label=multi_label,
        groups=None if multi_label else cue_group_names(classes, cues),
        group_classes=None if multi_label else cue_group_classes(num_classes, range(num_classes)),  # tint q: class q's
        extras={
            "bias": float(bias),
            "val_bias": val_bias,
            "num_masked_train": n_masked,
            "annotation": annotation_extras(annotation),
        },
    )


def _validate(
    num_classes: int,
    image_size: int,
    n_train: int,
    n_val: int,
    n_test: int,
    bias: float,
    max_objects: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> None:
    """Raise ValueError with one sentence for the first bad argument."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"shapes dataset: num_classes={num_classes} is out of range; set it between 2 and {MAX_CLASSES}."
        )
    if image_size < 32:
        raise ValueError(f"shapes dataset: image_size={image_size} is too small; set it to 32 or more.")
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n < 1:
            raise ValueError(f"shapes dataset: {name}={n} must be a positive number of images; set it to 1 or more.")
    if not 0.0 <= bias <= 1.0:
        raise ValueError(
            f"shapes dataset: bias={bias} is not a probability; set it in [0, 1] (1/num_classes means no cue)."
        )
    if not 1 <= max_objects <= num_classes:
        raise ValueError(
            f"shapes dataset: max_objects={max_objects} must be between 1 and num_classes={num_classes}"
            " (objects in one image have distinct classes); lower it or raise num_classes."
        )
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(
            f"shapes dataset: mean={tuple(mean)} and std={tuple(std)} must each have 3 values with std > 0; fix them."
        )


def _mask_count(masks_to_use: float | int, n_train: int) -> int:
    """Number of training images whose masks may feed L_e: an int is a count, a float a fraction."""
    if isinstance(masks_to_use, bool) or not isinstance(masks_to_use, (int, float)):
        raise ValueError(
            f"shapes dataset: masks_to_use={masks_to_use!r} is not a number; give a count (int) or a fraction in [0, 1]."
        )
    if masks_to_use < 0:
        raise ValueError(
            f"shapes dataset: masks_to_use={masks_to_use} is negative; give a count >= 0 or a fraction in [0, 1]."
        )
    if isinstance(masks_to_use, int):
        if masks_to_use > n_train:
            raise ValueError(
                f"shapes dataset: masks_to_use={masks_to_use} exceeds n_train={n_train}; lower it or raise n_train."
            )
        return masks_to_use
    if masks_to_use > 1.0:
        raise ValueError(
            f"shapes dataset: masks_to_use={masks_to_use} is a fraction > 1; give a fraction in [0, 1] or an int count."
        )
    return int(round(masks_to_use * n_train))


def _generator_constants() -> dict:
    """The module-level tuning knobs that shape the generated pixels (part of the cache key)."""
    return dict(
        size_single=list(SIZE_RANGE_SINGLE),
        size_multi=list(SIZE_RANGE_MULTI),
        rotation=MAX_ROTATION_DEG,
        tint=TINT_STRENGTH,
        tint_value=TINT_VALUE,
        texture=TEXTURE_STRENGTH,
        noise=PIXEL_NOISE,
        tries=PLACEMENT_TRIES,
    )


def _generate_splits(params: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Every split from the cache key's parameters (the val split with its own bias)."""
    gen_args = {k: v for k, v in params.items() if k not in ("version", "constants", "val_bias", "texture")}
    val_bias = params.get("val_bias", params["bias"])
    return {
        split: _generate_split(split, **{**gen_args, "bias": val_bias if split == "val" else params["bias"]})
        for split in SPLITS
    }


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV (each in [0, 1]) to RGB: ... -> ... x 3."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v.unsqueeze(-1) * (1 - s.unsqueeze(-1) * f)


def _tint_palette(num_classes: int) -> torch.Tensor:
    """K x 3 strongly saturated background tints with hues evenly spaced around the colour wheel."""
    h = torch.arange(num_classes, dtype=torch.float32) / num_classes
    return _hsv_to_rgb(h, torch.full_like(h, 0.85), torch.full_like(h, TINT_VALUE))


def _generate_split(
    split: str,
    num_classes: int,
    image_size: int,
    n_train: int,
    n_val: int,
    n_test: int,
    bias: float,
    max_objects: int,
    seed: int,
    background: str = "tint",
) -> dict[str, torch.Tensor]:
    """Generate one split: uint8 images and label maps, float targets, long cue labels."""
    n = {"train": n_train, "val": n_val}.get(split, n_test)
    gen = torch.Generator().manual_seed(derive_seed(seed, split))
    size = image_size
    k = num_classes
    multi = max_objects > 1
    lo, hi = SIZE_RANGE_MULTI if multi else SIZE_RANGE_SINGLE

    # Object layout: slots x N tensors; `present` marks slots holding an object.
    cls, cx, cy, rad, present = _layout(n, k, size, max_objects, lo, hi, gen)
    rot = (torch.rand(cls.shape, generator=gen) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
    # Object colour is independent of class and cue: a random hue, either dark or bright-pastel, so it
    # contrasts with the mid-value tints by brightness whatever the hue.
    hue = torch.rand(cls.shape, generator=gen)
    dark = torch.rand(cls.shape, generator=gen) < 0.5
    sat = torch.where(
        dark, 0.3 + 0.7 * torch.rand(cls.shape, generator=gen), 0.5 * torch.rand(cls.shape, generator=gen)
    )
    val = torch.where(
        dark, 0.25 * torch.rand(cls.shape, generator=gen), 0.9 + 0.1 * torch.rand(cls.shape, generator=gen)
    )
    obj_rgb = _hsv_to_rgb(hue, sat, val)  # slots x N x 3

    targets = torch.zeros(n, k)
    for s in range(cls.shape[0]):
        targets[present[s], cls[s][present[s]]] = 1.0
    cue = _draw_cue(targets, bias if split != "test_unbiased" else 1.0 / k, split == "test_unbiased", gen)

    if background == "tint":
        # Background: class tint blended with a grey base, modulated by smooth brightness texture.
        palette = _tint_palette(k)
        grey = 0.45 + 0.15 * torch.rand(n, generator=gen)
        bg_rgb = TINT_STRENGTH * palette[cue] + (1 - TINT_STRENGTH) * grey.unsqueeze(1)  # N x 3
        coarse = torch.randn(n, 1, 6, 6, generator=gen)
    else:
        # Background: a zoomed, rotated patch of the cue class's texture at a class-independent brightness and contrast.
        textures = _textures()[:k]  # K x 1 x T x T
        crops = _texture_crops(n, gen)  # N x 2 x 3
        lo_b, hi_b = TEXTURE_BRIGHTNESS
        brightness = lo_b + (hi_b - lo_b) * torch.rand(n, generator=gen)
        lo_c, hi_c = TEXTURE_CONTRAST
        contrast = lo_c + (hi_c - lo_c) * torch.rand(n, generator=gen)
    noise = torch.randn(n, 3, size, size, generator=gen) * PIXEL_NOISE

    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    seg = torch.zeros(n, size, size, dtype=torch.uint8)
    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    ys, xs = coords.view(1, size, 1), coords.view(1, 1, size)
    for start in range(0, n, CHUNK):
        sl = slice(start, min(start + CHUNK, n))
        if background == "tint":
            texture = torch.nn.functional.interpolate(
                coarse[sl], size=(size, size), mode="bilinear", align_corners=False
            )
            img = bg_rgb[sl].view(-1, 3, 1, 1) * (1 + TEXTURE_STRENGTH * texture)
        else:
            img = _texture_background(textures, cue[sl], crops[sl], brightness[sl], contrast[sl], size)
        lab = torch.zeros(img.shape[0], size, size, dtype=torch.uint8)
        for s in range(cls.shape[0]):
            inside = _render_slot(cls[s, sl], cx[s, sl], cy[s, sl], rad[s, sl], rot[s, sl], present[s, sl], xs, ys, k)
            img = torch.where(inside.unsqueeze(1), obj_rgb[s, sl].view(-1, 3, 1, 1), img)
            lab = torch.where(inside, (cls[s, sl] + 1).to(torch.uint8).view(-1, 1, 1), lab)
        img = img + noise[sl]
        images[sl] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
        seg[sl] = lab
    return {"images": images, "seg": seg, "targets": targets, "cue": cue}


def _layout(
    n: int,
    k: int,
    size: int,
    max_objects: int,
    lo: float,
    hi: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classes, centres, radii and presence of up to max_objects non-overlapping objects per image."""
    slots = max_objects
    # Distinct classes per image: the first `slots` entries of a random permutation of the K classes.
    cls = torch.argsort(torch.rand(n, k, generator=gen), dim=1)[:, :slots].T.contiguous()  # slots x N
    rad = (lo + (hi - lo) * torch.rand(slots, n, generator=gen)) * size / 2
    # Centre candidates kept at least one radius (plus a pixel) from the border, so objects stay inside.
    tries = 1 if slots == 1 else PLACEMENT_TRIES
    u = torch.rand(slots, n, tries, 2, generator=gen)
    margin = (rad + 1).unsqueeze(-1)
    cand = margin.unsqueeze(-1) + u * (size - 2 * margin).unsqueeze(-1)  # slots x N x tries x 2
    cx, cy = cand[:, :, 0, 0].clone(), cand[:, :, 0, 1].clone()
    present = torch.zeros(slots, n, dtype=torch.bool)
    present[0] = True
    if slots > 1:
        count = torch.randint(1, slots + 1, (n,), generator=gen)
        # Per-image placement of the extra objects: a first non-overlapping candidate, else the object
        # is dropped. Python loops run over images and objects only, never over pixels.
        cand_l, rad_l, count_l = cand.tolist(), rad.tolist(), count.tolist()
        for i in range(n):
            placed = [(cand_l[0][i][0][0], cand_l[0][i][0][1], rad_l[0][i])]
            for s in range(1, count_l[i]):
                r = rad_l[s][i]
                for x, y in cand_l[s][i]:
                    if all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + 1) ** 2 for px, py, pr in placed):
                        placed.append((x, y, r))
                        cx[s, i], cy[s, i] = x, y
                        present[s, i] = True
                        break
    return cls, cx, cy, rad, present


def _draw_cue(targets: torch.Tensor, p_agree: float, uniform: bool, gen: torch.Generator) -> torch.Tensor:
    """Tint class per image: a present class with probability p_agree, else an absent one (uniform)."""
    n, k = targets.shape
    if uniform:
        return torch.randint(0, k, (n,), generator=gen)
    agree = torch.rand(n, generator=gen) < p_agree
    absent = 1.0 - targets
    # Images with every class present cannot disagree; they draw from all classes (and so agree).
    absent[absent.sum(1) == 0] = 1.0
    weights = torch.where(agree.unsqueeze(1), targets, absent)
    return torch.multinomial(weights, 1, generator=gen).squeeze(1)


def _render_slot(
    cls: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    rad: torch.Tensor,
    rot: torch.Tensor,
    present: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """B x H x W bool: pixels inside each image's object in this slot (False where the slot is empty)."""
    dx = (xs - cx.view(-1, 1, 1)) / rad.view(-1, 1, 1)
    dy = (ys - cy.view(-1, 1, 1)) / rad.view(-1, 1, 1)
    c, s = torch.cos(rot).view(-1, 1, 1), torch.sin(rot).view(-1, 1, 1)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotate the sampling grid, i.e. the shape by -rot
    inside = torch.zeros(u.shape, dtype=torch.bool)
    for j in range(k):
        sel = (cls == j) & present
        if sel.any():
            inside[sel] = SHAPE_FNS[j](u[sel], v[sel])
    return inside


@functools.lru_cache(maxsize=1)  # reading the photographs takes a fraction of a second; once per process
def _texture_photos() -> tuple[torch.Tensor, ...]:
    """The uint8 crops of TEXTURE_SOURCES (H x W grey or H x W x C colour), from scikit-image's bundled data."""
    try:
        import skimage.data
    except ImportError as err:
        raise MissingExtra(
            "shapes dataset: background=texture needs scikit-image, whose bundled photographs are the textures;"
            " install it with pip install 'gain-exp[textures]' (or pip install 'scikit-image>=0.25')."
        ) from err
    photos = []
    for name, fn, box in TEXTURE_SOURCES:
        try:
            photo = getattr(skimage.data, fn)()
        except (ImportError, AttributeError, OSError) as err:  # skimage raises ModuleNotFoundError to ask for pooch
            raise MissingExtra(
                f"shapes dataset: texture {name} (skimage.data.{fn}) is not inside scikit-image"
                f" {skimage.__version__}; install one that bundles it with pip install 'gain-exp[textures]'."
            ) from err
        if box is not None:
            photo = photo[box[0] : box[1], box[2] : box[3]]
        photos.append(torch.from_numpy(photo.copy()))
    return tuple(photos)


def _texture_key(num_classes: int) -> dict:
    """What the texture backgrounds depend on (part of the cache key): the sources of the K textures used, the
    texture constants and a digest of the photographs' pixels (a scikit-image that changes one makes a new cache)."""
    digest = hashlib.sha256()
    for photo in _texture_photos()[:num_classes]:
        digest.update(str(tuple(photo.shape)).encode())
        digest.update(photo.numpy().tobytes())
    return dict(
        sources=[[name, fn, box and list(box)] for name, fn, box in TEXTURE_SOURCES[:num_classes]],
        size=TEXTURE_SIZE,
        highpass=TEXTURE_HIGHPASS_SIGMA,
        scale=list(TEXTURE_SCALE_RANGE),
        brightness=list(TEXTURE_BRIGHTNESS),
        contrast=list(TEXTURE_CONTRAST),
        pixels=digest.hexdigest()[:16],
    )


@functools.lru_cache(maxsize=1)
def _textures() -> torch.Tensor:
    """len(TEXTURE_SOURCES) x 1 x T x T float textures, each with the same grey-level histogram (uniform, zero mean,
    unit std): grey, resampled to T = TEXTURE_SIZE, its illumination (a wide Gaussian blur) removed, then equalised."""
    out = []
    for photo in _texture_photos():
        x = photo.float()
        if x.ndim == 3:  # luminance, with skimage.color.rgb2gray's weights
            x = x[..., :3] @ torch.tensor([0.2125, 0.7154, 0.0721])
        x = torch.nn.functional.interpolate(
            x[None, None], size=(TEXTURE_SIZE, TEXTURE_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
        x = (x - _gaussian_blur(x, TEXTURE_HIGHPASS_SIGMA)).flatten()
        ranks = torch.empty_like(x)
        ranks[x.argsort(stable=True)] = torch.arange(x.numel(), dtype=torch.float32)
        uniform = ((ranks + 0.5) / x.numel() - 0.5) * math.sqrt(12)  # histogram equalisation to mean 0, std 1
        out.append(uniform.view(1, TEXTURE_SIZE, TEXTURE_SIZE))
    return torch.stack(out)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a 1 x 1 x H x W image, borders reflected."""
    r = int(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    kernel = torch.exp(-t * t / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))


def _texture_crops(n: int, gen: torch.Generator) -> torch.Tensor:
    """N x 2 x 3 affine maps (torch affine_grid) from image to texture coordinates: each image's patch is zoomed by a
    uniform factor in TEXTURE_SCALE_RANGE (its side over the texture's), rotated by a uniform angle and placed
    uniformly where the rotated patch stays inside the texture."""
    lo, hi = TEXTURE_SCALE_RANGE
    scale = lo + (hi - lo) * torch.rand(n, generator=gen)
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    reach = 1 - scale * math.sqrt(2)  # the patch's corners reach scale * sqrt(2) from its centre
    shift = (2 * torch.rand(n, 2, generator=gen) - 1) * reach.unsqueeze(1)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def _texture_background(
    textures: torch.Tensor,
    cue: torch.Tensor,
    crops: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """B x 3 x size x size grey backgrounds: each image's patch of its cue class's texture (crops: B x 2 x 3)."""
    patch = torch.empty(len(cue), 1, size, size)
    for c in cue.unique().tolist():
        sel = cue == c
        m = int(sel.sum())
        grid = torch.nn.functional.affine_grid(crops[sel], [m, 1, size, size], align_corners=False)
        patch[sel] = torch.nn.functional.grid_sample(
            textures[c : c + 1].expand(m, -1, -1, -1), grid, mode="bilinear", align_corners=False
        )
    return (brightness.view(-1, 1, 1, 1) + contrast.view(-1, 1, 1, 1) * patch).expand(-1, 3, -1, -1)
