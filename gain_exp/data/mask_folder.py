"""`dataset=mask_folder`: your own images in class folders, with optional binary object masks.

Layout (train/ and val/ required, test/ optional; one folder per class, the same names in every split):

    <root>/train/<class_name>/<image>.<ext>
    <root>/train/<class_name>/<image>_mask.png     optional mask of <image>.<ext> (the primary convention)
    <root>/val/<class_name>/...
    <root>/test/<class_name>/...

The seed's convention `<image>m.<ext>` (same extension as the image) is accepted too. A mask is a
single-channel image of the image's size holding only 0 (background) and 255 (object), only 0
and 1, or (16-bit) only 0 and 65535; JPEG masks are thresholded at 128 because compression blurs
those values. Images of any PIL mode (16-bit, float, palette, alpha, CMYK) are read as 8-bit RGB by
the rules in `images.py`. Object pixels get
the image's class (label map value c + 1). Classes are the sorted train folder names, and val/ and test/ must hold
the same class folders (a missing or extra one stops the build with one sentence naming the split and classes); a
class whose files in val/ or test/ were all skipped as unreadable is warned once and listed in
extras["classes_without_images"] = {split: [names]} (its per-class metrics there are NaN or left out). With
`negative_class` (e.g. "negative") that folder holds images without objects (their masks are not
read) and its index is DataSplits.negative_class, so the AM loss can run on positives only. annotation=box is refused
in one sentence: the layout has pixel masks but no boxes.

File errors, checked when the splits are built (every image and mask is decoded once): an unreadable file
(missing, not an image, truncated) is skipped with a warning and counted in extras["skipped_files"] unless
strict=true, which raises instead; an unreadable mask costs only the mask (its image stays, without one).
A readable file with wrong content (a mask of the wrong size, with other values or several channels) raises,
strict or not: it is a data error to fix, not noise to skip. A mask that fails later, while loading (its file
changed under the run), is counted too and its sample returned without a mask (has_mask and use_mask False),
never replaced by another sample; an image that fails while loading raises, because any stand-in would be
another image scored twice.

This module also holds the file-backed dataset, the per-file error policy, the mask budget and the
balanced sampler that `voc.py` reuses.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Sampler

from gain_exp.data.base import (
    IGNORE_INDEX,
    DataSplits,
    Sample,
    annotation_extras,
    check_annotation,
    choose_masks,
    classes_without_images,
    derive_seed,
    describe_classes_without_images,
    no_folder,
)
from gain_exp.data.images import MAX_PIXELS, UnreadableFile, check_image, load_rgb, mask_array
from gain_exp.data.transforms import ImageMaskTransform, build_transforms

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"  # <stem>_mask.<ext>: the primary mask naming
SEED_MASK_SUFFIX = "m"  # <stem>m.<ext>: the seed's mask naming
JPEG_MASK_THRESHOLD = 128
LAYOUT = "<root>/{train,val,test}/<class_name>/<image> (test optional)"

MaskReader = Callable[..., torch.Tensor]  # (mask file, sample target, max_pixels=...) -> H x W uint8 label map


class BadFiles:
    """Unreadable files: raised when strict, otherwise warned once each and counted in ``extras["skipped_files"]``.

    ``extras`` is the very dict that becomes DataSplits.extras, so files skipped while loading (after the build)
    are counted there too, live; with DataLoader workers (trainer.workers > 0) those load-time skips happen in
    the worker processes, so they are warned but not counted in the main process's extras.
    """

    def __init__(
        self, dataset: str, strict: bool, extras: dict | None = None, max_pixels: int | None = MAX_PIXELS
    ) -> None:
        self.dataset = dataset
        self.strict = strict
        if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels < 1):
            raise ValueError(
                f"{dataset}: max_pixels={max_pixels} must be a pixel count of 1 or more, or null (no limit)."
            )
        self.max_pixels = max_pixels  # dataset.max_pixels: a larger file (a decompression bomb) is unreadable
        self.extras = {} if extras is None else extras
        self.extras["skipped_files"] = 0
        self._files: set[Path] = set()

    @property
    def count(self) -> int:
        """Distinct files skipped so far."""
        return len(self._files)

    def report(self, error: Exception, path: Path) -> None:
        """Raise `error` (strict) or count `path` as skipped and warn the first time it is seen."""
        if self.strict:
            raise error
        if path in self._files:
            return
        self._files.add(path)
        self.extras["skipped_files"] = self.count
        sentence = str(error).removeprefix(f"{self.dataset}: ")  # the dataset's own errors name it already
        log.warning(
            "%s: skipped: %s (%d file(s) skipped so far; set strict=true to stop at the first bad file)",
            self.dataset,
            sentence,
            self.count,
        )


SKIPPABLE = (UnreadableFile, FileNotFoundError)  # unreadable files; a readable file with wrong content stops the run


def check_files(
    images: Sequence[Path],
    masks: Sequence[Path | None],
    targets: torch.Tensor,
    read_mask: MaskReader,
    bad_files: BadFiles,
) -> tuple[list[int], list[Path | None]]:
    """(indices of the decodable images, their masks or None where the mask is unreadable); wrong masks raise.

    Every image and mask is decoded once here, so unreadable files are skipped (and counted) before training,
    never in the middle of an epoch, and a mask of the wrong size or values stops the run before it starts.
    """
    keep: list[int] = []
    kept_masks: list[Path | None] = []
    for i, (image, mask) in enumerate(zip(images, masks)):
        try:
            width, height = check_image(image, bad_files.max_pixels)
        except SKIPPABLE as e:
            bad_files.report(e, image)
            continue
        if mask is not None:
            try:
                seg = read_mask(mask, targets[i], max_pixels=bad_files.max_pixels)
            except SKIPPABLE as e:
                bad_files.report(e, mask)  # the image stays, without a mask, so the split keeps every image
                mask = None
            else:
                check_mask_size(seg, mask, image, (width, height))
        keep.append(i)
        kept_masks.append(mask)
    return keep, kept_masks


def check_mask_size(seg: torch.Tensor, mask: Path, image: Path, size: tuple[int, int]) -> None:
    """ValueError naming both files unless the label map is the image's (width, height)."""
    if tuple(seg.shape) != (size[1], size[0]):
        raise ValueError(
            f"mask {mask} is {seg.shape[1]}x{seg.shape[0]} but its image {image} is {size[0]}x{size[1]};"
            " save the mask at the image's size."
        )


def file_split(
    images: Sequence[Path],
    masks: Sequence[Path | None],
    targets: torch.Tensor,
    read_mask: MaskReader,
    transform: ImageMaskTransform,
    bad_files: BadFiles,
    masks_to_use: int | float | None,
    seed: int,
    dataset: str,
    empty_error: str,
) -> FileDataset:
    """One split of files as a FileDataset: unreadable images dropped (``empty_error`` if none is left), unreadable
    masks dropped from their images and, when ``masks_to_use`` is given (the training split), the L_e mask budget
    drawn from the samples that have masks."""
    keep, kept_masks = check_files(images, masks, targets, read_mask, bad_files)
    if not keep:
        raise ValueError(empty_error)
    has_mask = torch.tensor([m is not None for m in kept_masks], dtype=torch.bool)
    use_mask = (
        choose_masks(has_mask, masks_to_use, seed, dataset)
        if masks_to_use is not None
        else torch.zeros(len(keep), dtype=torch.bool)
    )
    return FileDataset([images[i] for i in keep], kept_masks, targets[keep], use_mask, read_mask, transform, bad_files)


class FileDataset(Dataset):
    """One split of image files with optional mask files; decodes and transforms on access."""

    def __init__(
        self,
        images: list[Path],
        masks: list[Path | None],
        targets: torch.Tensor,
        use_mask: torch.Tensor,
        read_mask: MaskReader,
        transform: ImageMaskTransform,
        bad_files: BadFiles,
    ) -> None:
        self.images = images
        self.masks = masks
        self.targets = targets  # N x K float
        self.use_mask = use_mask  # N bool
        self.read_mask = read_mask
        self.transform = transform
        self.bad_files = bad_files
        self._mask_failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        # The build decoded every file, so a failure here means a file changed under the run. An image has no
        # honest stand-in (another image would be scored twice), so its error propagates; a mask that fails is
        # reported (raised when strict) and the sample goes on without it, keeping the split's images exact.
        image = load_rgb(self.images[i], self.bad_files.max_pixels)
        seg = self._read_mask(i, image)
        x, seg_out = self.transform(image, seg)
        return Sample(
            image=x,
            target=self.targets[i].clone(),
            seg=seg_out,
            has_mask=torch.tensor(seg is not None),
            use_mask=self.use_mask[i] & (seg is not None),
            index=i,
        )

    def _read_mask(self, i: int, image: PIL.Image.Image) -> torch.Tensor | None:
        mask_path = self.masks[i]
        if mask_path is None or i in self._mask_failed:
            return None
        try:
            seg = self.read_mask(mask_path, self.targets[i], max_pixels=self.bad_files.max_pixels)
            check_mask_size(seg, mask_path, self.images[i], image.size)
        except (ValueError, FileNotFoundError) as e:
            self.bad_files.report(e, mask_path)  # raises when strict
            self._mask_failed.add(i)
            return None
        return seg


class BalancedSampler(Sampler[int]):
    """Seeded stream of train indices, reshuffled every epoch; with pos_share, each batch holds that share of positives.

    Without pos_share it concatenates random permutations of the split (the natural class mix). With
    pos_share, every block of batch_size indices holds floor(pos_share * batch_size) positives plus one
    more with probability equal to the remainder (so the expected share is exact even at batch size 1),
    positives spread evenly over the positive classes, and the rest drawn from the negative class;
    images are drawn with replacement within their class.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        batch_size: int,
        num_samples: int,
        seed: int,
        negative_class: int | None = None,
        pos_share: float | None = None,
    ) -> None:
        self.labels = labels
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.seed = seed
        self.negative_class = negative_class
        self.pos_share = pos_share
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at this epoch's order (e.g. after resuming from a checkpoint)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, f"sampler:{self.epoch}"))
        self.epoch += 1
        if self.pos_share is None:
            n = len(self.labels)
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(self.num_samples / n))])
        else:
            order = self._balanced_order(gen)
        return iter(order[: self.num_samples].tolist())

    def _balanced_order(self, gen: torch.Generator) -> torch.Tensor:
        blocks, b = math.ceil(self.num_samples / self.batch_size), self.batch_size
        expected = self.pos_share * b
        n_pos = math.floor(expected) + (torch.rand(blocks, generator=gen) < expected - math.floor(expected)).long()
        is_pos = torch.arange(b).unsqueeze(0) < n_pos.unsqueeze(1)  # blocks x b, positives first
        pos_classes = [c for c in self.labels.unique().tolist() if c != self.negative_class]
        slot_class = torch.full((blocks, b), self.negative_class, dtype=torch.long)
        slot_class[is_pos] = torch.tensor(pos_classes)[
            torch.randint(len(pos_classes), (int(is_pos.sum()),), generator=gen)
        ]
        order = torch.empty(blocks, b, dtype=torch.long)
        for c in slot_class.unique().tolist():
            members = torch.nonzero(self.labels == c).flatten()
            sel = slot_class == c
            order[sel] = members[torch.randint(len(members), (int(sel.sum()),), generator=gen)]
        # Shuffle inside each block so positives are not always first in the batch.
        shuffle = torch.argsort(torch.rand(blocks, b, generator=gen), dim=1)
        return torch.gather(order, 1, shuffle).flatten()


BINARY_OBJECT_VALUES = (1, 255, 65535)  # a binary mask holds 0 and one of these (65535: a 16-bit mask)


def read_binary_mask(path: Path, target: torch.Tensor, max_pixels: int | None = MAX_PIXELS) -> torch.Tensor:
    """H x W uint8 label map from a binary mask: object pixels -> the image's class + 1, the rest 0."""
    arr, fmt = mask_array(
        path,
        "save it as a single-channel (greyscale) PNG holding 0 for background and 255 (or 1) for the object.",
        max_pixels=max_pixels,
    )
    if fmt == "JPEG":
        obj = arr >= JPEG_MASK_THRESHOLD
    else:
        values = set(np.unique(arr).tolist())
        on = next((v for v in BINARY_OBJECT_VALUES if values <= {0, v}), None)
        if on is None:
            shown = sorted(values)[:6]
            raise ValueError(
                f"mask {path} holds values {shown}{'...' if len(values) > 6 else ''}; a binary mask may hold"
                " only 0 and 255 (or only 0 and 1, or 0 and 65535 in 16 bits), re-save it with those values."
            )
        obj = arr == on
    label = int(target.argmax()) + 1
    return torch.from_numpy(obj.astype(np.uint8) * label)


def _split_dir(root: Path, split: str, required: bool) -> Path | None:
    path = root / split
    if path.is_dir():
        return path
    if required:
        raise FileNotFoundError(f"mask_folder dataset: split folder {path} does not exist; lay out images as {LAYOUT}.")
    return None


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_class(folder: Path, extensions: tuple[str, ...]) -> tuple[list[Path], list[Path | None]]:
    """Images of one class folder, each with its mask file or None."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    by_name = {p.name: p for p in files}
    # Mask naming is matched exactly (not by "contains m", as the seed did), so image names are free.
    candidates = [p for p in files if not p.stem.endswith(MASK_SUFFIX)]
    seed_masks: set[str] = set()
    pairs: list[tuple[Path, Path | None]] = []
    for p in candidates:
        if p.name in seed_masks:
            continue
        mask = next((by_name[n] for n in _mask_names(p, extensions) if n in by_name), None)
        if mask is not None and mask.name == f"{p.stem}{SEED_MASK_SUFFIX}{p.suffix}":
            seed_masks.add(mask.name)
        pairs.append((p, mask))
    if not pairs:
        raise ValueError(
            f"mask_folder dataset: no images ({', '.join(extensions)}) in {folder}; add images, or remove the class"
            " from every split."
        )
    return [p for p, _ in pairs], [m for _, m in pairs]


def _mask_names(image: Path, extensions: tuple[str, ...]) -> list[str]:
    """Mask file names to look for, in order of preference."""
    exts = sorted(extensions, key=lambda e: e != ".png")  # a lossless PNG mask wins over others
    return [f"{image.stem}{MASK_SUFFIX}{e}" for e in exts] + [f"{image.stem}{SEED_MASK_SUFFIX}{image.suffix}"]


def _check_same_classes(root: Path, split: str, split_dir: Path, classes: list[str]) -> None:
    """ValueError naming the root, the split and the classes unless its class folders are train's."""
    names = {p.name for p in _class_dirs(split_dir)}
    missing = [c for c in classes if c not in names]
    extra = sorted(names - set(classes))
    if not (missing or extra):
        return
    parts = ([f"has no folder for {_quoted(missing)}, which train/ has"] if missing else []) + (
        [f"has {_quoted(extra)}, which train/ lacks"] if extra else []
    )
    them = "it" if len(missing + extra) == 1 else "them"
    raise ValueError(
        f"mask_folder dataset: the {split} split of {root} {', and '.join(parts)}; every split needs the same class"
        f" folders, each with images, so add images of {them} to every split that lacks {them} (an empty folder is"
        f" not enough) or remove {them} from every split."
    )


def _quoted(names: list[str]) -> str:
    return ("class " if len(names) == 1 else "classes ") + ", ".join(repr(n) for n in names)


def _scan_split(
    split_dir: Path,
    classes: list[str],
    negative_class: str | None,
    extensions: tuple[str, ...],
) -> tuple[list[Path], list[Path | None], list[int]]:
    images: list[Path] = []
    masks: list[Path | None] = []
    labels: list[int] = []
    for folder in _class_dirs(split_dir):
        imgs, msks = _scan_class(folder, extensions)
        if folder.name == negative_class and any(m is not None for m in msks):
            log.warning(
                "mask_folder: ignoring %d mask file(s) in the negative class folder %s (negative images have no objects)",
                sum(m is not None for m in msks),
                folder,
            )
            msks = [None] * len(imgs)
        images += imgs
        masks += msks
        labels += [classes.index(folder.name)] * len(imgs)
    if not images:
        raise ValueError(f"mask_folder dataset: no class folders in {split_dir}; lay out images as {LAYOUT}.")
    return images, masks, labels


def build(
    root: str,
    image_size: int = 224,
    negative_class: str | None = None,
    masks_to_use: int | float = 1.0,
    batch_pos_dist: float | None = None,
    steps_per_epoch: int | None = None,
    autoaugment: bool = True,
    hflip: bool = True,
    strict: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    extensions: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp"),
    annotation: str = "mask",
    box_enlarge: float = 0.0,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    seed: int = 0,
    batch_size: int = 1,
) -> DataSplits:
    """Build train/val(/test) splits from class folders of images with optional binary masks (a DatasetBuilder)."""
    check_annotation(annotation, box_enlarge, "mask_folder dataset", boxes=None)  # pixel masks only: box is refused
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(
            f"mask_folder dataset: root folder {root_path} {no_folder(root_path)}; point root at a folder laid out as {LAYOUT}."
        )
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    train_dir = _split_dir(root_path, "train", required=True)
    classes = [p.name for p in _class_dirs(train_dir)]
    if len(classes) < 2:
        raise ValueError(
            f"mask_folder dataset: {train_dir} has {len(classes)} class folder(s); a classifier needs at least 2"
            " (for a binary task add a negative class folder and set negative_class)."
        )
    if len(classes) >= IGNORE_INDEX:
        raise ValueError(f"mask_folder dataset: {train_dir} has {len(classes)} classes; at most 254 fit the label map.")
    if negative_class is not None and negative_class not in classes:
        raise ValueError(
            f"mask_folder dataset: negative_class={negative_class!r} is not a class folder of {train_dir}"
            f" (found {classes}); create that folder or fix the name."
        )
    if batch_pos_dist is not None and (negative_class is None or not 0.0 <= batch_pos_dist <= 1.0):
        raise ValueError(
            f"mask_folder dataset: batch_pos_dist={batch_pos_dist} needs negative_class set and a value in [0, 1]"
            " (it is the share of positives per batch); set both or drop batch_pos_dist."
        )
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"mask_folder dataset: steps_per_epoch={steps_per_epoch} must be 1 or more (or null).")

    extras: dict = {}
    bad_files = BadFiles("mask_folder dataset", strict, extras, max_pixels)
    neg_idx = classes.index(negative_class) if negative_class is not None else None
    dirs = {
        "train": train_dir,
        "val": _split_dir(root_path, "val", required=True),
        "test": _split_dir(root_path, "test", required=False),
    }
    scanned = {}  # every split listed (class sets compared) before any file is decoded
    for split, split_dir in dirs.items():
        if split_dir is not None:
            if split != "train":
                _check_same_classes(root_path, split, split_dir, classes)
            scanned[split] = _scan_split(split_dir, classes, negative_class, exts)
    datasets: dict[str, FileDataset] = {}
    for split, (images, masks, labels) in scanned.items():
        split_dir = dirs[split]
        datasets[split] = file_split(
            images,
            masks,
            torch.nn.functional.one_hot(torch.tensor(labels, dtype=torch.long), len(classes)).float(),
            read_binary_mask,
            build_transforms(split == "train", image_size, mean, std, autoaugment, hflip),
            bad_files,
            masks_to_use if split == "train" else None,
            seed,
            "mask_folder dataset",
            f"mask_folder dataset: no readable image in {split_dir}; fix the files named in the warnings above.",
        )

    train = datasets["train"]
    extras["num_masked_train"] = int(train.use_mask.sum())
    extras["annotation"] = annotation_extras(annotation)
    empty = classes_without_images(classes, train.targets, {s: d.targets for s, d in datasets.items() if s != "train"})
    if empty:  # every folder had images, but all of a class's were unreadable (skipped)
        log.warning(
            "mask_folder dataset: some classes of train have no image in another split of %s (%s), because"
            " all their files there were skipped as unreadable, so their per-class metrics on that split are"
            " NaN or left out; fix the files named above.",
            root_path,
            describe_classes_without_images(empty),
        )
        extras["classes_without_images"] = empty
    sampler = None
    if batch_pos_dist is not None or steps_per_epoch is not None:
        num_samples = steps_per_epoch * batch_size if steps_per_epoch is not None else len(train)
        sampler = BalancedSampler(
            train.targets.argmax(1),
            batch_size,
            num_samples,
            seed,
            neg_idx,
            batch_pos_dist,
        )
    return DataSplits(
        train=train,
        val=datasets["val"],
        tests={"test": datasets["test"]} if "test" in datasets else {},
        classes=classes,
        multi_label=False,
        negative_class=neg_idx,
        train_sampler=sampler,
        extras=extras,  # the dict bad_files counts into, so load-time skips show up in it
    )
