"""Small on-disk datasets for tests: a VOC2012 devkit and a class-folder dataset with masks.

Both are deterministic, so tests can recompute what each file holds from the helper functions here
(`voc_objects`, `voc_has_mask`, `mask_kind`) instead of parsing the files back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_palette() -> list[int]:
    """The 256-entry VOC colour map (bit-interleaved class ids), flattened RGB."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_id(i: int) -> str:
    return f"2012_{i:06d}"


def voc_split(i: int) -> str:
    """Even images are train, odd ones val."""
    return "train" if i % 2 == 0 else "val"


def voc_has_mask(i: int) -> bool:
    """Half of each split has a SegmentationClass PNG (i % 4 == 0 in train, i % 4 == 1 in val)."""
    return i % 4 in (0, 1)


def voc_objects(i: int, n: int, size: int) -> list[tuple[str, bool, tuple[int, int, int, int]]]:
    """(class name, difficult, (xmin, ymin, xmax, ymax)) of image i; the last two images hold only a difficult object."""
    top_left = (2, 2, size // 2, size // 2)
    right = (size // 2 + 2, size // 4, size - 3, 3 * size // 4 - 1)
    bottom = (4, 3 * size // 4 + 1, 3 * size // 4, size - 3)
    extra = (VOC_CLASSES[(i + 11) % 20], True, bottom)
    if i >= n - 2:
        return [extra]
    objects = [(VOC_CLASSES[i % 20], False, top_left)]
    if i % 3 == 0:
        objects.append((VOC_CLASSES[(i + 5) % 20], False, right))
    if i % 4 in (1, 2):
        objects.append(extra)
    return objects


def voc_labels(i: int, n: int, size: int, exclude_difficult: bool = True) -> set[str]:
    return {name for name, difficult, _ in voc_objects(i, n, size) if not (exclude_difficult and difficult)}


def _voc_xml(image_id: str, size: int, objects) -> str:
    parts = [
        f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>",
        f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size><segmented>0</segmented>",
    ]
    for name, difficult, (x0, y0, x1, y1) in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


def voc_label_map(i: int, n: int, size: int) -> np.ndarray:
    """The SegmentationClass values of image i: class id inside objects, 255 borders and difficult objects."""
    seg = np.zeros((size, size), np.uint8)
    for name, difficult, (x0, y0, x1, y1) in voc_objects(i, n, size):
        if difficult:
            seg[y0 : y1 + 1, x0 : x1 + 1] = 255
            continue
        seg[y0 : y1 + 1, x0 : x1 + 1] = 255  # VOC draws a void border around each object
        seg[y0 + 1 : y1, x0 + 1 : x1] = VOC_CLASSES.index(name) + 1
    return seg


def save_voc_mask(label_map: np.ndarray, path: Path) -> None:
    """Save an H x W uint8 label map as a VOC-style palette PNG (the palette keeps Pillow from re-indexing)."""
    mask = Image.frombytes("P", (label_map.shape[1], label_map.shape[0]), np.ascontiguousarray(label_map).tobytes())
    mask.putpalette(voc_palette())
    mask.save(path)


def make_voc(root: Path, n: int = 24, size: int = 48) -> Path:
    """Write a VOCdevkit/VOC2012 tree of n JPEGs (half train, half val) under root; returns root."""
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    lists: dict[str, list[str]] = {"train": [], "val": [], "seg_train": [], "seg_val": []}
    for i in range(n):
        image_id = voc_id(i)
        rng = np.random.default_rng(i)
        image = rng.integers(90, 130, (size, size, 3)).astype(np.uint8)
        for name, _, (x0, y0, x1, y1) in voc_objects(i, n, size):
            c = VOC_CLASSES.index(name)
            image[y0 : y1 + 1, x0 : x1 + 1] = (40 + 10 * c, 230 - 9 * c, (70 * c) % 256)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (voc / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(image_id, size, voc_objects(i, n, size)))
        split = voc_split(i)
        lists[split].append(image_id)
        if voc_has_mask(i):
            save_voc_mask(voc_label_map(i, n, size), voc / "SegmentationClass" / f"{image_id}.png")
            lists[f"seg_{split}"].append(image_id)
    for name, ids in lists.items():
        folder = "Segmentation" if name.startswith("seg_") else "Main"
        (voc / "ImageSets" / folder / f"{name.removeprefix('seg_')}.txt").write_text("".join(f"{x}\n" for x in ids))
    return Path(root)


def mask_kind(j: int) -> str | None:
    """Mask of the j-th positive image: none, the primary `<stem>_mask.png`, or the seed's `<stem>m.<ext>`."""
    return (None, "primary", "seed")[j % 3]


def image_ext(j: int) -> str:
    return ".jpg" if j % 2 == 0 else ".png"


def object_box(j: int, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, of the bright square in the j-th positive image."""
    side = size // 3
    x0 = 2 + (j * 7) % (size - side - 4)
    y0 = 2 + (j * 5) % (size - side - 4)
    return x0, y0, x0 + side, y0 + side


def make_mask_folder(
    root: Path,
    classes: tuple[str, ...] = ("lesion",),
    negative: str | None = "negative",
    n_per_class: int = 6,
    size: int = 48,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> Path:
    """Write <root>/<split>/<class>/img_XXX.<jpg|png> with binary masks for 2 in 3 positives; returns root."""
    for split in splits:
        for c, name in enumerate(classes + ((negative,) if negative else ())):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n_per_class):
                rng = np.random.default_rng(1000 * c + j)
                image = rng.integers(20, 60, (size, size, 3)).astype(np.uint8)
                ext, stem = image_ext(j), f"img_{j:03d}"
                if name != negative:
                    x0, y0, x1, y1 = object_box(j, size)
                    image[y0:y1, x0:x1] = 230
                    mask = np.zeros((size, size), np.uint8)
                    mask[y0:y1, x0:x1] = 255
                    kind = mask_kind(j)
                    if kind == "primary":
                        Image.fromarray(mask).save(folder / f"{stem}_mask.png")
                    elif kind == "seed":
                        Image.fromarray(mask).save(folder / f"{stem}m{ext}")
                Image.fromarray(image).save(folder / f"{stem}{ext}")
    return Path(root)
