"""CAM pseudo-masks (gain_exp/cams.py): mIoU and the seed rule on hand-made maps, the maps against a Grad-CAM oracle,
and the command end to end on the VOC fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import ROOT
from fixtures_data import make_voc, voc_has_mask, voc_palette
from PIL import Image

from gain_exp import cli
from gain_exp.cams import (
    ThresholdSweep,
    class_maps,
    confusion_matrix,
    main,
    mean_iou,
    parse_scales,
    parse_thresholds,
    plain_palette,
    pseudo_label,
)
from gain_exp.core.gain import GAIN

pytestmark = pytest.mark.usefixtures("one_thread")


def _miou(pred, gt, labels: int = 4) -> float:
    return mean_iou(confusion_matrix(torch.tensor(pred), torch.tensor(gt), labels))


# ---- mIoU ----


def test_miou_of_a_perfect_prediction_is_one():
    gt = [[0, 0, 1, 1], [2, 2, 1, 0]]
    assert _miou(gt, gt) == 1.0


def test_miou_of_a_partial_overlap_matches_the_hand_count():
    gt = [[0, 0, 0, 1, 1, 1]]
    pred = [[0, 0, 1, 1, 1, 2]]
    # background: TP 2, FN 1 -> 2/3; class 1: TP 2, FP 1, FN 1 -> 2/4; label 2 only predicted: TP 0, FP 1 -> 0;
    # label 3 occurs nowhere and does not count.
    assert _miou(pred, gt) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_ignore_pixels_do_not_count():
    gt = [[0, 0, 0, 1, 1, 1, 255, 255]]
    pred = [[0, 0, 1, 1, 1, 2, 3, 0]]  # a label (3) predicted only on ignore pixels does not count either
    assert _miou(pred, gt) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    confusion = confusion_matrix(torch.tensor(pred), torch.tensor(gt), 4)
    assert int(confusion.sum()) == 6


def test_images_pool_into_one_confusion_matrix():
    sweep = ThresholdSweep([0.5], num_labels=3)
    one_class = torch.tensor([0])
    # image 1: class 0 (label 1) everywhere predicted and true; image 2: nothing predicted, half of it label 1
    sweep.add(torch.ones(1, 1, 2), one_class, torch.tensor([[1, 1]]))
    sweep.add(torch.zeros(1, 1, 4), one_class, torch.tensor([[1, 1, 0, 0]]))
    # pooled: background TP 2, FP 2 -> 1/2; label 1 TP 2, FN 2 -> 1/2 (the per-image mean would be (1 + 1/3 ...) / 2)
    assert sweep.mious() == [pytest.approx(0.5)]


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="holds label 7 but there are only 4 labels"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[7, 0]]), 4)


# ---- the seed rule and the sweep ----


def test_pseudo_label_is_the_argmax_over_threshold_and_maps():
    cams = torch.tensor([[[0.2, 0.6, 0.4], [0.9, 0.1, 0.0]], [[0.5, 0.6, 0.3], [0.3, 0.0, 0.0]]])
    classes = torch.tensor([3, 7])  # class 3 -> label 4, class 7 -> label 8
    assert pseudo_label(cams, classes, 0.4).tolist() == [[8, 4, 0], [4, 0, 0]]  # ties: first map, then background
    assert pseudo_label(cams, classes, 0.0).tolist() == [[8, 4, 4], [4, 4, 0]]
    assert pseudo_label(cams, classes, 0.95).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert pseudo_label(torch.zeros(0, 2, 3), torch.zeros(0, dtype=torch.long), 0.1).tolist() == [[0] * 3] * 2


def test_the_sweep_picks_the_threshold_that_separates_object_and_background():
    sweep = ThresholdSweep([0.2, 0.5, 0.7], num_labels=2)
    sweep.add(torch.tensor([[[0.9, 0.6, 0.4, 0.1]]]), torch.tensor([0]), torch.tensor([[1, 1, 0, 0]]))
    # t=0.2: [1,1,1,0] -> bg 1/2, object 2/3; t=0.5: exact; t=0.7: [1,0,0,0] -> bg 2/3, object 1/2
    assert sweep.mious() == [pytest.approx(7 / 12), 1.0, pytest.approx(7 / 12)]
    assert sweep.thresholds[sweep.best()] == 0.5
    assert ThresholdSweep([0.5], 2).best() == -1  # nothing scored: no best t


def test_threshold_and_scale_arguments():
    assert parse_thresholds("0.05:0.95:0.05") == pytest.approx([0.05 * k for k in range(1, 20)])
    assert parse_thresholds("0.3,0.1") == [0.1, 0.3]
    assert parse_scales("0.5,1.0,1.5,2.0") == [0.5, 1.0, 1.5, 2.0]
    for bad in ("0.5:0.1:0.1", "0:1:0", "1.5", "x"):
        with pytest.raises(ValueError, match="--thresholds .* is not valid"):
            parse_thresholds(bad)
    with pytest.raises(ValueError, match="--scales '0,1' is not valid"):
        parse_scales("0,1")


def test_plain_palette_keeps_background_black_and_ignore_white():
    palette = plain_palette(4)
    assert palette[:3] == [0, 0, 0] and palette[-3:] == [255, 255, 255]
    assert len({tuple(palette[3 * k : 3 * k + 3]) for k in range(1, 5)}) == 4


# ---- the maps against an independent Grad-CAM ----


def _gradcam(model: torch.nn.Module, image: torch.Tensor, cls: int, size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM (Selvaraju 2017) of one class for one image, upsampled to the input and then to ``size``."""
    features = model.forward_features(image[None]).detach().requires_grad_(True)
    (grads,) = torch.autograd.grad(model.forward_head(features)[0, cls], features)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0].detach()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    return model, GAIN(model, formulation="batch", normalisation="minmax").eval()


@pytest.mark.parametrize("scales,flip", [((1.0,), False), ((1.0, 0.5, 1.5), True)])
def test_maps_are_the_normalised_sum_of_gradcam_over_scales_and_flips(net, scales, flip):
    model, gain = net
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    maps, image_index, class_index = class_maps(gain, images, targets, scales, flip)
    assert image_index.tolist() == [0, 0, 1] and class_index.tolist() == [0, 3, 2]
    peaks = maps.flatten(1).max(1).values
    assert bool((peaks > 0).any()) and all(p == pytest.approx(1.0, abs=1e-5) for p in peaks if p > 0)
    for m, b, c in zip(maps, image_index.tolist(), class_index.tolist()):
        total = torch.zeros(32, 32)
        for s in scales:
            scaled = F.interpolate(images[b : b + 1], scale_factor=s, mode="bilinear")[0] if s != 1.0 else images[b]
            total += _gradcam(model, scaled, c, (32, 32))
            if flip:
                total += _gradcam(model, scaled.flip(-1), c, (32, 32)).flip(-1)
        expected = total / (total.max() + 1e-7)
        torch.testing.assert_close(m, expected, atol=1e-5, rtol=1e-4)
    assert gain.formulation == "batch" and gain.normalisation == "minmax"  # the run's module is left as it was


def test_a_batch_gives_the_maps_of_its_images_one_by_one(net):
    _, gain = net
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 1]])
    maps, image_index, _ = class_maps(gain, images, targets, (1.0, 0.5), True)
    for b in range(3):
        alone, _, _ = class_maps(gain, images[b : b + 1], targets[b : b + 1], (1.0, 0.5), True)
        torch.testing.assert_close(maps[image_index == b], alone, atol=1e-5, rtol=1e-4)
    # a module in training mode gives the same maps (batch-norm's running statistics), untouched, and stays in training
    state = {k: v.clone() for k, v in gain.state_dict().items()}
    gain.train()
    try:
        again, _, _ = class_maps(gain, images, targets, (1.0, 0.5), True)
        assert gain.training and gain.model.training
    finally:
        gain.eval()
    torch.testing.assert_close(again, maps)
    assert all(torch.equal(v, state[k]) for k, v in gain.state_dict().items())


# ---- the command on the VOC fixture ----

N_VOC = 16


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory) -> Path:
    """One epoch of GAIN_ext with a tiny ResNet on the 32 px VOC fixture, trained by the app."""
    root = tmp_path_factory.mktemp("cams")
    make_voc(root / "voc", n=N_VOC, size=48)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [
        "backbone.name=test_resnet",
        "dataset=voc2012",
        f"dataset.root={root / 'voc'}",
        "dataset.image_size=32",
        "dataset.masks_to_use=3",
        "trainer.epochs=1",
        "trainer.batch_size=4",
        "trainer.num_panels=0",
        "trainer.device=cpu",
        "logger=json",
        f"hydra.run.dir={root / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "gain_exp.run", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def _iou_oracle(preds: list[np.ndarray], gts: list[np.ndarray], labels: int) -> float:
    """Pooled mIoU counted pixel by pixel with numpy (labels present in ground truth or prediction, 255 ignored)."""
    pred, gt = np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts])
    pred, gt = pred[gt != 255], gt[gt != 255]
    ious = []
    for c in range(labels):
        union = np.sum((pred == c) | (gt == c))
        if union:
            ious.append(np.sum((pred == c) & (gt == c)) / union)
    return float(np.mean(ious))


@pytest.mark.slow
def test_val_export_writes_voc_pseudo_masks_and_the_sweep(voc_run, tmp_path, capsys):
    from gain_exp.runs.reload import load_experiment

    out = tmp_path / "out"
    assert main([str(voc_run), "--split", "val", "--out", str(out), "--thresholds", "0.1:0.9:0.1"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "miou.json").read_text())
    val = load_experiment(voc_run).data.val
    names = [p.stem for p in val.images]
    with_mask = sum(voc_has_mask(int(n.split("_")[1])) for n in names)
    assert (record["images"], record["scored"], record["skipped_without_mask"]) == (
        len(names),
        with_mask,
        len(names) - with_mask,
    )
    assert record["thresholds"] == pytest.approx([0.1 * k for k in range(1, 10)]) and len(record["miou"]) == 9
    assert record["crf"] is False and record["scales"] == [1.0] and record["flip"] is False
    assert record["resolution"] == ["32x32"] and record["checkpoint"].endswith("best.ckpt")
    assert "split=val" in printed and "no CRF" in printed and "flip=no" in printed and "scales=1" in printed
    assert f"{with_mask} image(s) scored" in printed and printed.count("mIoU=") == 10
    best_t = record["best"]["threshold"]
    assert record["masks_threshold"] == best_t
    assert record["best"]["miou"] == max(r["miou"] for r in record["miou"])
    preds, gts = [], []
    for k, name in enumerate(names):
        png = Image.open(out / "masks" / f"{name}.png")
        assert png.mode == "P" and png.size == (32, 32) and png.getpalette()[: 3 * 21] == voc_palette()[: 3 * 21]
        label = np.array(png)
        saved = np.load(out / "cams" / f"{name}.npz")
        present = set(torch.nonzero(val.targets[k]).flatten().tolist())
        assert set(saved["classes"].tolist()) == present and saved["cams"].shape == (len(present), 32, 32)
        assert set(np.unique(label).tolist()) <= {0} | {c + 1 for c in present}
        if voc_has_mask(int(name.split("_")[1])):
            preds.append(label)
            gts.append(val[k]["seg"].numpy())
    # the PNGs written at the best t score exactly the reported best mIoU
    assert record["best"]["miou"] == pytest.approx(_iou_oracle(preds, gts, 21), abs=1e-9)


@pytest.mark.slow
def test_train_multiscale_flip_export(voc_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                str(voc_run),
                "--split",
                "train",
                "--out",
                str(out),
                "--masked-only",
                "--limit",
                "2",
                "--scales",
                "1.0,0.5,1.5",
                "--flip",
                "--threshold",
                "0.3",
                "--checkpoint",
                "last",
                "--batch-size",
                "1",
            ]
        )
        == 0
    )
    record = json.loads((out / "miou.json").read_text())
    assert (record["images"], record["scored"], record["skipped_without_mask"]) == (2, 2, 0)
    assert record["scales"] == [1.0, 0.5, 1.5] and record["flip"] is True and record["masks_threshold"] == 0.3
    assert record["checkpoint"].endswith("last.ckpt")
    assert len(list((out / "masks").glob("*.png"))) == 2
    assert "scales=1,0.5,1.5, flip=yes" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--split", "test"], "--split test: the dataset has no such split; use one of train, val."),
        (["--split", "val", "--scales", "0"], "--scales '0' is not valid"),
        (["--split", "val", "--limit", "0"], "--limit 0 must be at least 1"),
    ],
)
@pytest.mark.slow
def test_bad_arguments_are_one_sentence_and_exit_2(voc_run, tmp_path, capsys, args, phrase):
    assert main([str(voc_run), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err and err.count("\n") == 1


def test_gain_exp_cams_is_a_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["cams", str(tmp_path / "nowhere"), "--split", "val", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "is not a directory; give a run directory" in capsys.readouterr().err
