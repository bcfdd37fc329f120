"""Tests for the class-folder dataset with masks (gain_exp/data/mask_folder.py) and its sampler."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import compose
from fixtures_data import image_ext, make_mask_folder, mask_kind, object_box
from PIL import Image

from gain_exp.data.mask_folder import build

SIZE = 48


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def binary_root(tmp_path_factory) -> Path:
    return make_mask_folder(tmp_path_factory.mktemp("binary"), size=SIZE)


@pytest.fixture()
def fresh(tmp_path) -> Path:
    """A private binary dataset for tests that damage files."""
    return make_mask_folder(tmp_path / "data", size=SIZE)


def _build(root: Path, **kwargs):
    return build(root=str(root), **{"image_size": SIZE, "negative_class": "negative", **kwargs})


def _j(ds, k: int) -> int:
    """Fixture image number of sample k."""
    return int(ds.images[k].stem.split("_")[1])


def _box_map(j: int, value: int) -> torch.Tensor:
    seg = torch.zeros(SIZE, SIZE, dtype=torch.long)
    x0, y0, x1, y1 = object_box(j, SIZE)
    seg[y0:y1, x0:x1] = value
    return seg


def test_binary_splits_labels_and_masks(binary_root):
    splits = _build(binary_root)
    assert splits.classes == ["lesion", "negative"] and splits.negative_class == 1
    assert splits.multi_label is False and splits.train_sampler is None
    assert set(splits.tests) == {"test"}
    assert len(splits.train) == len(splits.val) == len(splits.tests["test"]) == 12
    for ds in (splits.val, splits.tests["test"]):
        for k in range(len(ds)):
            s, j = ds[k], _j(ds, k)
            positive = ds.images[k].parent.name == "lesion"
            assert s["target"].tolist() == ([1.0, 0.0] if positive else [0.0, 1.0])
            assert s["has_mask"].item() == (positive and mask_kind(j) is not None)
            assert not s["use_mask"] and s["seg"].dtype == torch.long and s["index"] == k
            if s["has_mask"]:
                expected = _box_map(j, 1)
                if mask_kind(j) == "seed" and image_ext(j) == ".jpg":
                    # A JPEG mask is thresholded; compression may move its edge by a pixel.
                    assert (s["seg"] == expected).float().mean() > 0.98
                else:
                    assert torch.equal(s["seg"], expected)
            else:
                assert not s["seg"].any()


def test_multi_class_without_negative(tmp_path):
    root = make_mask_folder(tmp_path, classes=("square", "circle"), negative=None, splits=("train", "val"), size=SIZE)
    splits = build(root=str(root), image_size=SIZE, autoaugment=False)
    assert splits.classes == ["circle", "square"] and splits.negative_class is None and splits.tests == {}
    for k in range(len(splits.val)):
        s = splits.val[k]
        c = splits.classes.index(splits.val.images[k].parent.name)
        assert s["target"].argmax() == c and s["target"].sum() == 1
        if s["has_mask"]:
            assert set(s["seg"].unique().tolist()) == {0, c + 1}


def test_mask_budget_counts_train_positives_with_masks(binary_root):
    def chosen(**kw):
        train = _build(binary_root, **kw).train
        return {train.images[k] for k in torch.nonzero(train.use_mask).flatten().tolist()}, train

    everything, train = chosen(masks_to_use=1.0)
    assert len(everything) == 4  # 4 of the 6 positives have masks (mask_kind)
    assert all(p.parent.name == "lesion" and train.masks[train.images.index(p)] is not None for p in everything)
    half, _ = chosen(masks_to_use=0.5, seed=3)
    three, _ = chosen(masks_to_use=3, seed=3)
    assert len(half) == 2 and len(three) == 3 and half <= three
    assert chosen(masks_to_use=0)[0] == set()
    with pytest.raises(ValueError, match="exceeds the 4 training images that have masks"):
        _build(binary_root, masks_to_use=5)
    with pytest.raises(ValueError, match="masks_to_use=True is not valid"):
        _build(binary_root, masks_to_use=True)


def test_sampler_gives_each_batch_its_share_of_positives(binary_root):
    splits = _build(binary_root, batch_pos_dist=0.25, steps_per_epoch=50, batch_size=8, seed=5)
    sampler, labels = splits.train_sampler, splits.train.targets.argmax(1)
    assert len(sampler) == 400
    first = list(sampler)
    assert len(first) == 400
    per_batch = (labels[torch.tensor(first)] != splits.negative_class).view(50, 8).sum(1)
    assert (per_batch == 2).all()  # 0.25 * 8 positives in every batch
    second = list(sampler)
    assert second != first  # a new order every epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # ...reproducible from the seed and epoch
    again = _build(binary_root, batch_pos_dist=0.25, steps_per_epoch=50, batch_size=8, seed=5).train_sampler
    assert list(again) == first


def test_sampler_share_at_batch_size_one_and_balanced_positive_classes(tmp_path):
    root = make_mask_folder(tmp_path, classes=("a", "b"), negative="neg", splits=("train", "val"), size=SIZE)
    for j in range(6):  # class a gets 4x the images of class b
        for copy in range(3):
            src = root / "train" / "a" / f"img_{j:03d}{image_ext(j)}"
            shutil.copy(src, src.with_name(f"extra{copy}_{j:03d}{image_ext(j)}"))
    splits = build(root=str(root), image_size=SIZE, negative_class="neg", batch_pos_dist=0.6, steps_per_epoch=3000)
    labels = splits.train.targets.argmax(1)[torch.tensor(list(splits.train_sampler))]
    counts = torch.bincount(labels, minlength=3).float() / len(labels)
    assert abs(counts[2] - 0.4) < 0.03  # negatives
    assert abs(counts[0] - 0.3) < 0.03 and abs(counts[1] - 0.3) < 0.03  # positives split evenly over a and b


def test_steps_per_epoch_alone_keeps_the_natural_mix(binary_root):
    splits = _build(binary_root, steps_per_epoch=5, batch_size=4)
    order = list(splits.train_sampler)
    assert len(order) == 20 and sorted(order[:12]) == list(range(12))  # whole permutations first
    with pytest.raises(ValueError, match="batch_pos_dist=0.5 needs negative_class"):
        _build(binary_root, negative_class=None, batch_pos_dist=0.5)


def test_mask_naming_conventions_and_extensions(tmp_path):
    root = make_mask_folder(tmp_path, splits=("train", "val"), size=SIZE)
    lesion = root / "train" / "lesion"
    (lesion / "img_000.jpg").rename(lesion / "img_000.JPG")  # upper-case extensions count
    (lesion / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(root / "train" / "negative" / "img_000_mask.png")
    train = _build(root).train
    names = {p.name: (m.name if m else None) for p, m in zip(train.images, train.masks) if p.parent == lesion}
    assert names == {
        "img_000.JPG": None,
        "img_001.png": "img_001_mask.png",
        "img_002.jpg": "img_002m.jpg",
        "img_003.png": None,
        "img_004.jpg": "img_004_mask.png",
        "img_005.png": "img_005m.png",
    }
    assert all(m is None for p, m in zip(train.images, train.masks) if p.parent.name == "negative")
    with pytest.raises(ValueError, match="no images \\(.bmp\\) in"):
        _build(root, extensions=["bmp"])


def test_hydra_config_instantiates(binary_root):
    cfg = compose(
        [
            "dataset=mask_folder",
            f"dataset.root={binary_root}",
            "dataset.negative_class=negative",
            "dataset.batch_pos_dist=0.5",
            "dataset.steps_per_epoch=3",
        ]
    ).dataset
    assert cfg._target_ == "gain_exp.data.mask_folder.build"
    splits = hydra.utils.instantiate(cfg, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], seed=1, batch_size=2)
    assert len(splits.train_sampler) == 6 and splits.train[0]["image"].shape == (3, 224, 224)


# ---- bad input: one sentence naming the path; strict raises, otherwise a counted warning and a skip ----


def test_missing_root_and_split_folders(fresh, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"root folder {tmp_path / 'nope'} does not exist.*<class_name>"):
        _build(tmp_path / "nope")
    shutil.rmtree(fresh / "test")
    assert _build(fresh).tests == {}
    shutil.rmtree(fresh / "val")
    with pytest.raises(FileNotFoundError, match=f"split folder {fresh / 'val'} does not exist; lay out images as"):
        _build(fresh)


def test_bad_class_folders(fresh):
    with pytest.raises(ValueError, match="negative_class='neg' is not a class folder"):
        _build(fresh, negative_class="neg")
    (fresh / "val" / "tumour").mkdir()
    with pytest.raises(ValueError, match=f"the val split of {fresh} has class 'tumour', which train/ lacks"):
        _build(fresh)
    (fresh / "train" / "tumour").mkdir()
    with pytest.raises(ValueError, match=f"no images \\(.jpg, .jpeg, .png, .bmp\\) in {fresh / 'train' / 'tumour'}"):
        _build(fresh)
    shutil.rmtree(fresh / "train" / "negative")
    shutil.rmtree(fresh / "train" / "tumour")
    with pytest.raises(ValueError, match="has 1 class folder\\(s\\); a classifier needs at least 2"):
        _build(fresh, negative_class=None)


def test_a_split_without_a_train_class_stops_the_build(fresh):
    shutil.rmtree(fresh / "val" / "lesion")  # before: val silently had no lesion images to score
    with pytest.raises(ValueError) as err:
        _build(fresh)
    assert str(err.value) == (
        f"mask_folder dataset: the val split of {fresh} has no folder for class 'lesion', which train/ has; every split"
        " needs the same class folders, each with images, so add images of it to every split that lacks it (an empty"
        " folder is not enough) or remove it from every split."
    )


def test_a_test_split_with_other_classes_stops_the_build_naming_each(fresh):
    shutil.copytree(fresh / "test" / "lesion", fresh / "test" / "tumour")  # with images: only train lacks it
    with pytest.raises(
        ValueError,
        match=rf"^mask_folder dataset: the test split of {fresh} has class 'tumour', which "
        r"train/ lacks; .* remove it from every split\.$",
    ):
        _build(fresh)
    shutil.rmtree(fresh / "test" / "lesion")
    (fresh / "test" / "polyp").mkdir()
    with pytest.raises(
        ValueError,
        match=rf"the test split of {fresh} has no folder for class 'lesion', which train/ "
        r"has, and has classes 'polyp', 'tumour', which train/ lacks; .* add images of "
        r"them to every split that lacks them",
    ):
        _build(fresh)


def test_a_val_class_whose_files_are_all_unreadable_is_warned_once_and_recorded(fresh, binary_root, caplog):
    for image in (fresh / "val" / "lesion").glob("img_00?.*"):
        if not image.stem.endswith(("_mask", "m")):
            image.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        splits = _build(fresh)
    assert len(splits.val) == 6 and splits.extras["skipped_files"] == 6
    assert splits.extras["classes_without_images"] == {"val": ["lesion"]}  # the dict summary.json["data"] holds
    [warning] = [r.getMessage() for r in caplog.records if "no image in another split" in r.getMessage()]
    assert f"of {fresh} (val: lesion)" in warning and "NaN or left out" in warning and "\n" not in warning
    assert "classes_without_images" not in _build(binary_root).extras  # only recorded when a class has no image


def test_unreadable_image_is_reported_at_build(fresh, caplog):
    bad = fresh / "train" / "lesion" / "img_003.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"cannot read image file {bad}: it is not an image"):
        _build(fresh, strict=True)
    with caplog.at_level(logging.WARNING):
        splits = _build(fresh)
    assert len(splits.train) == 11 and bad not in splits.train.images
    assert str(bad) in caplog.text and "1 file(s) skipped so far" in caplog.text
    assert splits.extras["skipped_files"] == 1


def _truncate(path: Path, keep: float = 0.75) -> None:
    """Cut the end off a file: the header survives, the last pixels do not."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_image_is_skipped_at_build(fresh, caplog):
    bad = fresh / "val" / "lesion" / "img_000.jpg"
    _truncate(bad)
    with pytest.raises(ValueError, match=f"cannot decode image {bad}.*truncated"):
        _build(fresh, strict=True)
    with caplog.at_level(logging.WARNING):
        splits = _build(fresh)
    val = splits.val
    assert len(val) == 11 and bad not in val.images and splits.extras["skipped_files"] == 1
    assert [val[k]["index"] for k in range(len(val))] == list(range(11))  # no stand-ins: each image once
    assert caplog.text.count(str(bad)) == 1


def test_unreadable_mask_costs_only_the_mask(fresh, caplog):
    mask = fresh / "val" / "lesion" / "img_001_mask.png"
    _truncate(mask, 0.5)
    with pytest.raises(ValueError, match=f"cannot decode mask {mask}"):
        _build(fresh, strict=True)
    with caplog.at_level(logging.WARNING):
        splits = _build(fresh)
    val, k = splits.val, splits.val.images.index(mask.with_name("img_001.png"))
    assert len(val) == 12 and val.masks[k] is None and splits.extras["skipped_files"] == 1
    assert not val[k]["has_mask"] and str(mask) in caplog.text


def test_mask_of_wrong_size_stops_the_run(fresh):
    mask = fresh / "train" / "lesion" / "img_001_mask.png"
    Image.fromarray(np.zeros((SIZE, SIZE + 2), np.uint8)).save(mask)
    for strict in (True, False):  # a readable but wrong mask is a data error, not a file to skip
        with pytest.raises(
            ValueError,
            match=f"mask {mask} is {SIZE + 2}x{SIZE} but its image .*img_001.png is"
            f" {SIZE}x{SIZE}; save the mask at the image's size",
        ):
            _build(fresh, strict=strict)


def test_mask_with_undocumented_values_stops_the_run(fresh):
    mask = fresh / "train" / "lesion" / "img_001_mask.png"
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[:10, :10], arr[10:20, :10] = 128, 255
    Image.fromarray(arr).save(mask)
    for strict in (True, False):
        with pytest.raises(
            ValueError, match=f"mask {mask} holds values \\[0, 128, 255\\]; a binary mask may hold only 0"
        ):
            _build(fresh, strict=strict)
    Image.fromarray(np.stack([arr] * 3, -1)).save(mask)
    with pytest.raises(
        ValueError, match=f"mask {mask} is a RGB image with 3 channel\\(s\\); save it as a single-channel"
    ):
        _build(fresh)


def test_mask_broken_after_the_build_leaves_its_sample_without_a_mask(fresh, caplog):
    splits = _build(fresh, masks_to_use=1.0)
    val, train = splits.val, splits.train
    mask = fresh / "val" / "lesion" / "img_001_mask.png"
    k = val.images.index(mask.with_name("img_001.png"))
    train_mask = fresh / "train" / "lesion" / "img_001_mask.png"
    t = train.images.index(train_mask.with_name("img_001.png"))
    assert val[k]["has_mask"] and train[t]["use_mask"] and splits.extras["skipped_files"] == 0
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(mask)  # the file changes under a running job
    _truncate(train_mask, 0.5)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # a second epoch neither re-warns nor re-counts
            samples = [val[j] for j in range(len(val))]
            assert [s["index"] for s in samples] == list(range(12))  # every image once, none standing in for k
            assert not samples[k]["has_mask"] and not samples[k]["use_mask"] and not samples[k]["seg"].any()
            assert samples[k]["target"].tolist() == [1.0, 0.0]
            assert not train[t]["has_mask"] and not train[t]["use_mask"]  # out of the L_e budget too
    assert splits.extras["skipped_files"] == 2  # the dict the run writes into summary.json["data"]
    assert caplog.text.count(str(mask)) == 1 and caplog.text.count(str(train_mask)) == 1
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(train_mask)  # mended: strict builds again
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(mask)
    strict = _build(fresh, strict=True).val
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(mask)
    with pytest.raises(ValueError, match=f"mask {mask} holds values \\[7\\]"):
        strict[k]


def test_16_bit_images_and_masks_read_like_their_8_bit_versions(fresh):
    lesion = fresh / "val" / "lesion"
    grey = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    grey[:, 0] = 255  # full scale: a clipping reader would saturate nearly every other pixel too
    box = _box_map(1, 1).numpy().astype(bool)
    Image.fromarray(grey.astype(np.uint16) * 257).save(lesion / "img_001.png")  # 16-bit grey PNG
    Image.fromarray(box.astype(np.uint16) * 65535).save(lesion / "img_001_mask.png")  # 16-bit 0/65535 mask
    Image.fromarray(_box_map(5, 1).numpy().astype(np.uint16)).save(lesion / "img_005m.png")  # 16-bit 0/1 mask
    assert Image.open(lesion / "img_001.png").mode.startswith("I")
    val = _build(fresh).val
    k = val.images.index(lesion / "img_001.png")
    expected, _ = val.transform(Image.fromarray(grey).convert("RGB"), None)
    assert torch.equal(val[k]["image"], expected)
    assert torch.equal(val[k]["seg"], _box_map(1, 1))
    assert torch.equal(val[val.images.index(lesion / "img_005.png")]["seg"], _box_map(5, 1))
