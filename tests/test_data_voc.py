"""Tests for the PASCAL VOC 2012 dataset (gain_exp/data/voc.py) on a small on-disk devkit."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import compose
from fixtures_data import (
    VOC_CLASSES,
    make_voc,
    save_voc_mask,
    voc_has_mask,
    voc_id,
    voc_label_map,
    voc_labels,
    voc_objects,
    voc_split,
)
from PIL import Image

from gain_exp.data.voc import build

N, SIZE = 24, 48


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_voc(tmp_path_factory.mktemp("voc"), n=N, size=SIZE)


@pytest.fixture()
def fresh_voc(tmp_path) -> Path:
    """A private copy for tests that damage files."""
    return make_voc(tmp_path / "voc", n=N, size=SIZE)


def _build(root: Path, **kwargs):
    return build(root=str(root), **{"image_size": SIZE, "masks_to_use": 3, **kwargs})


def _number(ds, k: int) -> int:
    """Fixture image number of sample k."""
    return int(ds.images[k].stem.split("_")[1])


def _voc_dir(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def test_splits_labels_and_sample_contract(voc_root):
    splits = _build(voc_root)
    assert splits.classes == list(VOC_CLASSES) and splits.multi_label is True
    assert splits.negative_class is None and splits.train_sampler is None
    assert splits.tests == {"val": splits.val}
    # Images 22 (train) and 23 (val) hold only a difficult object: dropped.
    assert len(splits.train) == N // 2 - 1 and len(splits.val) == N // 2 - 1
    assert splits.extras["dropped_only_difficult"] == 2
    for split, ds in (("train", splits.train), ("val", splits.val)):
        for k in range(len(ds)):
            i = _number(ds, k)
            assert voc_split(i) == split
            s = ds[k]
            expected = {VOC_CLASSES.index(c) for c in voc_labels(i, N, SIZE)}
            assert set(torch.nonzero(s["target"]).flatten().tolist()) == expected
            assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
            assert s["target"].dtype == torch.float32 and s["target"].shape == (20,)
            assert s["seg"].shape == (SIZE, SIZE) and s["seg"].dtype == torch.long
            assert s["has_mask"].dtype == torch.bool and s["has_mask"].item() == voc_has_mask(i)
            assert s["index"] == k
            if not voc_has_mask(i):
                assert not s["seg"].any()


def test_train_classes_without_a_val_image_are_warned_once_and_recorded(voc_root, caplog):
    # the fixture's val images (odd numbers) never show some classes its train images do
    labels = {
        split: set().union(*(voc_labels(i, N, SIZE) for i in range(N) if voc_split(i) == split))
        for split in ("train", "val")
    }
    lacking = [c for c in VOC_CLASSES if c in labels["train"] and c not in labels["val"]]
    assert lacking  # the fixture has such classes
    with caplog.at_level(logging.WARNING):
        splits = _build(voc_root)
    assert splits.extras["classes_without_images"] == {"val": lacking}  # the dict summary.json["data"] holds
    [warning] = [r.getMessage() for r in caplog.records if "no image in another split" in r.getMessage()]
    assert f"(val: {', '.join(lacking)})" in warning and "NaN or left out" in warning


def test_difficult_objects_count_when_not_excluded(voc_root):
    splits = _build(voc_root, exclude_difficult=False)
    assert len(splits.train) == N // 2 and splits.extras["dropped_only_difficult"] == 0
    labelled_difficult = 0
    for k in range(len(splits.train)):
        i = _number(splits.train, k)
        names = voc_labels(i, N, SIZE, exclude_difficult=False)
        labelled_difficult += names != voc_labels(i, N, SIZE)
        assert {splits.classes[c] for c in torch.nonzero(splits.train.targets[k]).flatten().tolist()} == names
    assert labelled_difficult > 0


def test_val_masks_are_the_segmentation_pngs(voc_root):
    val = _build(voc_root).val
    checked = 0
    for k in range(len(val)):
        i = _number(val, k)
        s = val[k]
        assert not s["use_mask"]
        if voc_has_mask(i):
            # Eval resizes to image_size; at the file's own size the label map comes back unchanged.
            assert torch.equal(s["seg"], torch.from_numpy(voc_label_map(i, N, SIZE)).long())
            assert 255 in s["seg"]
            checked += 1
    assert checked == 6


def test_train_masks_keep_labels_under_augmentation(voc_root):
    train = _build(voc_root, image_size=32).train
    for k in range(len(train)):
        i = _number(train, k)
        if voc_has_mask(i):
            allowed = {0, 255} | {VOC_CLASSES.index(c) + 1 for c, d, _ in voc_objects(i, N, SIZE) if not d}
            for seed in range(3):
                torch.manual_seed(seed)
                s = train[k]
                assert s["seg"].shape == (32, 32)
                assert set(s["seg"].unique().tolist()) <= allowed
                assert (s["seg"] > 0).any() and (s["seg"] != 255).any()


def test_mask_budget_is_seeded_and_nested(voc_root):
    def chosen(**kw):
        train = _build(voc_root, **kw).train
        assert not (train.use_mask & ~torch.tensor([m is not None for m in train.masks])).any()
        return {_number(train, k) for k in torch.nonzero(train.use_mask).flatten().tolist()}

    with_masks = {i for i in range(0, N - 2, 2) if voc_has_mask(i)}
    assert len(with_masks) == 6
    assert chosen(masks_to_use=1.0) == with_masks
    assert len(chosen(masks_to_use=0.5)) == 3 and chosen(masks_to_use=0) == set()
    small, big = chosen(masks_to_use=2, seed=7), chosen(masks_to_use=4, seed=7)
    assert len(small) == 2 and small <= big
    assert chosen(masks_to_use=3, seed=1) == chosen(masks_to_use=3, seed=1)
    assert len({frozenset(chosen(masks_to_use=3, seed=s)) for s in range(6)}) > 1
    splits = _build(voc_root, masks_to_use=3)
    assert splits.extras["num_masked_train"] == 3
    assert all(splits.train[k]["use_mask"] == splits.train.use_mask[k] for k in range(len(splits.train)))
    with pytest.raises(ValueError, match="exceeds the 6 training images that have masks"):
        _build(voc_root, masks_to_use=7)
    with pytest.raises(ValueError, match="fraction"):
        _build(voc_root, masks_to_use=1.5)


@pytest.mark.parametrize("where", ["root", "devkit", "voc2012"])
def test_root_may_be_any_level_of_the_devkit(voc_root, where):
    root = {"root": voc_root, "devkit": voc_root / "VOCdevkit", "voc2012": _voc_dir(voc_root)}[where]
    assert len(_build(root).train) == N // 2 - 1


def test_sbd_train_list_replaces_train_and_never_holds_val(voc_root, tmp_path, caplog):
    listed = [voc_id(i) for i in (0, 1, 2, 3, 4, 0)]  # 1 and 3 are val images; 0 twice
    lines = [f"/JPEGImages/{x}.jpg /SegmentationClassAug/{x}.png" for x in listed[:3]] + listed[3:]
    path = tmp_path / "train_aug.txt"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        train = _build(voc_root, sbd_train_list=str(path), masks_to_use=1.0).train
    assert [_number(train, k) for k in range(len(train))] == [0, 2, 4]
    assert "dropped 2 VOC val image(s)" in caplog.text
    with pytest.raises(FileNotFoundError, match="split list .*missing.txt"):
        _build(voc_root, sbd_train_list=str(tmp_path / "missing.txt"))


def test_hydra_config_instantiates(voc_root):
    cfg = compose(
        ["dataset=voc2012", f"dataset.root={voc_root}", "dataset.masks_to_use=2", "dataset.image_size=32"]
    ).dataset
    assert cfg._target_ == "gain_exp.data.voc.build"
    splits = hydra.utils.instantiate(cfg, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], seed=3, batch_size=4)
    assert splits.train[0]["image"].shape == (3, 32, 32) and splits.extras["num_masked_train"] == 2


# ---- bad input: one sentence naming the path; strict raises, otherwise a counted warning and a skip ----


def test_missing_root_or_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"root folder {tmp_path / 'nope'} does not exist"):
        _build(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no VOC2012 folder with JPEGImages/ and Annotations/ in .*empty"):
        _build(tmp_path / "empty")


def test_missing_split_list(fresh_voc):
    (_voc_dir(fresh_voc) / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split list .*Main/val.txt does not exist"):
        _build(fresh_voc)


def _k(ds, i: int) -> int:
    """Position of fixture image i in a split."""
    return [_number(ds, j) for j in range(len(ds))].index(i)


def test_unknown_class_in_annotation_stops_the_run(fresh_voc):
    xml = _voc_dir(fresh_voc) / "Annotations" / f"{voc_id(2)}.xml"
    xml.write_text(xml.read_text().replace(f"<name>{voc_objects(2, N, SIZE)[0][0]}</name>", "<name>unicorn</name>"))
    for strict in (True, False):  # a typo in a label is a data error to fix, not a file to skip
        with pytest.raises(ValueError, match=f"annotation {xml} names an unknown class 'unicorn'; VOC classes are"):
            _build(fresh_voc, strict=strict)


def test_unparsable_annotation_is_skipped(fresh_voc, caplog):
    xml = _voc_dir(fresh_voc) / "Annotations" / f"{voc_id(2)}.xml"
    xml.write_text("<annotation><object>")
    with pytest.raises(ValueError, match=f"cannot parse annotation {xml}"):
        _build(fresh_voc, strict=True)
    with caplog.at_level(logging.WARNING):
        splits = _build(fresh_voc)
    assert len(splits.train) == N // 2 - 2 and splits.extras["skipped_files"] == 1
    assert str(xml) in caplog.text and "1 file(s) skipped so far" in caplog.text


def test_unreadable_image_is_reported_at_build(fresh_voc, caplog):
    jpg = _voc_dir(fresh_voc) / "JPEGImages" / f"{voc_id(4)}.jpg"
    jpg.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match=f"cannot read image file {jpg}"):
        _build(fresh_voc, strict=True)
    with caplog.at_level(logging.WARNING):
        train = _build(fresh_voc).train
    assert len(train) == N // 2 - 2 and str(jpg) in caplog.text
    jpg.unlink()
    with pytest.raises(FileNotFoundError, match=f"image file {jpg} does not exist"):
        _build(fresh_voc, strict=True)


def test_truncated_image_is_skipped_at_build(fresh_voc, caplog):
    jpg = _voc_dir(fresh_voc) / "JPEGImages" / f"{voc_id(5)}.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) * 2 // 3])  # the header survives, the last pixels do not
    with pytest.raises(ValueError, match=f"cannot decode image {jpg}.*truncated"):
        _build(fresh_voc, strict=True)
    with caplog.at_level(logging.WARNING):
        splits = _build(fresh_voc)
    val = splits.val
    assert len(val) == N // 2 - 2 and jpg not in val.images and splits.extras["skipped_files"] == 1
    assert [val[k]["index"] for k in range(len(val))] == list(range(len(val)))  # no stand-ins: each image once
    assert caplog.text.count(str(jpg)) == 1


def test_mask_of_wrong_size_stops_the_run(fresh_voc):
    png = _voc_dir(fresh_voc) / "SegmentationClass" / f"{voc_id(4)}.png"
    Image.open(png).resize((SIZE + 4, SIZE)).save(png)
    for strict in (True, False):
        with pytest.raises(ValueError, match=f"mask {png} is {SIZE + 4}x{SIZE} but its image .* is {SIZE}x{SIZE}"):
            _build(fresh_voc, strict=strict)


def test_mask_with_values_outside_voc_ids_stops_the_run(fresh_voc):
    png = _voc_dir(fresh_voc) / "SegmentationClass" / f"{voc_id(4)}.png"
    arr = voc_label_map(4, N, SIZE)
    arr[0, 0] = 42
    save_voc_mask(arr, png)
    for strict in (True, False):
        with pytest.raises(ValueError, match=f"mask {png} holds values \\[42\\] outside 0-20 and 255"):
            _build(fresh_voc, strict=strict)
    Image.fromarray(np.stack([arr] * 3, -1)).save(png)  # an RGB colour mask instead of class ids
    with pytest.raises(ValueError, match=f"mask {png} is a RGB image with 3 channel\\(s\\); SegmentationClass"):
        _build(fresh_voc)


def test_16_bit_mask_holds_the_same_class_ids(fresh_voc):
    png = _voc_dir(fresh_voc) / "SegmentationClass" / f"{voc_id(5)}.png"
    Image.fromarray(voc_label_map(5, N, SIZE).astype(np.uint16)).save(png)
    val = _build(fresh_voc).val
    assert torch.equal(val[_k(val, 5)]["seg"], torch.from_numpy(voc_label_map(5, N, SIZE)).long())


def test_mask_broken_after_the_build_leaves_its_sample_without_a_mask(fresh_voc, caplog):
    png = _voc_dir(fresh_voc) / "SegmentationClass" / f"{voc_id(5)}.png"
    splits = _build(fresh_voc)
    val = splits.val
    k = _k(val, 5)
    png.write_bytes(png.read_bytes()[:40])  # the file is damaged under a running job
    with caplog.at_level(logging.WARNING):
        samples = [val[j] for j in range(len(val))]
    assert [s["index"] for s in samples] == list(range(N // 2 - 1))  # every image once, none standing in for k
    assert not samples[k]["has_mask"] and not samples[k]["seg"].any()
    assert {VOC_CLASSES[c] for c in torch.nonzero(samples[k]["target"]).flatten()} == voc_labels(5, N, SIZE)
    assert splits.extras["skipped_files"] == 1 and str(png) in caplog.text
