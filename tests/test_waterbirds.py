"""Waterbirds (gain_exp/data/waterbirds.py) on a small generated copy of the released layout: metadata.csv with
CUB-like paths, CUB segmentations, and CUB_200_2011's images.txt + bounding_boxes.txt with ids unlike img_id."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose
from fixtures_data import (
    make_waterbirds,
    wb_bird,
    wb_box,
    wb_label,
    wb_place,
    wb_rel,
    wb_split,
)
from PIL import Image

from gain_exp.data.base import box_masks
from gain_exp.data.waterbirds import _box_entry, build
from gain_exp.run import train

N, SIZE = 24, 40
GROUPS = ["landbird_on_land", "landbird_on_water", "waterbird_on_land", "waterbird_on_water"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def wb(tmp_path_factory) -> tuple[Path, Path, Path]:
    return make_waterbirds(tmp_path_factory.mktemp("wb"), n=N, size=SIZE)


def _build(paths, **kw):
    root, seg, cub = paths
    return build(str(root), str(seg), **{"cub_root": str(cub), "image_size": SIZE, "masks_to_use": 1.0, **kw})


def _number(ds, k: int) -> int:
    """Fixture image number of sample k (the file stem's second number is i + 1)."""
    return int(ds.images[k].stem.split("_")[-2]) - 1


def test_splits_classes_groups_and_sample_contract(wb):
    data = _build(wb)
    assert data.classes == ["landbird", "waterbird"] and data.multi_label is False
    assert data.negative_class is None and data.groups == GROUPS
    assert data.group_classes == [(0, 0), (0, 1), (1, 0), (1, 1)]  # land stands for landbirds, water for waterbirds
    assert set(data.tests) == {"test"} and data.tests["test"] is not data.val
    for split, ds in (("train", data.train), ("val", data.val), ("test", data.tests["test"])):
        assert len(ds) == N // 3
        for k in range(len(ds)):
            i = _number(ds, k)
            assert ("train", "val", "test")[wb_split(i)] == split and ds.images[k].as_posix().endswith(wb_rel(i))
            s = ds[k]
            assert int(s["target"].argmax()) == wb_label(i) and s["target"].sum() == 1
            assert int(s["group"]) == 2 * wb_label(i) + wb_place(i)
            assert s["image"].shape == (3, SIZE, SIZE) and s["seg"].shape == (SIZE, SIZE)
            assert bool(s["has_mask"]) and torch.equal(s["spurious"], s["seg"] == 0)
    assert data.extras["group_counts"]["val"] == dict.fromkeys(GROUPS, 2)  # the fixture's val is balanced
    assert data.extras["annotation"] == {"train": "mask", "scored_against": "mask"}


def test_masks_are_cub_segmentations_thresholded_at_half(wb):
    data = _build(wb)
    for ds in (data.train, data.val, data.tests["test"]):
        for k in range(len(ds)):
            i = _number(ds, k)
            expected = torch.from_numpy(wb_bird(i, SIZE).astype(np.int64)) * (wb_label(i) + 1)
            assert torch.equal(ds[k]["seg"], expected), i  # the soft rim (102 < 128) is background


def test_mask_budget_is_drawn_from_train(wb):
    data = _build(wb, masks_to_use=3)
    assert data.extras["num_masked_train"] == 3 and int(data.train.use_mask.sum()) == 3
    assert not data.val.use_mask.any() and not data.tests["test"].use_mask.any()


def test_box_annotation_uses_the_cub_box_matched_by_path_and_val_test_keep_masks(wb):
    masks, boxes = _build(wb), _build(wb, annotation="box", box_enlarge=0.1)
    assert boxes.extras["annotation"] == {"train": "box", "scored_against": "mask"}
    assert boxes.extras["num_masked_train"] == N // 3 and boxes.extras["train_images_without_box"] == 0
    for k in range(len(boxes.train)):
        i = _number(boxes.train, k)
        x0, y0, x1, y1 = wb_box(i, SIZE)
        expected = box_masks([[x0, y0, x1, y1]], [wb_label(i)], (SIZE, SIZE), enlarge=0.1).long()
        assert torch.equal(boxes.train[k]["seg"], expected), i  # CUB ids differ from img_id: matched by path
        assert (expected > 0).sum() > (masks.train[k]["seg"] > 0).sum()  # the box holds the ellipse and more
    for split in ("val", "test"):
        a = masks.val if split == "val" else masks.tests["test"]
        b = boxes.val if split == "val" else boxes.tests["test"]
        assert all(torch.equal(a[k]["seg"], b[k]["seg"]) for k in range(len(a)))


def test_a_box_is_scaled_by_the_waterbirds_to_cub_size_ratio(tmp_path):
    image, seg = tmp_path / "bird.jpg", tmp_path / "bird.png"
    Image.new("RGB", (40, 30)).save(image)
    Image.new("L", (80, 60)).save(seg)  # the CUB original was twice as large
    entry = _box_entry("a/bird.jpg", 1, (10.0, 20.0, 30.0, 16.0), image, seg, tmp_path)
    assert entry.size == (40, 30) and entry.classes.tolist() == [1]
    assert entry.boxes.tolist() == [[5.0, 10.0, 20.0, 18.0]]
    same = _box_entry("a/bird.jpg", 0, (10.0, 20.0, 30.0, 16.0), image, None, tmp_path)  # no PNG, no CUB image
    assert same.boxes.tolist() == [[10.0, 20.0, 40.0, 36.0]]  # the released images keep the CUB size


def _one_sentence(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message and message.endswith(".") and message.count("; ") <= 2, message
    for part in parts:
        assert part in message, (part, message)


def test_missing_inputs_are_one_sentence_naming_the_path_and_the_download(wb, tmp_path):
    root, seg, cub = wb
    with pytest.raises(FileNotFoundError) as err:
        build(str(tmp_path / "nowhere"), str(seg))
    _one_sentence(err, str(tmp_path / "nowhere"), "waterbird_complete95_forest2water2.tar.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        build(str(empty), str(seg))
    _one_sentence(err, str(empty / "metadata.csv"), "does not exist", "group_DRO", "dataset.root")
    with pytest.raises(FileNotFoundError) as err:
        build(str(root), str(tmp_path / "segs"))
    _one_sentence(err, f"segmentations folder {tmp_path / 'segs'} does not exist", "segmentations.tgz", "Caltech")
    with pytest.raises(FileNotFoundError) as err:
        build(str(root), str(seg), cub_root=str(tmp_path / "cub"), annotation="box")
    _one_sentence(err, str(tmp_path / "cub"), "CUB_200_2011.tgz", "dataset.cub_root")
    with pytest.raises(ValueError) as err:
        build(str(root), str(seg), annotation="box")
    _one_sentence(err, "annotation=box reads CUB's bounding boxes from dataset.cub_root, which is not set")
    assert build(str(root), str(seg), image_size=SIZE).extras["annotation"]["train"] == "mask"  # mask: no cub_root


def test_a_missing_box_file_or_a_bad_metadata_row_is_one_sentence(wb, tmp_path):
    root, seg, cub = wb
    bare = tmp_path / "CUB_200_2011"
    bare.mkdir()
    (bare / "images.txt").write_text((cub / "images.txt").read_text())
    with pytest.raises(FileNotFoundError) as err:
        build(str(root), str(seg), cub_root=str(bare), annotation="box")
    _one_sentence(err, str(bare / "bounding_boxes.txt"), "CUB_200_2011.tgz")
    bad = tmp_path / "wb"
    bad.mkdir()
    rows = list(csv.reader((root / "metadata.csv").read_text().splitlines()))
    rows[3][rows[0].index("split")] = "7"  # line 4: the third image
    (bad / "metadata.csv").write_text("".join(",".join(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as err:
        build(str(bad), str(seg))
    _one_sentence(err, f"line 4 of {bad / 'metadata.csv'}")


def test_an_image_without_segmentation_has_no_mask_and_no_spurious_region(wb, tmp_path, caplog):
    root, seg, cub = wb
    copy = tmp_path / "segs"
    for png in seg.rglob("*.png"):
        (copy / png.relative_to(seg)).parent.mkdir(parents=True, exist_ok=True)
        (copy / png.relative_to(seg)).write_bytes(png.read_bytes())
    gone = next(i for i in range(N) if wb_split(i) == 1)
    (copy / wb_rel(gone)).with_suffix(".png").unlink()
    data = build(str(root), str(copy), image_size=SIZE)
    k = [_number(data.val, j) for j in range(len(data.val))].index(gone)
    s = data.val[k]
    assert not s["has_mask"] and not s["seg"].any() and not s["spurious"].any()
    assert data.extras["images_without_segmentation"] == 1 and "1 image(s) have no segmentation PNG" in caplog.text


COMMON = [
    "dataset=waterbirds",
    "backbone.name=test_resnet",
    "dataset.image_size=32",
    "dataset.masks_to_use=1.0",
    "trainer.epochs=1",
    "trainer.batch_size=4",
    "trainer.num_panels=2",
    "trainer.monitor=val/worst_group_acc",
    "logger=json",
    "loss=gain_ext",
    "loss.am_start_epoch=0",
]


@pytest.mark.parametrize("annotation", ["mask", "box"])
def test_trains_one_epoch_and_reports_groups(wb, tmp_path, annotation):
    root, seg, cub = wb
    overrides = [f"dataset.root={root}", f"dataset.segmentations={seg}", f"dataset.cub_root={cub}"]
    summary = train(compose([*COMMON, *overrides, f"dataset.annotation={annotation}"]), out_dir=tmp_path / "run")
    final = summary["final"]
    assert summary["status"] == "completed" and summary["best"]["metric"] == "val/worst_group_acc"
    assert summary["data"]["annotation"] == {"train": annotation, "scored_against": "mask"}
    for split in ("val", "test"):
        accs = [final[f"{split}/group_acc/{g}"] for g in GROUPS]
        assert final[f"{split}/worst_group_acc"] == pytest.approx(min(accs))
        assert sum(final[f"{split}/group_n/{g}"] for g in GROUPS) == N // 3
        off = final[f"{split}/group_n/landbird_on_water"] + final[f"{split}/group_n/waterbird_on_land"]
        assert final[f"{split}/cue_conflict_n"] == off  # land stands for landbirds, water for waterbirds
        assert isinstance(final[f"{split}/loc_iou"], float) and isinstance(final[f"{split}/spurious_energy"], float)
