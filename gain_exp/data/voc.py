"""`dataset=voc2012`: PASCAL VOC 2012 multi-label classification with the segmentation masks as pixel labels.

Reads the extracted VOCtrainval_11-May-2012.tar (no download): `root` may be the folder holding
VOCdevkit/, VOCdevkit/ itself, or VOC2012/ itself. Splits are the official ImageSets/Main train.txt
and val.txt; `sbd_train_list` replaces train.txt with your own list (e.g. the SBD-augmented
train_aug.txt; ids or "JPEGImages/<id>.jpg ..." lines), minus any VOC val image. Labels are the
classes of the annotated objects. With exclude_difficult, objects marked difficult do not count, and
an image whose objects are all difficult is dropped from its split (it has no label to learn or
score; extras["dropped_only_difficult"] counts them). Pixel masks are the SegmentationClass PNGs
(1464 train and 1449 val images): their values are VOC class ids, so class c (0-based) is c + 1,
0 background, 255 the border/difficult "void" label, kept as the ignore label. The L_e budget
`masks_to_use` is a count or a fraction of the training images that have masks (the paper used
200 of 1464). VOC's test labels are not public, so the final evaluation uses val: tests={"val": val}.

annotation=box: L_e trains on filled boxes instead (base.box_masks), drawn from the annotation XMLs' object boxes,
which every train image has, so the L_e budget counts all of them (5717 in Main/train.txt), not only the 1464 with
masks; difficult objects, when excluded, are ignore (255) boxes, as VOC's masks mark them void. Val keeps the
SegmentationClass masks for the localisation metrics (extras["annotation"] = {"train": "box", "scored_against":
"mask"}).

File errors follow mask_folder.py: unreadable images, masks and annotations (missing, undecodable,
unparsable XML) are skipped and counted in extras["skipped_files"] unless strict (an unreadable mask
costs only the mask); a mask of the wrong size or with values outside 0-20 and 255, and an annotation
naming an unknown class, stop the run whatever strict says.

A class that train has an image of but val has none of (a trimmed val list, or its files skipped) is warned once and
listed in extras["classes_without_images"] = {"val": [names]}; its per-class val metrics are NaN or left out.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.datasets import VOCDetection

from gain_exp.data.base import (
    IGNORE_INDEX,
    BoxReader,
    DataSplits,
    ImageBoxes,
    annotation_extras,
    check_annotation,
    classes_without_images,
    describe_classes_without_images,
    no_folder,
)
from gain_exp.data.images import MAX_PIXELS, UnreadableFile, header_size, mask_array
from gain_exp.data.mask_folder import SKIPPABLE, BadFiles, FileDataset, file_split
from gain_exp.data.transforms import build_transforms

log = logging.getLogger(__name__)

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
VALID_MASK_VALUES = frozenset(range(len(VOC_CLASSES) + 1)) | {IGNORE_INDEX}
HOW_TO_GET = "point root at the folder holding VOCdevkit/ from the extracted VOCtrainval_11-May-2012.tar"


def find_voc_dir(root: Path) -> Path:
    """The VOC2012 folder under root (root/VOCdevkit/VOC2012, root/VOC2012 or root itself)."""
    if not root.is_dir():
        raise FileNotFoundError(f"voc2012 dataset: root folder {root} {no_folder(root)}; {HOW_TO_GET}.")
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir() and (candidate / "Annotations").is_dir():
            return candidate
    raise FileNotFoundError(
        f"voc2012 dataset: no VOC2012 folder with JPEGImages/ and Annotations/ in {root}, {root / 'VOC2012'}"
        f" or {root / 'VOCdevkit' / 'VOC2012'}; {HOW_TO_GET}."
    )


def read_ids(path: Path) -> list[str]:
    """Image ids of a split list: the file stem of each line's first field, duplicates removed."""
    if not path.is_file():
        raise FileNotFoundError(
            f"voc2012 dataset: split list {path} does not exist; it should hold one image id per line"
            " (ImageSets/Main/train.txt and val.txt come with the VOC2012 trainval tar)."
        )
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(ids))


VocObject = tuple[str, bool, tuple[float, float, float, float] | None]  # (class, difficult, box or None)


def read_labels(path: Path, exclude_difficult: bool) -> list[str]:
    """Sorted class names of the objects in one annotation XML (difficult ones left out if asked)."""
    return labels_of(read_objects(path), exclude_difficult)


def labels_of(objects: list[VocObject], exclude_difficult: bool) -> list[str]:
    """Sorted class names of read_objects' objects (difficult ones left out if asked)."""
    return sorted({name for name, difficult, _ in objects if not (exclude_difficult and difficult)})


def read_objects(path: Path) -> list[VocObject]:
    """(class name, difficult, box) of each object in one annotation XML; box (x0, y0, x1, y1) in pixel-edge
    coordinates (VOC's 1-based inclusive xmin..xmax is x0 = xmin - 1, x1 = xmax), None when the object has none."""
    if not path.is_file():
        raise FileNotFoundError(
            f"voc2012 dataset: annotation {path} does not exist; restore it from the VOC tar or remove the id from the list."
        )
    try:
        objects = VOCDetection.parse_voc_xml(ET.parse(path).getroot())["annotation"].get("object", [])
    except (ET.ParseError, KeyError) as e:
        raise UnreadableFile(
            f"voc2012 dataset: cannot parse annotation {path} ({e}); restore it from the VOC tar."
        ) from None
    found: list[VocObject] = []
    for obj in objects:
        name = str(obj.get("name", "")).strip()
        if name not in VOC_CLASSES:
            raise ValueError(
                f"voc2012 dataset: annotation {path} names an unknown class {name!r}; VOC classes are"
                f" {', '.join(VOC_CLASSES)}, fix or remove that object."
            )
        found.append((name, str(obj.get("difficult", "0")).strip() == "1", _box(obj.get("bndbox"))))
    return found


def _box(node: object) -> tuple[float, float, float, float] | None:
    """An object's bndbox as (x0, y0, x1, y1) pixel edges, None when it is missing or not numeric."""
    try:
        xmin, ymin, xmax, ymax = (float(node[k]) for k in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None
    return xmin - 1, ymin - 1, xmax, ymax


def image_boxes(objects: list[VocObject], image: Path, exclude_difficult: bool) -> ImageBoxes | None:
    """The image's box annotation from its objects' XML boxes (difficult ones, when excluded, are ignore boxes, as
    VOC's masks mark them void); None when no object has a box or the image's header is unreadable (the build then
    reports the image itself)."""
    boxed = [(name, difficult, box) for name, difficult, box in objects if box is not None]
    if not boxed:
        return None
    try:
        size = header_size(image, "voc2012 dataset: ", max_pixels=None)  # the header only: the image is checked itself
    except (UnreadableFile, FileNotFoundError):
        return None
    return ImageBoxes(
        boxes=torch.tensor([box for _, _, box in boxed], dtype=torch.float64),
        classes=torch.tensor([VOC_CLASSES.index(name) for name, _, _ in boxed]),
        size=size,
        ignore=torch.tensor([exclude_difficult and difficult for _, difficult, _ in boxed]),
    )


def read_voc_mask(path: Path, target: torch.Tensor, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """H x W uint8 label map from a SegmentationClass PNG (VOC class ids already equal our c + 1)."""
    arr, _ = mask_array(
        path,
        "SegmentationClass masks are single-channel (palette) PNGs whose values are class ids, restore it"
        " from the VOC tar.",
        "voc2012 dataset: ",
        max_pixels,
    )
    bad = sorted(set(np.unique(arr).tolist()) - VALID_MASK_VALUES)
    if bad:
        raise ValueError(
            f"voc2012 dataset: mask {path} holds values {bad[:6]} outside 0-20 and 255; restore it from the VOC tar."
        )
    return torch.from_numpy(arr.astype(np.uint8))


def build(
    root: str,
    image_size: int = 224,
    exclude_difficult: bool = True,
    sbd_train_list: str | None = None,
    masks_to_use: int | float = 200,
    autoaugment: bool = True,
    hflip: bool = True,
    strict: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    annotation: str = "mask",
    box_enlarge: float = 0.0,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    seed: int = 0,
    batch_size: int = 1,  # part of the builder contract (data/base.py); VOC batches with the default sampler
) -> DataSplits:
    """Build the VOC2012 train and val splits (multi-label, 20 classes) from the extracted devkit (a DatasetBuilder)."""
    check_annotation(annotation, box_enlarge, "voc2012 dataset", boxes="the annotation XMLs' object boxes")
    voc = find_voc_dir(Path(root).expanduser())
    main = voc / "ImageSets" / "Main"
    seg_dir = voc / "SegmentationClass"
    if not seg_dir.is_dir():
        raise FileNotFoundError(f"voc2012 dataset: mask folder {seg_dir} does not exist; {HOW_TO_GET}.")
    val_ids = read_ids(main / "val.txt")
    if sbd_train_list is None:
        train_ids = read_ids(main / "train.txt")
    else:
        val_set = set(val_ids)
        listed = read_ids(Path(sbd_train_list).expanduser())
        train_ids = [i for i in listed if i not in val_set]
        if len(train_ids) < len(listed):
            # SBD's own train list overlaps VOC2012 val; training on those would leak into evaluation.
            log.warning(
                "voc2012: dropped %d VOC val image(s) from sbd_train_list %s",
                len(listed) - len(train_ids),
                sbd_train_list,
            )

    mask_names = {p.name for p in seg_dir.iterdir()}
    extras: dict = {}
    bad_files = BadFiles("voc2012 dataset", strict, extras, max_pixels)
    dropped = 0
    datasets: dict[str, FileDataset] = {}
    boxes: dict[Path, ImageBoxes] = {}  # annotation=box: each train image's XML boxes, keyed by the image's path
    for split, ids in (("train", train_ids), ("val", val_ids)):
        images, masks, targets = [], [], []
        with_boxes = split == "train" and annotation == "box"
        for image_id in ids:
            try:
                objects = read_objects(voc / "Annotations" / f"{image_id}.xml")
            except SKIPPABLE as e:  # an unknown class name is a data error and stops the run
                bad_files.report(e, voc / "Annotations" / f"{image_id}.xml")
                continue
            names = labels_of(objects, exclude_difficult)
            if not names:
                dropped += 1
                continue
            image = voc / "JPEGImages" / f"{image_id}.jpg"
            images.append(image)
            if with_boxes:  # every annotated image has boxes, not only the ~1464 with SegmentationClass masks
                entry = image_boxes(objects, image, exclude_difficult)
                if entry is not None:
                    boxes[image] = entry
                masks.append(image if entry is not None else None)  # the image's path keys its boxes
            else:
                masks.append(seg_dir / f"{image_id}.png" if f"{image_id}.png" in mask_names else None)
            targets.append([float(c in names) for c in VOC_CLASSES])
        datasets[split] = file_split(
            images,
            masks,
            torch.tensor(targets).view(-1, len(VOC_CLASSES)),
            BoxReader(boxes, box_enlarge) if with_boxes else read_voc_mask,
            build_transforms(split == "train", image_size, mean, std, autoaugment, hflip),
            bad_files,
            masks_to_use if split == "train" else None,
            seed,
            "voc2012 dataset",
            f"voc2012 dataset: no readable image in the {split} split of {voc}; check the warnings above.",
        )
    if dropped:
        log.info("voc2012: dropped %d image(s) whose objects are all marked difficult", dropped)
    extras.update(
        num_masked_train=int(datasets["train"].use_mask.sum()),
        dropped_only_difficult=dropped,
        annotation=annotation_extras(annotation),
    )
    empty = classes_without_images(VOC_CLASSES, datasets["train"].targets, {"val": datasets["val"].targets})
    if empty:  # counted from the annotations' labels: no image is decoded for this
        log.warning(
            "voc2012 dataset: some classes of train have no image in another split of %s (%s), so their"
            " per-class metrics on that split (AP) are NaN or left out; use a val list (ImageSets/Main/val.txt)"
            " with images of every class to score them.",
            voc,
            describe_classes_without_images(empty),
        )
        extras["classes_without_images"] = empty
    return DataSplits(
        train=datasets["train"],
        val=datasets["val"],
        tests={"val": datasets["val"]},
        classes=list(VOC_CLASSES),
        multi_label=True,
        extras=extras,  # the dict bad_files counts into, so files skipped while loading show up in it
    )
