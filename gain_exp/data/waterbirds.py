"""`dataset=waterbirds`: Waterbirds (Sagawa et al., ICLR 2020), landbird vs waterbird with the background as the cue.

Waterbirds pastes the birds of CUB-200-2011 (Wah et al. 2011), cut out with CUB's segmentation masks, onto Places
backgrounds (land: bamboo forest, broadleaf forest; water: ocean, natural lake). In train 95% of the landbirds are on
land and 95% of the waterbirds on water; val and test put each class half on land, half on water. Nothing is
downloaded; three folders are read:

- ``root``: the released ``waterbird_complete95_forest2water2`` folder (the group_DRO tarball) with ``metadata.csv``
  (columns ``img_filename`` (a CUB-like relative path), ``y`` (0 landbird, 1 waterbird), ``split`` (0 train, 1 val,
  2 test), ``place`` (0 land, 1 water); ``img_id`` and ``place_filename`` are not needed) and the images at
  ``<root>/<img_filename>``.
- ``segmentations``: CUB-200-2011's segmentations folder, the mask of each image at ``<img_filename>`` with ``.png``
  for ``.jpg``. CUB's masks are soft (0..255; group_DRO's generator blends bird and place with them as alpha); a pixel
  is bird where the mask is at least half (>= 128), label c + 1 of the image's class. They score the localisation metrics of every split and,
  with annotation=mask, are L_e's pixel labels (the ``masks_to_use`` budget, drawn by ``choose_masks``).
- ``cub_root`` (annotation=box only): the ``CUB_200_2011`` folder; ``images.txt`` (``<cub id> <relative path>``) and
  ``bounding_boxes.txt`` (``<cub id> <x> <y> <width> <height>``, floats in pixels of the original CUB image) give each
  bird's box, matched to a Waterbirds image by its relative path, never by Waterbirds' ``img_id``.

Image sizes: group_DRO's generator (dataset_scripts/generate_waterbirds.py, ``combine_and_mask``) crops and resizes
the Places background to the CUB image and pastes the bird at its own pixels, so a released image has its CUB
original's size and the boxes apply as they are. A box is still scaled by the ratio of the Waterbirds image's size to
the CUB image's (read from the segmentation PNG, which has the CUB image's size, or else from
``<cub_root>/images/<path>``), so a regenerated variant at another size keeps its boxes on the bird. Masks are not
rescaled: a segmentation PNG of another size than its image stops the run with one sentence naming both.

Classes are landbird and waterbird, single-label. ``DataSplits.negative_class`` is None: it marks a class whose images
hold no object (AM on positives only, detection metrics such as AUROC at a fixed false-positive rate), and here every
image of both classes shows a bird to localise and to mine attention from. Groups are class x place:
``landbird_on_land``, ``landbird_on_water``, ``waterbird_on_land``, ``waterbird_on_water`` (worst_group_acc and
group_acc/<g> follow from them); ``spurious`` is the background (seg == 0) of images with a mask, so
``trainer.eval_metrics.spurious_energy`` measures attention on the place. The splits are the metadata's: train, val,
and the test split named ``test``. Train images are resized to ``image_size`` (``augment=true``: random resized crop
of 70-100% of the area and a horizontal flip, group_DRO's ``--augment_data``); val and test are resized whole.

File errors follow mask_folder.py: unreadable images and masks are skipped and counted in extras["skipped_files"]
unless strict; a missing metadata.csv, segmentations or CUB folder is one sentence naming the path and what to
download.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from gain_exp.data.base import (
    BoxReader,
    DataSplits,
    ImageBoxes,
    Sample,
    annotation_extras,
    check_annotation,
    cue_group_classes,
    cue_group_ids,
    cue_group_names,
    no_folder,
)
from gain_exp.data.images import MAX_PIXELS, UnreadableFile, header_size, load_rgb
from gain_exp.data.mask_folder import BadFiles, FileDataset, file_split
from gain_exp.data.transforms import build_transforms

log = logging.getLogger(__name__)

NAME = "waterbirds dataset"
CLASSES = ["landbird", "waterbird"]  # metadata y = 0, 1
PLACES = ["on_land", "on_water"]  # metadata place = 0, 1
SPLITS = ("train", "val", "test")  # metadata split = 0, 1, 2
MASK_THRESHOLD = 128  # a pixel is bird where CUB's soft mask (0..255) is at least half
WATERBIRDS_URL = "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz"
CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
GET_WATERBIRDS = (
    f"download waterbird_complete95_forest2water2.tar.gz from the group_DRO release ({WATERBIRDS_URL}), extract it and"
    " set dataset.root to the extracted waterbird_complete95_forest2water2 folder"
)
GET_SEGMENTATIONS = (
    f"download segmentations.tgz of CUB-200-2011 from Caltech ({CUB_URL}), extract it and set dataset.segmentations"
    " to the extracted segmentations folder"
)
GET_CUB = (
    f"download CUB_200_2011.tgz from Caltech ({CUB_URL}), extract it and set dataset.cub_root to the extracted"
    " CUB_200_2011 folder"
)
COLUMNS = ("img_filename", "y", "split", "place")


class WaterbirdsDataset(FileDataset):
    """One split: a FileDataset whose samples also carry ``group`` (class x place) and ``spurious`` (the background of
    an image with a mask; nothing where it has none, so it is not scored)."""

    def __init__(self, split: FileDataset, groups: torch.Tensor, places: torch.Tensor) -> None:
        super().__init__(
            split.images,
            split.masks,
            split.targets,
            split.use_mask,
            split.read_mask,
            split.transform,
            split.bad_files,
        )
        self.groups = groups  # N long: cue_group_ids(label, place)
        self.places = places  # N long: 0 land, 1 water

    def __getitem__(self, i: int) -> Sample:
        sample = super().__getitem__(i)
        sample["group"] = self.groups[i].clone()
        sample["spurious"] = (sample["seg"] == 0) & sample["has_mask"]
        return sample


def read_metadata(root: Path) -> list[dict[str, str | int]]:
    """The rows of ``<root>/metadata.csv`` with img_filename (posix relative path) and int y, split, place."""
    path = root / "metadata.csv"
    if not root.is_dir():
        raise FileNotFoundError(f"{NAME}: root folder {root} {no_folder(root)}; {GET_WATERBIRDS}.")
    if not path.is_file():
        raise FileNotFoundError(f"{NAME}: {path} does not exist; {GET_WATERBIRDS}.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{NAME}: {path} lacks the column(s) {', '.join(missing)}; it needs {', '.join(COLUMNS)}, as in the"
                f" released metadata.csv ({GET_WATERBIRDS})."
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                values = {k: int(float(row[k])) for k in ("y", "split", "place")}
                ok = values["y"] in (0, 1) and values["split"] in (0, 1, 2) and values["place"] in (0, 1)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(
                    f"{NAME}: line {line} of {path} has y={row.get('y')!r}, split={row.get('split')!r},"
                    f" place={row.get('place')!r}; y and place must be 0 or 1 and split 0, 1 or 2, fix or restore it."
                )
            rows.append({"img_filename": _relative(row["img_filename"]), **values})
    if not rows:
        raise ValueError(f"{NAME}: {path} lists no image; restore it ({GET_WATERBIRDS}).")
    return rows


def _relative(name: str) -> str:
    """A relative image path as a posix string without a leading ./ (how metadata.csv and images.txt are matched)."""
    return Path(name.strip().removeprefix("./")).as_posix()


def read_cub_boxes(cub_root: Path) -> dict[str, tuple[float, float, float, float]]:
    """Relative image path -> (x, y, width, height) in pixels of the CUB image, from images.txt + bounding_boxes.txt."""
    files = {name: cub_root / name for name in ("images.txt", "bounding_boxes.txt")}
    for path in (cub_root, *files.values()):
        if not path.exists():
            raise FileNotFoundError(f"{NAME}: {path} does not exist; {GET_CUB}.")
    tables = {}
    for name, path in files.items():
        table = {}
        for line, text in enumerate(path.read_text().splitlines(), start=1):
            parts = text.split()
            if not parts:
                continue
            expected = 2 if name == "images.txt" else 5
            try:
                if len(parts) != expected:
                    raise ValueError
                table[parts[0]] = parts[1] if name == "images.txt" else tuple(float(v) for v in parts[1:])
            except ValueError:
                fields = "<id> <relative path>" if name == "images.txt" else "<id> <x> <y> <width> <height>"
                raise ValueError(
                    f"{NAME}: line {line} of {path} is {text.strip()!r}, not {fields}; restore it ({GET_CUB})."
                ) from None
        tables[name] = table
    boxes = tables["bounding_boxes.txt"]
    return {_relative(rel): boxes[cub_id] for cub_id, rel in tables["images.txt"].items() if cub_id in boxes}


def read_cub_mask(path: Path, target: torch.Tensor, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """H x W uint8 label map from a CUB segmentation PNG: the image's class + 1 where >= MASK_THRESHOLD, else 0."""
    grey = np.asarray(load_rgb(path, max_pixels), dtype=np.float32).mean(axis=-1)  # any PIL mode; CUB's are greyscale
    return torch.from_numpy((grey >= MASK_THRESHOLD).astype(np.uint8) * (int(target.argmax()) + 1))


def _box_entry(
    rel: str, label: int, box: tuple[float, float, float, float], image: Path, seg: Path | None, cub_root: Path
) -> ImageBoxes | None:
    """The image's CUB box in pixels of the Waterbirds image (scaled by its size / the CUB image's size); None when a
    header is unreadable (the build then reports the image)."""
    try:
        size = header_size(image, f"{NAME}: ", None)  # headers only: the image is checked itself
        original = cub_root / "images" / rel
        if seg is not None:
            cub_size = header_size(seg, f"{NAME}: ", None)  # a segmentation PNG has its CUB image's size
        elif original.is_file():
            cub_size = header_size(original, f"{NAME}: ", None)
        else:
            cub_size = size  # the released images keep their CUB image's size (module docstring)
    except (UnreadableFile, FileNotFoundError):
        return None
    x, y, w, h = box
    sx, sy = size[0] / cub_size[0], size[1] / cub_size[1]
    return ImageBoxes(
        boxes=torch.tensor([[x * sx, y * sy, (x + w) * sx, (y + h) * sy]], dtype=torch.float64),
        classes=torch.tensor([label]),
        size=size,
    )


def build(
    root: str,
    segmentations: str,
    cub_root: str | None = None,
    image_size: int = 224,
    masks_to_use: int | float = 0.1,
    annotation: str = "mask",
    box_enlarge: float = 0.0,
    augment: bool = False,
    strict: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    seed: int = 0,
    batch_size: int = 1,  # part of the builder contract (data/base.py); Waterbirds batches with the default sampler
) -> DataSplits:
    """Build the Waterbirds train, val and test splits with CUB masks (and, annotation=box, CUB boxes)."""
    check_annotation(annotation, box_enlarge, NAME, boxes="CUB-200-2011's bounding_boxes.txt")
    root_path = Path(root).expanduser()
    rows = read_metadata(root_path)
    seg_root = Path(segmentations).expanduser()
    if not seg_root.is_dir():
        raise FileNotFoundError(f"{NAME}: segmentations folder {seg_root} {no_folder(seg_root)}; {GET_SEGMENTATIONS}.")
    cub_path = None if cub_root is None else Path(cub_root).expanduser()
    if annotation == "box" and cub_path is None:
        raise ValueError(
            f"{NAME}: annotation=box reads CUB's bounding boxes from dataset.cub_root, which is not set; {GET_CUB},"
            " or use annotation=mask."
        )
    cub_boxes = read_cub_boxes(cub_path) if annotation == "box" and cub_path is not None else {}

    extras: dict = {}
    bad_files = BadFiles(NAME, strict, extras, max_pixels)
    boxes: dict[Path, ImageBoxes] = {}  # annotation=box: each train image's box, keyed by the image's path
    datasets: dict[str, WaterbirdsDataset] = {}
    without = {"segmentations": 0, "boxes": 0}
    for index, split in enumerate(SPLITS):
        chosen = [r for r in rows if r["split"] == index]
        with_boxes = split == "train" and annotation == "box"
        images, masks, labels, places = [], [], [], []
        for row in chosen:
            rel = str(row["img_filename"])
            image = root_path / rel
            seg = seg_root / Path(rel).with_suffix(".png")
            seg = seg if seg.is_file() else None
            without["segmentations"] += seg is None
            if with_boxes:
                box = cub_boxes.get(rel)
                entry = None if box is None else _box_entry(rel, int(row["y"]), box, image, seg, cub_path)
                without["boxes"] += box is None
                if entry is not None:
                    boxes[image] = entry
                masks.append(image if entry is not None else None)  # the image's path keys its box
            else:
                masks.append(seg)
            images.append(image)
            labels.append(int(row["y"]))
            places.append(int(row["place"]))
        if not images:
            raise ValueError(
                f"{NAME}: {root_path / 'metadata.csv'} puts no image in the {split} split (split = {index});"
                f" restore the released file ({GET_WATERBIRDS})."
            )
        split_data = file_split(
            images,
            masks,
            torch.nn.functional.one_hot(torch.tensor(labels), len(CLASSES)).float(),
            BoxReader(boxes, box_enlarge) if with_boxes else read_cub_mask,
            build_transforms(split == "train" and augment, image_size, mean, std, autoaugment=False, hflip=True),
            bad_files,
            masks_to_use if split == "train" else None,
            seed,
            NAME,
            f"{NAME}: no readable image in the {split} split of {root_path}; check the warnings above.",
        )
        kept = {p: k for k, p in enumerate(images)}
        keep = torch.tensor([kept[p] for p in split_data.images])  # file_split drops unreadable images
        place = torch.tensor(places)[keep]
        groups = cue_group_ids(torch.tensor(labels)[keep], place, len(PLACES))
        datasets[split] = WaterbirdsDataset(split_data, groups, place)
    group_names = cue_group_names(CLASSES, PLACES)
    if without["segmentations"]:
        log.warning(
            "%s: %d image(s) have no segmentation PNG under %s; they have no mask (no localisation metrics, no L_e)",
            NAME,
            without["segmentations"],
            seg_root,
        )
    if without["boxes"]:
        log.warning(
            "%s: %d train image(s) have no box in %s (matched by relative path); they have no L_e label map",
            NAME,
            without["boxes"],
            cub_path,
        )
    extras.update(
        num_masked_train=int(datasets["train"].use_mask.sum()),
        annotation=annotation_extras(annotation),
        group_counts={
            split: dict(zip(group_names, torch.bincount(d.groups, minlength=len(group_names)).tolist()))
            for split, d in datasets.items()
        },
        images_without_segmentation=without["segmentations"],
    )
    if annotation == "box":
        extras["train_images_without_box"] = without["boxes"]
    return DataSplits(
        train=datasets["train"],
        val=datasets["val"],
        tests={"test": datasets["test"]},
        classes=list(CLASSES),
        multi_label=False,
        negative_class=None,  # both classes show a bird to localise and mine attention from (module docstring)
        groups=group_names,
        group_classes=cue_group_classes(len(CLASSES), range(len(PLACES))),  # land: landbirds' place, water: waterbirds'
        extras=extras,  # the dict bad_files counts into, so load-time skips show up in it
    )
