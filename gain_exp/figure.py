"""Attention of several saved runs on the same images, as one PNG grid:

    python -m gain_exp.figure RUN_DIR [RUN_DIR ...] [--split NAME] [--images N] [--first I | --indices I,J,...]
                              [--names A,B,...] [--checkpoint best|last] [--class true|predicted] [--device D]
                              [--no-pred] [--out FILE.png] [--trust] [key=value ...]

Row 0 shows the images (denormalised), then one row per run with its attention map overlaid (jet over the image, as
the attention panels of gain_exp.evaluate); a column per image, captioned with its index and true class, each run's
cell captioned with the run's predicted class and probability (green when right, red when wrong; ``--no-pred`` drops
it). A row is named by ``--names``, else by the run's ``loss`` choice (with the run directory's name, or a number,
added when two are equal). The maps are the ones the evaluator scores (gain_exp.train.evaluation): the run's GAIN
explaining the true classes (``--class predicted``: the predicted ones), min-max normalised, the first map of each
image. Every run must show the same images: the split's length and the chosen images (with each run's normalisation
undone) and their true classes are compared. ``key=value`` overrides apply to every run (e.g. ``dataset.root=...``).
Beside the PNG goes ``<stem>.json``: the run directories, checkpoints, split, image indices and every cell's
predicted class and probability, so the figure can be made again. Run directories from someone else are checked
before their configs are composed (docs/trust.md); ``--trust`` skips the check.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFont

from gain_exp.output.files import CannotWrite, atomic_write, jsonable, write_json
from gain_exp.output.panels import SEPARATOR_PX, denormalise, overlay, tile_scale, to_pil, upscale
from gain_exp.runs.reload import checkpoint_record, choose_splits, load_checked, refuse_diverged
from gain_exp.runs.rundir import saved_run
from gain_exp.runs.trust import TRUST_FLAG, TRUST_HELP
from gain_exp.train.engine import build_evaluator
from gain_exp.train.evaluation import Evaluator, Maps
from gain_exp.train.experiment import Experiment

DEFAULT_IMAGES = 8
DEFAULT_OUT = Path("outputs/figures/attention.png")
EXPLAINS = ("true", "predicted")
PAD_PX = 4
RIGHT, WRONG, TEXT = (0, 128, 0), (200, 0, 0), (0, 0, 0)
NO_MAP_DIM = 0.4  # an image without a map (no class to explain) is drawn dimmed


@dataclass
class FigureRun:
    """One row of the figure: a finished run's experiment (with its weights) and the row's name."""

    name: str
    run_dir: Path
    experiment: Experiment


# ---- runs and names ----


def load_runs(
    run_dirs: Sequence[str | Path],
    names: Sequence[str] | None = None,
    checkpoint: str | None = None,
    device: str | None = "cpu",
    overrides: Sequence[str] = (),
    trust: bool = False,
) -> list[FigureRun]:
    """The runs with their weights (``checkpoint``: best, last or a file; default: the one each run tested with),
    named by ``names`` or else by ``default_names``; errors are one sentence. ``trust``: compose the runs' saved
    jobs without the trust check (runs.trust)."""
    if not run_dirs:
        raise ValueError("no run directory given; pass one or more run directories written by python -m gain_exp.run.")
    if names is not None:
        if len(names) != len(run_dirs):
            raise ValueError(
                f"--names gives {len(names)} name(s) for {len(run_dirs)} run(s); give one name per run "
                f"directory, comma-separated, in the same order."
            )
        if not all(n.strip() for n in names):
            raise ValueError("--names holds an empty name; give one non-empty name per run directory.")
    paths = [Path(d) for d in run_dirs]
    for path in paths:  # before any run is loaded
        refuse_diverged(path, checkpoint)
    experiments = [load_checked(path, checkpoint, overrides, device, trust) for path in paths]
    labels = [n.strip() for n in names] if names is not None else default_names(paths)
    return [FigureRun(label, path, exp) for label, path, exp in zip(labels, paths, experiments)]


def loss_choice(run_dir: Path) -> str | None:
    """The run's ``loss`` group choice (``gain_ext``), from summary.json or else .hydra/hydra.yaml; None if unknown."""
    try:
        return saved_run(run_dir).choices.get("loss")
    except (OSError, ValueError):  # a damaged run directory (DamagedRun) is named where its job is read
        return None


def default_names(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's loss choice (else its directory name); equal names get the run directory's name added, or their
    position among the equal ones when that does not tell them apart either."""
    names = [loss_choice(d) or d.name for d in run_dirs]
    for name in set(names):
        same = [k for k, n in enumerate(names) if n == name]
        if len(same) < 2:
            continue
        dirs = [run_dirs[k].name for k in same]
        unique = len(set(dirs)) == len(dirs) and name not in dirs
        for position, k in enumerate(same, 1):
            names[k] = f"{name} ({run_dirs[k].name})" if unique else f"{name} ({position})"
    return names


# ---- split and images ----


def split_dataset(experiment: Experiment, split: str | None) -> tuple[str, Any]:
    """(name, dataset) of ``split`` (default: the dataset's first test split); unknown names as evaluate words them."""
    chosen = choose_splits(experiment, [split] if split else None)
    return next(iter(chosen.items()))


def choose_indices(
    length: int, split: str, images: int | None = None, first: int = 0, indices: Sequence[int] | None = None
) -> list[int]:
    """The image indices: ``indices`` as given, else ``images`` (default 8, at most the split's) from ``first``."""
    span = f"{split} has images 0..{length - 1}" if length else f"{split} has no images"
    if indices is not None:
        if images is not None:
            raise ValueError("--images and --indices both choose the images; give one of them.")
        if not indices:
            raise ValueError("--indices is empty; give image indices, comma-separated (e.g. 3,17,42).")
        bad = [i for i in indices if not 0 <= i < length]
        if bad:
            raise ValueError(f"--indices: {bad[0]} is out of range; {span}.")
        return list(indices)
    images = DEFAULT_IMAGES if images is None else images
    if images < 1:
        raise ValueError(f"--images {images}: give at least 1 image.")
    if images > length:
        raise ValueError(f"--images {images}: {split} has only {length} images; give at most {length}.")
    if not 0 <= first <= length - images:
        raise ValueError(
            f"--first {first}: {images} images from there run past the end ({span}); give --first "
            f"between 0 and {length - images}."
        )
    return list(range(first, first + images))


def dataset_difference(a: Experiment, b: Experiment) -> str:
    """``dataset.root (x vs y)``: the data settings two runs differ in (the dataset node and the seed, which
    generated datasets draw from), or '' when they agree."""
    ca, cb = (
        {
            "seed": e.cfg.seed,
            **{f"dataset.{k}": v for k, v in OmegaConf.to_container(e.cfg.dataset, resolve=True).items()},
        }
        for e in (a, b)
    )
    keys = [k for k in dict.fromkeys([*ca, *cb]) if ca.get(k) != cb.get(k)]
    return ", ".join(f"{k} ({ca.get(k)} vs {cb.get(k)})" for k in keys[:3])


def check_same_images(
    runs: Sequence[FigureRun], datasets: Sequence[Any], samples: Sequence[list[dict[str, Any]]], split: str
) -> None:
    """One sentence naming the first run that does not show the first run's images: another split length, another
    image (normalisation undone) or other true classes."""
    ref, ref_samples = runs[0], samples[0]
    ref_classes = ref.experiment.data.classes
    for run, dataset, mine in zip(runs[1:], datasets[1:], samples[1:]):
        differ = dataset_difference(ref.experiment, run.experiment)
        why = f"; their configs differ in {differ}" if differ else ""
        pair = f"runs {ref.run_dir} and {run.run_dir}"
        if len(dataset) != len(datasets[0]):
            raise ValueError(
                f"{pair} do not share the {split} images ({len(datasets[0])} vs {len(dataset)}{why}); "
                f"compare runs on the same data, or pass overrides (e.g. dataset.root=...) so they match."
            )
        for a, b in zip(ref_samples, mine):
            ia = denormalise(a["image"], ref.experiment.mean, ref.experiment.std)
            ib = denormalise(b["image"], run.experiment.mean, run.experiment.std)
            if ia.shape != ib.shape or not torch.allclose(ia, ib, atol=1e-3):
                what = f"image {a['index']} of {split} differs" + (
                    f" ({'x'.join(map(str, ia.shape[1:]))} vs {'x'.join(map(str, ib.shape[1:]))} px)"
                    if ia.shape != ib.shape
                    else ""
                )
                raise ValueError(
                    f"{pair} do not show the same images ({what}{why}); compare runs on the same data, "
                    f"or pass overrides (e.g. dataset.root=...) so they match."
                )
            if _names(a["target"], ref_classes) != _names(b["target"], run.experiment.data.classes):
                raise ValueError(
                    f"{pair} label image {a['index']} of {split} differently ("
                    f"{', '.join(_names(a['target'], ref_classes))} vs "
                    f"{', '.join(_names(b['target'], run.experiment.data.classes))}{why}); compare runs "
                    f"with the same classes."
                )


def _other_split(run: FigureRun, split: str) -> Any:
    """The split of a run after the first, its errors naming the run."""
    try:
        return split_dataset(run.experiment, split)[1]
    except ValueError as err:
        raise ValueError(f"{run.run_dir}: {err}") from None


def _names(target: torch.Tensor, classes: Sequence[str]) -> list[str]:
    return [classes[c] for c in torch.as_tensor(target).nonzero().flatten().tolist()]


# ---- the maps ----


def attention_maps(
    experiment: Experiment, batch: dict[str, Any], explain: str = "true", evaluator: Evaluator | None = None
) -> Maps:
    """The run's maps for a batch exactly as its evaluator computes what it scores (``Evaluator.maps``: the run's
    memory format and autocast, eval mode), explaining the true classes (``predicted``: the predicted ones),
    min-max normalised; the first map of each image."""
    if explain not in EXPLAINS:
        raise ValueError(f"--class {explain}: choose true or predicted.")
    return (evaluator or build_evaluator(experiment)).maps(batch, true_classes=explain == "true")


def run_maps(run: FigureRun, samples: list[dict[str, Any]], explain: str) -> Maps:
    """``attention_maps`` over the chosen samples, in batches of the run's evaluation batch size."""
    from torch.utils.data import default_collate

    evaluator = build_evaluator(run.experiment)
    size = evaluator.batch_size
    parts = [
        attention_maps(run.experiment, default_collate(samples[s : s + size]), explain, evaluator)
        for s in range(0, len(samples), size)
    ]
    return Maps(
        [m for p in parts for m in p.attention],
        torch.cat([p.logits for p in parts]),
        [e for p in parts for e in p.explained],
    )


# ---- the grid ----


def attention_grid(
    runs: Sequence[FigureRun], split: str | None, indices: Sequence[int], explain: str = "true", show_pred: bool = True
) -> tuple[Image.Image, dict[str, Any]]:
    """The figure (row 0 the images, then a row per run; a column per index) and its record (JSON-ready)."""
    if not runs:
        raise ValueError("no run directory given; pass one or more run directories written by python -m gain_exp.run.")
    name, dataset = split_dataset(runs[0].experiment, split)
    datasets = [dataset, *(_other_split(run, name) for run in runs[1:])]
    indices = choose_indices(len(datasets[0]), name, indices=list(indices))
    samples = [[dataset[i] for i in indices] for dataset in datasets]
    check_same_images(runs, datasets, samples, name)
    first = runs[0].experiment
    images = [denormalise(s["image"], first.mean, first.std) for s in samples[0]]
    true = [_names(s["target"], first.data.classes) for s in samples[0]]
    rows, cells = [], []
    for run, mine in zip(runs, samples):
        maps = run_maps(run, mine, explain)
        data = run.experiment.data
        probs = maps.logits.sigmoid() if data.multi_label else maps.logits.softmax(1)
        pred = run.experiment.gain.predicted_classes(maps.logits)
        row = [
            {
                "index": i,
                "pred": _names(pred[k], data.classes),
                "prob": jsonable(float(probs[k].max())),
                "explained": [data.classes[c] for c in maps.explained[k]],
                "has_map": maps.attention[k] is not None,
            }
            for k, i in enumerate(indices)
        ]
        rows.append(maps.attention)
        cells.append(row)
    captions = (
        [
            [
                (f"pred: {', '.join(c['pred'])} ({c['prob']:.2f})", RIGHT if c["pred"] == t else WRONG)
                for c, t in zip(row, true)
            ]
            for row in cells
        ]
        if show_pred
        else None
    )
    figure, boxes = draw_grid(
        images, rows, [r.name for r in runs], [f"#{i}: {', '.join(t) or '-'}" for i, t in zip(indices, true)], captions
    )
    record = {
        "split": name,
        "indices": list(indices),
        "explains": explain,
        "images": [{"index": i, "true": t, "box": box} for i, t, box in zip(indices, true, boxes[0])],
        "runs": [_run_record(run, row, row_boxes) for run, row, row_boxes in zip(runs, cells, boxes[1:])],
        "size": list(figure.size),
    }
    return figure, record


def _run_record(run: FigureRun, cells: list[dict[str, Any]], boxes: list[list[int]]) -> dict[str, Any]:
    exp = run.experiment
    return {
        "name": run.name,
        "run_dir": str(run.run_dir.resolve()),
        "loss": loss_choice(run.run_dir),
        "checkpoint": checkpoint_record(exp.checkpoint),
        "device": str(exp.runtime.device),
        "cells": [{**cell, "box": box} for cell, box in zip(cells, boxes)],
    }


def draw_grid(
    images: Sequence[torch.Tensor],
    maps: Sequence[Sequence[torch.Tensor | None]],
    names: Sequence[str],
    columns: Sequence[str],
    captions: Sequence[Sequence[tuple[str, tuple[int, int, int]]]] | None = None,
    scale: int | None = None,
) -> tuple[Image.Image, list[list[list[int]]]]:
    """The grid and each tile's box [left, top, right, bottom] (row 0: the images, then one row per entry of
    ``maps``). Tiles are zoomed as the attention panels are (``viz.tile_scale``, nearest neighbour); ``captions``
    (text, colour) go under each map tile; column captions above the images, row names on the left."""
    size = images[0].shape[-2:]
    scale = tile_scale(size) if scale is None else scale
    tile_h, tile_w = size[0] * scale, size[1] * scale
    font = ImageFont.load_default(size=max(12, tile_h // 12))  # the attention panels' font
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 2 * PAD_PX
    label_w = max(probe.textlength(n, font=font) for n in ["image", *names]) + 2 * PAD_PX
    label_w = int(label_w) + 1
    caption_h = line_h if captions else 0
    heights = [tile_h] + [tile_h + caption_h] * len(maps)
    width = label_w + len(images) * (tile_w + SEPARATOR_PX) - SEPARATOR_PX
    height = line_h + sum(heights) + SEPARATOR_PX * (len(heights) - 1)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    boxes: list[list[list[int]]] = []
    top = line_h
    for r, height_r in enumerate(heights):
        draw.text((PAD_PX, top + tile_h / 2), "image" if r == 0 else names[r - 1], fill=TEXT, font=font, anchor="lm")
        row_boxes = []
        for c, image in enumerate(images):
            left = label_w + c * (tile_w + SEPARATOR_PX)
            if r == 0:
                draw.text((left + PAD_PX, PAD_PX), _fit(columns[c], font, tile_w), fill=TEXT, font=font)
                tile = image
            else:
                attention = maps[r - 1][c]
                tile = image * NO_MAP_DIM if attention is None else overlay(image, attention)
            sheet.paste(to_pil(upscale(tile, scale)), (left, top))
            if r > 0 and attention is None:
                draw.text((left + tile_w / 2, top + tile_h / 2), "no map", fill=(230, 230, 230), font=font, anchor="mm")
            if r > 0 and captions:
                text, colour = captions[r - 1][c]
                draw.text((left + PAD_PX, top + tile_h + PAD_PX), _fit(text, font, tile_w), fill=colour, font=font)
            row_boxes.append([left, top, left + tile_w, top + tile_h])
        boxes.append(row_boxes)
        top += height_r + SEPARATOR_PX
    return sheet, boxes


def _fit(text: str, font: Any, width: int) -> str:
    """``text``, cut with '...' until it fits ``width`` pixels less the padding."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    room = width - 2 * PAD_PX
    if probe.textlength(text, font=font) <= room:
        return text
    while text and probe.textlength(text + "...", font=font) > room:
        text = text[:-1]
    return text + "..."


# ---- files and command line ----


def write_figure(figure: Image.Image, record: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """The PNG at ``out`` and the record beside it (same stem, ``.json``), each written atomically."""
    png = _png_path(out)
    record_file = png.with_suffix(".json")
    with atomic_write(png) as f:
        figure.save(f, format="PNG")
    write_json(record_file, {**record, "png": str(png.resolve())})
    return png, record_file


def _png_path(out: str | Path) -> Path:
    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"--out {out}: give a .png file name (the record goes beside it as .json).")
    return Path(out)


def make_figure(
    run_dirs: Sequence[str | Path],
    out: str | Path = DEFAULT_OUT,
    split: str | None = None,
    images: int | None = None,
    first: int = 0,
    indices: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    checkpoint: str | None = None,
    explain: str = "true",
    device: str | None = "cpu",
    overrides: Sequence[str] = (),
    show_pred: bool = True,
    command: str | None = None,
    trust: bool = False,
) -> tuple[Path, Path, dict[str, Any]]:
    """Load the runs, pick the images, draw the grid and write it with its record (``command``: the command line
    that made it, recorded too); returns (png, json, record)."""
    if explain not in EXPLAINS:
        raise ValueError(f"--class {explain}: choose true or predicted.")
    _png_path(out)
    runs = load_runs(run_dirs, names, checkpoint, device, overrides, trust)
    name, dataset = split_dataset(runs[0].experiment, split)
    chosen = choose_indices(len(dataset), name, images, first, indices)
    figure, record = attention_grid(runs, name, chosen, explain, show_pred)
    record = {**record, "overrides": list(overrides), "command": command}
    png, record_file = write_figure(figure, record, out)
    return png, record_file, record


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--indices {text}: give image indices as integers, comma-separated (e.g. 3,17,42).") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the process exit status (2: a one-line ``error:`` on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m gain_exp.figure", description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "items",
        nargs="*",
        metavar="RUN_DIR|key=value",
        help="run directories written by python -m gain_exp.run, and overrides for all of them",
    )
    parser.add_argument("--split", default=None, help="the split to draw (default: the dataset's first test split)")
    parser.add_argument("--images", type=int, default=None, metavar="N", help=f"images (default {DEFAULT_IMAGES})")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--first", type=int, default=0, metavar="I", help="index of the first image (default 0)")
    which.add_argument("--indices", default=None, metavar="I,J,...", help="these images of the split instead")
    parser.add_argument(
        "--names", default=None, metavar="A,B,...", help="row names, one per run (default: each run's loss choice)"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        choices=("best", "last"),
        help="the weights (default: the checkpoint each run's tests used)",
    )
    parser.add_argument(
        "--class",
        dest="explain",
        default="true",
        choices=EXPLAINS,
        help="the class the maps explain (default: true, as the evaluation metrics)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--no-pred", action="store_true", help="no predicted class under the maps")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="FILE.png",
        help=f"the figure (default {DEFAULT_OUT}); the record goes beside it as .json",
    )
    parser.add_argument(TRUST_FLAG, action="store_true", help=TRUST_HELP)
    args = parser.parse_intermixed_args(argv)
    run_dirs = [i for i in args.items if "=" not in i or Path(i).is_dir()]
    overrides = [i for i in args.items if i not in run_dirs]
    command = shlex.join(["python", "-m", "gain_exp.figure", *(sys.argv[1:] if argv is None else argv)])
    try:
        indices = _int_list(args.indices) if args.indices is not None else None
        names = args.names.split(",") if args.names is not None else None
        png, record_file, record = make_figure(
            run_dirs,
            args.out,
            args.split,
            args.images,
            args.first,
            indices,
            names,
            args.checkpoint,
            args.explain,
            args.device,
            overrides,
            show_pred=not args.no_pred,
            command=command,
            trust=args.trust,
        )
    except (ValueError, FileNotFoundError, CannotWrite) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(
        f"{record['split']}: {len(record['indices'])} image(s) x {len(record['runs'])} run(s) "
        f"({', '.join(r['name'] for r in record['runs'])}) in {png}; record in {record_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
