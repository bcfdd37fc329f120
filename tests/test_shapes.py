"""Tests for the built-in biased-shapes dataset (gain_exp/data/shapes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gain_exp.data.shapes import build

SMALL = dict(image_size=32, n_train=300, n_val=60, n_test=200)


def _build(root: Path, **kwargs):
    return build(root=str(root), **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    """One cache dir for tests that only vary load-time settings, so the data is generated once."""
    return tmp_path_factory.mktemp("shapes_cache")


@pytest.fixture(scope="module")
def splits(cache_root):
    return _build(cache_root, masks_to_use=30)


def test_sample_shapes_and_dtypes(splits):
    s = splits.train[0]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["target"].shape == (4,) and s["target"].dtype == torch.float32
    assert s["target"].sum() == 1
    assert s["seg"].shape == (32, 32) and s["seg"].dtype == torch.long
    assert s["has_mask"].dtype == torch.bool and s["has_mask"].item()
    assert s["use_mask"].dtype == torch.bool and s["use_mask"].ndim == 0
    assert s["index"] == 0
    assert splits.classes == ["circle", "square", "triangle", "cross"]
    assert splits.multi_label is False and splits.train.multi_label is False
    assert set(splits.tests) == {"test_biased", "test_unbiased"}
    assert splits.train.classes == splits.classes


def test_image_is_normalised_with_given_mean_std(cache_root):
    plain = _build(cache_root, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    norm = _build(cache_root, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x, y = plain.train[3]["image"], norm.train[3]["image"]
    assert 0.0 <= x.min() and x.max() <= 1.0
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    torch.testing.assert_close(y, expected)


def test_seg_marks_the_object_with_its_class(splits):
    for ds in (splits.train, splits.tests["test_unbiased"]):
        for i in range(0, len(ds), 17):
            s = ds[i]
            cls = int(s["target"].argmax())
            values = set(s["seg"].unique().tolist())
            assert values == {0, cls + 1}
            # Objects are 25-50% of the side: a sizeable blob, never touching the border.
            assert (s["seg"] > 0).sum() > 20
            assert s["seg"][0].eq(0).all() and s["seg"][-1].eq(0).all()
            assert s["seg"][:, 0].eq(0).all() and s["seg"][:, -1].eq(0).all()


def test_object_pixels_differ_from_background(splits):
    ds = splits.train
    for i in range(10):
        img = ds.images[i].float()
        obj = ds.seg[i] > 0
        gap = (img[:, obj].mean(1) - img[:, ~obj].mean(1)).abs().max()
        assert gap > 40  # out of 255: the object is clearly visible against the tint


def test_same_seed_same_data_other_seed_differs(tmp_path):
    a = _build(tmp_path / "a", seed=3, n_train=100, n_test=100)
    b = _build(tmp_path / "b", seed=3, n_train=100, n_test=100)
    c = _build(tmp_path / "c", seed=4, n_train=100, n_test=100)
    for name in ("images", "seg", "targets", "cue"):
        assert torch.equal(getattr(a.train, name), getattr(b.train, name))
        assert torch.equal(getattr(a.tests["test_unbiased"], name), getattr(b.tests["test_unbiased"], name))
    assert torch.equal(a.train.use_mask, b.train.use_mask)
    assert not torch.equal(a.train.images, c.train.images)
    # Splits draw from separate streams, so they are not copies of each other.
    assert not torch.equal(a.train.images[:60], a.val.images)


def test_cue_agreement_follows_bias(tmp_path):
    d = _build(tmp_path, bias=0.8, n_train=1000, n_test=1000)

    def agreement(ds):
        return (ds.cue == ds.targets.argmax(1)).float().mean().item()

    # Binomial std at n=1000 is about 0.013; tolerances are ~4 std.
    assert agreement(d.train) == pytest.approx(0.8, abs=0.05)
    assert agreement(d.tests["test_biased"]) == pytest.approx(0.8, abs=0.05)
    assert agreement(d.tests["test_unbiased"]) == pytest.approx(0.25, abs=0.05)
    # Unbiased tint is uniform over classes, not just disagreeing at the right rate.
    counts = torch.bincount(d.tests["test_unbiased"].cue, minlength=4).float()
    assert (counts / 1000 - 0.25).abs().max() < 0.06


def test_cue_is_visible_as_background_tint(splits):
    # Mean background colour per cue class differs strongly between classes (the cue is easy).
    ds = splits.train
    bg = torch.stack([ds.images[i].float()[:, ds.seg[i] == 0].mean(1) for i in range(len(ds))])
    means = torch.stack([bg[ds.cue == c].mean(0) for c in range(4)])
    dists = torch.cdist(means, means) + torch.eye(4) * 1e3
    assert dists.min() > 50


@pytest.mark.parametrize(("masks_to_use", "expected"), [(0, 0), (0.0, 0), (25, 25), (0.1, 30), (1.0, 300), (1, 1)])
def test_masks_to_use_budget(cache_root, masks_to_use, expected):
    d = _build(cache_root, masks_to_use=masks_to_use)
    assert int(d.train.use_mask.sum()) == expected
    assert sum(bool(d.train[i]["use_mask"]) for i in range(len(d.train))) == expected
    for ds in (d.val, *d.tests.values()):
        assert not ds.use_mask.any()
        assert ds[0]["has_mask"].item() and not ds[0]["use_mask"].item()


def test_masks_budget_is_a_fixed_subset(cache_root):
    small = _build(cache_root, masks_to_use=10).train.use_mask
    large = _build(cache_root, masks_to_use=50).train.use_mask
    assert torch.equal(small, _build(cache_root, masks_to_use=10).train.use_mask)
    assert (large[small]).all()  # a larger budget includes the smaller one


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
    import gain_exp.data.shapes as shapes

    first = _build(tmp_path, seed=7)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("generator called although a cache file exists")

    monkeypatch.setattr(shapes, "_generate_split", fail)
    # mean/std/masks_to_use are applied at load time, so they share the cache file.
    again = _build(tmp_path, seed=7, masks_to_use=5, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.equal(first.train.images, again.train.images)
    assert list(tmp_path.glob("*.pt")) == files
    with pytest.raises(AssertionError, match="generator called"):
        _build(tmp_path, seed=8)


def test_augment_flips_image_and_seg_together(cache_root):
    d = _build(cache_root, augment=True, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ds = d.train
    raw_img, raw_seg = ds.images[0].float() / 255, ds.seg[0].long()
    seen_flip = False
    torch.manual_seed(0)
    for _ in range(20):
        s = ds[0]
        if torch.equal(s["seg"], raw_seg.flip(-1)) and not torch.equal(s["seg"], raw_seg):
            torch.testing.assert_close(s["image"], raw_img.flip(-1))
            seen_flip = True
        else:
            assert torch.equal(s["seg"], raw_seg)
            torch.testing.assert_close(s["image"], raw_img)
    assert seen_flip
    assert not d.val.augment and not d.tests["test_unbiased"].augment


def test_multi_label_targets_match_seg(tmp_path):
    d = _build(tmp_path, num_classes=6, max_objects=3, image_size=48, n_train=200, bias=0.95)
    assert d.multi_label and d.train.multi_label
    ds = d.train
    counts = ds.targets.sum(1)
    assert counts.min() >= 1 and counts.max() <= 3 and (counts > 1).any()
    for i in range(len(ds)):
        present = set((ds.targets[i].nonzero().flatten() + 1).tolist())
        assert set(ds.seg[i].unique().tolist()) - {0} == present
    # The cue names a present class at about the bias rate.
    agree = ds.targets[torch.arange(len(ds)), ds.cue].mean().item()
    assert agree == pytest.approx(0.95, abs=0.06)
    s = ds[0]
    assert s["target"].shape == (6,) and set(s["target"].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        (dict(masks_to_use=-1), "masks_to_use=-1 is negative"),
        (dict(masks_to_use=-0.5), "is negative"),
        (dict(masks_to_use=1.5), "fraction > 1"),
        (dict(masks_to_use=301), "exceeds n_train=300"),
        (dict(masks_to_use="all"), "is not a number"),
        (dict(bias=1.2), "bias=1.2 is not a probability"),
        (dict(bias=-0.1), "not a probability"),
        (dict(num_classes=1), "num_classes=1 is out of range"),
        (dict(num_classes=9), "between 2 and 8"),
        (dict(image_size=16), "image_size=16 is too small"),
        (dict(n_train=0), "n_train=0 must be a positive"),
        (dict(n_test=0), "n_test=0"),
        (dict(max_objects=5), "max_objects=5 must be between 1 and num_classes=4"),
        (dict(max_objects=0), "max_objects=0"),
        (dict(std=(0.2, 0.0, 0.2)), "std > 0"),
    ],
)
def test_bad_values_raise_helpful_errors(tmp_path, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        _build(tmp_path, **kwargs)
    assert not list(tmp_path.glob("*.pt"))  # validation happens before any generation
