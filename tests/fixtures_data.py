"""Small on-disk datasets for tests: a VOC2012 devkit, a class-folder dataset with masks and a Waterbirds layout.

All are deterministic, so tests can recompute what each file holds from the helper functions here
(`voc_objects`, `voc_has_mask`, `mask_kind`, `wb_box`, `wb_bird`, ...) instead of parsing the files back.
"""

from __future__ import annotations

import csv
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


# ---- Waterbirds: the released folder (metadata.csv + CUB-like image paths), CUB segmentations and CUB's box files ----

WB_SPECIES = (  # (CUB class folder, file stem, waterbird?)
    ("001.Black_footed_Albatross", "Black_Footed_Albatross", 1),
    ("026.Bronzed_Cowbird", "Bronzed_Cowbird", 0),
    ("059.California_Gull", "California_Gull", 1),
    ("094.White_breasted_Nuthatch", "White_Breasted_Nuthatch", 0),
)
WB_SOFT_RIM = 102  # CUB masks are soft (0..255): a rim below the 128 threshold


def wb_label(i: int) -> int:
    """0 landbird, 1 waterbird (from the species folder, as Waterbirds' y)."""
    return WB_SPECIES[i % 4][2]


def wb_split(i: int) -> int:
    """0 train, 1 val, 2 test."""
    return i % 3


def wb_place(i: int) -> int:
    """0 land, 1 water: train agrees with the label but for 2 images in 8 (one of each class), val/test are balanced
    (n = 24: every split holds every class x place group)."""
    k = i // 3  # the image's position in its split
    if wb_split(i) == 0:
        return 1 - wb_label(i) if k % 8 in (3, 6) else wb_label(i)
    return (k // 2) % 2


def wb_rel(i: int) -> str:
    folder, stem, _ = WB_SPECIES[i % 4]
    return f"{folder}/{stem}_{i + 1:04d}_{790000 + 37 * i}.jpg"


def wb_cub_id(i: int) -> int:
    """The image's id in CUB's images.txt: unrelated to Waterbirds' img_id (i + 1)."""
    return 5000 - 7 * i


def wb_box(i: int, size: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, of the bird's bounding box; the bird is the ellipse inscribed in it."""
    x0, y0 = 3 + (i * 5) % (size // 3), 4 + (i * 7) % (size // 3)
    return x0, y0, x0 + size // 2 + i % 5, y0 + size // 3 + i % 4


def wb_bird(i: int, size: int) -> np.ndarray:
    """H x W bool: the bird's pixels (the core of its soft mask), the ellipse inscribed in wb_box."""
    x0, y0, x1, y1 = wb_box(i, size)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def make_waterbirds(root: Path, n: int = 24, size: int = 40) -> tuple[Path, Path, Path]:
    """Write a released-style Waterbirds folder, CUB segmentations and CUB_200_2011's images.txt and
    bounding_boxes.txt (CUB ids differ from img_id, lines in another order) under root; returns their three paths."""
    root = Path(root)
    wb, seg_dir, cub = root / "waterbird_complete95_forest2water2", root / "segmentations", root / "CUB_200_2011"
    for d in (wb, seg_dir, cub):
        d.mkdir(parents=True, exist_ok=True)
    rows, images_txt, boxes_txt = [], [], []
    for i in range(n):
        rel = wb_rel(i)
        (wb / rel).parent.mkdir(parents=True, exist_ok=True)
        (seg_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        place = (60, 150, 60) if wb_place(i) == 0 else (50, 90, 200)  # green land, blue water
        image = (np.array(place) + rng.integers(-15, 15, (size, size, 3))).clip(0, 255).astype(np.uint8)
        bird = wb_bird(i, size)
        image[bird] = (230, 220, 40) if wb_label(i) == 0 else (240, 240, 240)
        Image.fromarray(image).save(wb / rel, quality=95)
        mask = np.zeros((size, size), np.uint8)
        rim = np.zeros_like(bird)
        rim[:, 1:] |= bird[:, :-1]
        rim[:, :-1] |= bird[:, 1:]
        mask[rim & ~bird] = WB_SOFT_RIM
        mask[bird] = 255
        Image.fromarray(mask).save((seg_dir / rel).with_suffix(".png"))
        rows.append([i + 1, rel, wb_label(i), wb_split(i), wb_place(i), f"/o/ocean/{i:08d}.jpg"])
        x0, y0, x1, y1 = wb_box(i, size)
        images_txt.append(f"{wb_cub_id(i)} {rel}")
        boxes_txt.append(f"{wb_cub_id(i)} {float(x0)} {float(y0)} {float(x1 - x0)} {float(y1 - y0)}")
    images_txt.append("9999 200.Common_Yellowthroat/Common_Yellowthroat_0003_190521.jpg")  # CUB has more birds
    boxes_txt.append("9999 1.0 2.0 3.0 4.0")
    with (wb / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        writer.writerows(rows)
    (cub / "images.txt").write_text("".join(f"{line}\n" for line in images_txt))
    (cub / "bounding_boxes.txt").write_text("".join(f"{line}\n" for line in reversed(boxes_txt)))
    return wb, seg_dir, cub
