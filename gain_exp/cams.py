"""CAM pseudo-masks (weakly supervised segmentation seeds) from a trained run, scored with the WSSS seed protocol.

    python -m gain_exp.cams RUN_DIR --split train|val|<test split> --out DIR [--checkpoint best|last|PATH]
        [--thresholds 0.05:0.95:0.05 | 0.2,0.3] [--threshold T] [--scales 1.0 | 0.5,1.0,1.5,2.0] [--flip]
        [--limit N] [--masked-only] [--batch-size B] [--device D] [--trust] [key=value overrides ...]

The protocol (docs/methods.md, "CAM seeds on VOC"; IRN, Ahn et al. CVPR 2019): for every image and every class present in
its image-level labels, the class's CAM at each scale (and of the horizontally flipped image, flipped back) is resized
to the image and summed; ReLU; divided by its maximum. The background score is a constant threshold t and each
pixel's label is argmax over [t, CAM_1, ..., CAM_P] (ties go to the background). mIoU is computed from one confusion
matrix per t accumulated over all images with a ground-truth mask (255 ignored), as the mean of TP / (TP + FP + FN)
over the classes, background included, that occur in the ground truth or the prediction. No CRF.

The maps are the run's own attention: its GAIN's feature layer and CAM method (``gain.cam``), the class scores of the
trained classifier, one map per (image, present class) pair through GAIN's ``per_label`` formulation (whatever the run
trained with) and without GAIN's per-map normalisation (the protocol normalises after summing the scales). Images are
the dataset's evaluation transform (VOC: the whole image resized to ``dataset.image_size`` squared, the mask resized
with nearest neighbours), so the numbers are at that resolution, not at VOC's original image sizes; the train split is
read with the evaluation transform too (no random crop, flip or AutoAugment).

Writes (<image>: the file stem, or the path below the images' common folder when two stems are alike)
DIR/cams/<image>.npz (``cams``: P x H x W float16 maps, ``classes``: their P class indices, 0-based),
DIR/masks/<image>.png (the pseudo-mask at the best t, or at --threshold: an indexed PNG, 0 background, c + 1 class c,
with the VOC palette for VOC and a plain one otherwise) and DIR/miou.json (protocol, mIoU per t, best t, per-class IoU).
"""

from __future__ import annotations

import argparse
import colorsys
import copy
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from gain_exp.core.attention import normalise
from gain_exp.core.gain import GAIN
from gain_exp.data.base import IGNORE_INDEX, DataSplits
from gain_exp.data.voc import VOC_CLASSES
from gain_exp.output.files import CannotWrite, atomic_write, jsonable, write_json
from gain_exp.runs.reload import load_checked
from gain_exp.runs.trust import TRUST_FLAG, TRUST_HELP

DEFAULT_THRESHOLDS = "0.05:0.95:0.05"


# ---- the protocol: maps, labels, mIoU ----


def class_maps(
    gain: GAIN, images: torch.Tensor, targets: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(maps N x H x W in [0, 1], image index N, class index N): one map per (image, class marked in ``targets``).

    map = ReLU(sum_{s in scales} sum_{f in flips} resize_HxW(f^-1(CAM(f(resize_s(image)))))) / max, with CAM the run's
    attention method on the class's score, taken at the network input and upsampled bilinearly (GAIN's own upsampling).
    Image-major order: the pairs of ``targets.nonzero()``. A map that is zero everywhere stays zero.
    """
    height, width = images.shape[-2:]
    total = image_index = class_index = None
    was_training = gain.training
    gain.eval()  # batch-norm with its running statistics; the run's train/eval state comes back below
    view = per_class_view(gain)
    try:
        for scale in scales:
            scaled = (
                images
                if scale == 1.0
                else F.interpolate(
                    images,
                    size=(max(1, round(height * scale)), max(1, round(width * scale))),
                    mode="bilinear",
                    align_corners=False,
                )
            )
            for flipped in (False, True) if flip else (False,):
                out = view(scaled.flip(-1) if flipped else scaled, targets, mining=False)
                maps = out.attention.flip(-1) if flipped else out.attention
                if maps.shape[-2:] != (height, width):
                    maps = F.interpolate(
                        maps.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False
                    ).squeeze(1)
                total = maps if total is None else total + maps
                image_index, class_index = out.image_index, out.class_index
    finally:
        gain.train(was_training)
    return normalise(F.relu(total), "max"), image_index, class_index


def per_class_view(gain: GAIN) -> GAIN:
    """The same GAIN (shared weights, layer and CAM method) giving one raw map per (image, class): ``per_label``
    without per-map normalisation. A shallow copy, so the run's own module keeps its settings."""
    view = copy.copy(gain)
    view.formulation = "per_label"
    view.normalisation = "none"
    return view


def pseudo_label(cams: torch.Tensor, classes: torch.Tensor, threshold: float) -> torch.Tensor:
    """H x W label map: argmax over [t, CAM_1..CAM_P] -> 0 (background, also on ties) or classes[p] + 1.

    ``cams`` P x H x W (P may be 0: all background), ``classes`` P long (0-based class of each map).
    """
    background = cams.new_full((1, *cams.shape[1:]), float(threshold))
    lookup = torch.cat([classes.new_zeros(1), classes.to(torch.long) + 1])
    return lookup[torch.cat([background, cams]).argmax(0)]  # argmax returns the first maximum: background on ties


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_labels: int) -> torch.Tensor:
    """L x L counts, rows ground truth, columns prediction, over the pixels where gt != 255."""
    valid = gt != IGNORE_INDEX
    gt_valid, pred_valid = gt[valid].long(), pred[valid].long()
    if gt_valid.numel() and int(gt_valid.max()) >= num_labels:
        raise ValueError(
            f"a ground-truth mask holds label {int(gt_valid.max())} but there are only {num_labels} "
            f"labels (background + classes); masks must hold 0, c + 1 for class c, or 255."
        )
    return torch.bincount(gt_valid * num_labels + pred_valid, minlength=num_labels**2).view(num_labels, num_labels)


def iou_per_label(confusion: torch.Tensor) -> torch.Tensor:
    """L IoUs TP / (TP + FP + FN) from a confusion matrix; NaN for a label in neither ground truth nor prediction."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean IoU over the labels that occur in ground truth or prediction (NaN when none does)."""
    iou = iou_per_label(confusion)
    present = ~iou.isnan()
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


class ThresholdSweep:
    """One confusion matrix per background threshold t, accumulated image by image."""

    def __init__(self, thresholds: Sequence[float], num_labels: int, device: torch.device | str = "cpu") -> None:
        self.thresholds = [float(t) for t in thresholds]
        self.num_labels = num_labels
        self.confusion = torch.zeros(len(self.thresholds), num_labels, num_labels, dtype=torch.long, device=device)

    def add(self, cams: torch.Tensor, classes: torch.Tensor, gt: torch.Tensor) -> None:
        """Score one image: its P x H x W maps, their P classes and its H x W ground truth."""
        for k, t in enumerate(self.thresholds):
            self.confusion[k] += confusion_matrix(pseudo_label(cams, classes, t), gt, self.num_labels)

    def mious(self) -> list[float]:
        return [mean_iou(c) for c in self.confusion.cpu()]

    def best(self) -> int:
        """Index of the threshold with the highest mIoU (the lowest such t on ties); -1 if nothing was scored."""
        values = self.mious()
        finite = [k for k, v in enumerate(values) if not math.isnan(v)]
        return max(finite, key=lambda k: (values[k], -k)) if finite else -1


# ---- command-line values ----


def parse_thresholds(text: str) -> list[float]:
    """``start:stop:step`` (stop included) or a comma list, each t in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            values = [round(start + k * step, 6) for k in range(int(np.floor((stop - start) / step + 1e-6)) + 1)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= t <= 1.0 for t in values):
        raise ValueError(
            f"--thresholds {text!r} is not valid; give start:stop:step (e.g. {DEFAULT_THRESHOLDS}) or a "
            f"comma list, with every t in [0, 1] (maps are normalised to a maximum of 1)."
        )
    return sorted(set(values))


def parse_scales(text: str) -> list[float]:
    """A comma list of positive input scales, e.g. ``0.5,1.0,1.5,2.0``."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not s > 0 for s in values):
        raise ValueError(
            f"--scales {text!r} is not valid; give a comma list of positive scales, e.g. 1.0 or 0.5,1.0,1.5,2.0."
        )
    return values


# ---- data ----


def cam_split(data: DataSplits, split: str) -> Dataset:
    """The split to compute CAMs on, read deterministically: train gets the evaluation transform of val."""
    if split == "val":
        return data.val
    if split in data.tests:
        return data.tests[split]
    if split != "train":
        names = ", ".join(dict.fromkeys(["train", "val", *data.tests]))
        raise ValueError(f"--split {split}: the dataset has no such split; use one of {names}.")
    view = copy.copy(data.train)
    if hasattr(view, "transform") and hasattr(data.val, "transform"):
        view.transform = data.val.transform  # file datasets: resize only, no random crop, flip or AutoAugment
    if hasattr(view, "augment"):
        view.augment = False  # built-in shapes: no random flip
    return view


def image_names(dataset: Dataset, split: str) -> list[str]:
    """A unique name per image: the file stem when no two are alike; else the path below the images' common folder,
    without the suffix (``cat/001``: the maps go into subfolders) or, if that still repeats, with it
    (``cat/001.png``); ``<split>_<index>`` for images that are not files."""
    files = getattr(dataset, "images", None)
    if isinstance(files, list) and len(files) == len(dataset) and all(isinstance(p, Path) for p in files):
        stems = [p.stem for p in files]
        if len(set(stems)) == len(stems):
            return stems
        common = Path(os.path.commonpath([p.resolve().parent for p in files]))
        relative = [p.resolve().relative_to(common) for p in files]
        names = [r.with_suffix("").as_posix() for r in relative]
        if len(set(names)) == len(names):
            return names
        names = [r.as_posix() for r in relative]
        if len(set(names)) == len(names):
            return names
        twice = next(n for n in names if names.count(n) > 1)
        raise ValueError(
            f"--split {split} lists the image {twice} more than once, so its maps would overwrite each other; "
            f"remove the duplicate from the dataset's file list."
        )
    return [f"{split}_{i:06d}" for i in range(len(dataset))]


def masked_indices(dataset: Dataset) -> list[int] | None:
    """Indices of the images with a mask file, when the dataset lists its mask files (else None: unknown)."""
    masks = getattr(dataset, "masks", None)
    if isinstance(masks, list) and len(masks) == len(dataset):
        return [i for i, m in enumerate(masks) if m is not None]
    return None


def same_size_groups(samples: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Consecutive runs of samples whose images have one size (what can be stacked into one batch)."""
    group: list[dict[str, Any]] = []
    for sample in samples:
        if group and sample["image"].shape != group[0]["image"].shape:
            yield group
            group = []
        group.append(sample)
    if group:
        yield group


# ---- files ----


def voc_palette() -> list[int]:
    """The 256-colour VOC palette, flattened RGB: colour i interleaves the bits of i over R, G, B (VOC devkit)."""
    palette = []
    for i in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((i >> (3 * bit + channel)) & 1) << (7 - bit)
        palette += rgb
    return palette


def plain_palette(num_classes: int) -> list[int]:
    """0 black, the classes evenly spaced hues, 255 (ignore) white, everything else black."""
    palette = [0, 0, 0] * 256
    for c in range(num_classes):
        r, g, b = colorsys.hsv_to_rgb(c / max(1, num_classes), 0.8, 0.95)
        palette[3 * (c + 1) : 3 * (c + 2)] = [round(255 * r), round(255 * g), round(255 * b)]
    palette[3 * 255 :] = [255, 255, 255]
    return palette


def palette_for(classes: Sequence[str]) -> list[int]:

    return voc_palette() if tuple(classes) == VOC_CLASSES else plain_palette(len(classes))


def save_label_png(label: torch.Tensor | np.ndarray, path: Path, palette: list[int]) -> None:
    """An H x W label map (values 0-255) as an indexed ('P') PNG with ``palette``."""
    array = np.ascontiguousarray(np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label, np.uint8))
    image = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
    image.putpalette(palette)
    with atomic_write(path) as f:
        image.save(f, format="PNG")


def save_cams(cams: torch.Tensor, classes: torch.Tensor, path: Path) -> None:
    with atomic_write(path) as f:
        np.savez_compressed(f, cams=cams.cpu().numpy().astype(np.float16), classes=classes.cpu().numpy())


def load_cams(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(path) as saved:
        return torch.from_numpy(saved["cams"].astype(np.float32)), torch.from_numpy(saved["classes"])


# ---- the export ----


@dataclass
class CamOptions:
    split: str
    out: Path
    thresholds: list[float]
    scales: list[float]
    flip: bool = False
    threshold: float | None = None  # t of the written pseudo-masks (default: the best t)
    limit: int | None = None
    masked_only: bool = False
    batch_size: int = 16
    workers: int = 0
    progress: bool = False


def export(gain: GAIN, data: DataSplits, options: CamOptions, device: torch.device) -> dict[str, Any]:
    """Maps and pseudo-masks of one split under ``options.out``, and the mIoU sweep; returns the miou.json record."""
    dataset = cam_split(data, options.split)
    names = image_names(dataset, options.split)
    indices = masked_indices(dataset) if options.masked_only else None
    indices = list(range(len(dataset))) if indices is None else indices
    indices = indices[: options.limit] if options.limit is not None else indices
    if not indices:
        raise ValueError(
            f"--split {options.split} has no image to process{' with a mask' * options.masked_only}; "
            f"pick another split{' or drop --masked-only' * options.masked_only}."
        )
    # binary data: the negative class has no object to segment, so it gets no map
    excluded = [] if data.negative_class is None else [int(data.negative_class)]
    sweep = ThresholdSweep(options.thresholds, data.num_classes + 1, device)
    written, unmasked, skipped, sizes = [], 0, 0, set()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=options.batch_size,
        num_workers=options.workers,
        collate_fn=list,
    )
    with torch.no_grad():
        for samples in tqdm(loader, desc=f"cams {options.split}", disable=not options.progress, leave=False):
            if options.masked_only:
                kept = [s for s in samples if bool(s["has_mask"])]  # a mask file that became unreadable
                skipped += len(samples) - len(kept)
                samples = kept
            for group in same_size_groups(samples):
                sizes.add(tuple(group[0]["image"].shape[-2:]))
                for sample, (cams, classes) in zip(group, _group_maps(gain, group, excluded, options, device)):
                    name = names[int(sample["index"])]
                    save_cams(cams, classes, options.out / "cams" / f"{name}.npz")
                    written.append(name)
                    if bool(sample["has_mask"]):
                        sweep.add(cams, classes, sample["seg"].to(device))
                    else:
                        unmasked += 1
    if len(set(written)) != len(written) or len(written) != len(indices) - skipped:
        raise ValueError(
            f"--split {options.split}: {len(set(written))} map files for {len(indices) - skipped} images, so some "
            f"overwrote others; no pseudo-masks or miou.json were written."
        )
    mious, best = sweep.mious(), sweep.best()
    mask_t = options.threshold if options.threshold is not None else (sweep.thresholds[best] if best >= 0 else None)
    if mask_t is not None:
        palette = palette_for(data.classes)
        for name in written:
            cams, classes = load_cams(options.out / "cams" / f"{name}.npz")
            save_label_png(pseudo_label(cams, classes, mask_t), options.out / "masks" / f"{name}.png", palette)
    labels = ["background", *data.classes]
    return {
        "split": options.split,
        "images": len(written),
        "scored": len(written) - unmasked,
        "skipped_without_mask": unmasked,
        "scales": options.scales,
        "flip": options.flip,
        "crf": False,
        "cam": gain.cam,
        "resolution": [f"{h}x{w}" for h, w in sorted(sizes)],
        "thresholds": sweep.thresholds,
        "miou": [{"threshold": t, "miou": jsonable(v)} for t, v in zip(sweep.thresholds, mious)],
        "best": None
        if best < 0
        else {
            "threshold": sweep.thresholds[best],
            "miou": jsonable(mious[best]),
            "iou": {n: jsonable(float(v)) for n, v in zip(labels, iou_per_label(sweep.confusion[best].cpu()))},
        },
        "masks_threshold": mask_t,
        "excluded_classes": [data.classes[c] for c in excluded],
    }


def _group_maps(
    gain: GAIN, group: list[dict[str, Any]], excluded: Sequence[int], options: CamOptions, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(P x H x W maps, P classes) per sample of one same-size group, the maps rounded to float16 as they are saved
    (so the scores describe the exported maps exactly)."""
    images = torch.stack([s["image"] for s in group]).to(device)
    targets = torch.stack([s["target"] for s in group]).to(device)
    targets[:, list(excluded)] = 0
    if not bool(targets.any()):
        empty = images.new_zeros((0, *images.shape[-2:]))
        return [(empty, torch.zeros(0, dtype=torch.long, device=device)) for _ in group]
    maps, image_index, class_index = class_maps(gain, images, targets, options.scales, options.flip)
    maps = maps.half().float()
    return [(maps[image_index == b], class_index[image_index == b]) for b in range(len(group))]


# ---- command line ----


def protocol_line(record: dict[str, Any], checkpoint: Any, threshold_text: str) -> str:
    """The one line that must travel with every number: split, images, scales, flip, thresholds, no CRF, weights."""
    scales = ",".join(f"{s:g}" for s in record["scales"])
    return (
        f"CAM seeds: split={record['split']}, {record['scored']} image(s) scored ({record['skipped_without_mask']}"
        f" without a mask skipped), scales={scales}, flip={'yes' if record['flip'] else 'no'}, "
        f"thresholds={threshold_text} ({len(record['thresholds'])}), no CRF, cam={record['cam']}, "
        f"at {'/'.join(record['resolution'])} (the dataset's eval transform), checkpoint={checkpoint}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m gain_exp.cams", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory written by python -m gain_exp.run")
    parser.add_argument("overrides", nargs="*", help="config overrides on top of the run's (e.g. dataset.root=...)")
    parser.add_argument("--split", required=True, help="train, val or a test split of the dataset")
    parser.add_argument("--out", type=Path, required=True, help="output directory (cams/, masks/, miou.json)")
    parser.add_argument("--checkpoint", help="best, last or a .ckpt file (default: the one the run tested with)")
    parser.add_argument(
        "--thresholds",
        default=DEFAULT_THRESHOLDS,
        help=f"background thresholds t swept: start:stop:step or a list (default {DEFAULT_THRESHOLDS})",
    )
    parser.add_argument("--threshold", type=float, help="t of the written pseudo-masks (default: the best t)")
    parser.add_argument("--scales", default="1.0", help="input scales summed, e.g. 0.5,1.0,1.5,2.0 (default 1.0)")
    parser.add_argument("--flip", action="store_true", help="also sum the maps of the flipped images")
    parser.add_argument("--limit", type=int, help="only the first N images of the split")
    parser.add_argument("--masked-only", action="store_true", help="only the images with a ground-truth mask")
    parser.add_argument("--batch-size", type=int, help="images per forward (default: trainer.eval_batch_size)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the run's trainer.device)")
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    args = parser.parse_intermixed_args(argv)
    try:
        options = _options(args)
        experiment = load_checked(Path(args.run_dir), args.checkpoint, args.overrides, args.device, args.trust)
        trainer = experiment.plan.trainer
        options.batch_size = args.batch_size or trainer.eval_batch_size or trainer.batch_size
        options.workers = trainer.workers
        options.progress = sys.stderr.isatty()
        record = export(experiment.gain, experiment.data, options, experiment.runtime.device)
    except (ValueError, FileNotFoundError, CannotWrite) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the cause quoted
        return 2
    record = {
        "run_dir": str(args.run_dir),
        "checkpoint": str(experiment.checkpoint),
        **record,
        "command": shlex.join(["python", "-m", "gain_exp.cams", *(sys.argv[1:] if argv is None else argv)]),
    }
    write_json(options.out / "miou.json", record)
    print(protocol_line(record, experiment.checkpoint, args.thresholds))
    for row in record["miou"]:
        print(f"t={row['threshold']:.2f}  mIoU={_number(row['miou'])}")
    best = record["best"]
    if best is None:
        print(f"best: none (no image of {options.split} has a ground-truth mask)")
    else:
        print(f"best: t={best['threshold']:.2f}  mIoU={_number(best['miou'])}")
    if record["masks_threshold"] is None:
        print(
            "note: no pseudo-masks written (no t to choose without ground truth); pass --threshold T", file=sys.stderr
        )
    else:
        print(
            f"wrote {record['images']} maps to {options.out / 'cams'} and pseudo-masks at "
            f"t={record['masks_threshold']:.2f} to {options.out / 'masks'}; numbers in {options.out / 'miou.json'}"
        )
    return 0


def _options(args: argparse.Namespace) -> CamOptions:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be at least 1; drop it to process the whole split.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be at least 1; 16 is a fine start on a CPU.")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold {args.threshold} must be in [0, 1] (maps are normalised to a maximum of 1).")
    return CamOptions(
        split=args.split,
        out=args.out,
        thresholds=parse_thresholds(args.thresholds),
        scales=parse_scales(args.scales),
        flip=args.flip,
        threshold=args.threshold,
        limit=args.limit,
        masked_only=args.masked_only,
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
