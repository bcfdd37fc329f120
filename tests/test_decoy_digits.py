"""Tests for the built-in decoy-digits dataset (gain_exp/data/decoy_digits.py)."""

from __future__ import annotations

import builtins
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import compose

from gain_exp.data import decoy_digits
from gain_exp.data.decoy_digits import build, decoy_colours, load_scans, patch_size, render

pytest.importorskip("sklearn", reason="dataset=decoy_digits needs pip install 'gain-exp[digits]'")

SMALL = dict(image_size=32, n_train=600, n_val=100, n_test=500)
PLAIN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _build(root: Path, **kwargs):
    return build(root=str(root), **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    """One cache dir for tests that only vary load-time settings, so the data is generated once."""
    return tmp_path_factory.mktemp("decoy_cache")


@pytest.fixture(scope="module")
def splits(cache_root):
    return _build(cache_root, masks_to_use=30, **PLAIN)


def _digest(d) -> str:
    """sha256 over every generated tensor of every split."""
    h = hashlib.sha256()
    for ds in (d.train, d.val, *d.tests.values()):
        for t in (ds.images, ds.labels, ds.cue, ds.corner, ds.source, ds.seg, ds.spurious, ds.use_mask):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_patch_size_is_the_fraction_of_the_side():
    assert [patch_size(s, 4 / 28) for s in (28, 32, 56, 64, 16)] == [4, 5, 8, 9, 2]
    assert [patch_size(s, 0.25) for s in (32, 64, 30)] == [8, 16, 8]


def test_decoy_colours_known_answers():
    cue = torch.arange(10)
    grey = decoy_colours(cue, "grey")
    assert grey[:, 0].tolist() == [255, 230, 205, 180, 155, 130, 105, 80, 55, 30]  # Ross et al.: 255 - 25 y
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 0], grey[:, 2])
    colour = decoy_colours(cue, "colour")
    # HSV (y / 10, 1, 1): red, orange (h 0.1 -> G 255 * 0.6 = 153), h 0.3 -> (51, 255, 0), cyan at h 0.5.
    assert colour[0].tolist() == [255, 0, 0] and colour[1].tolist() == [255, 153, 0]
    assert colour[3].tolist() == [51, 255, 0] and colour[5].tolist() == [0, 255, 255]
    assert len({tuple(c) for c in colour.tolist()}) == 10


def test_sample_shapes_dtypes_and_rgb(splits):
    s = splits.train[0]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    digit = ~s["spurious"]
    grey = s["image"][0][digit]
    assert torch.equal(grey, s["image"][1][digit]) and torch.equal(grey, s["image"][2][digit])  # grey as RGB
    torch.testing.assert_close(s["image"], splits.train.images[0].float() / 255)
    assert s["target"].shape == (10,) and s["target"].sum() == 1
    assert int(s["target"].argmax()) == int(splits.train.labels[0])
    assert s["seg"].shape == (32, 32) and s["seg"].dtype == torch.long
    assert s["spurious"].shape == (32, 32) and s["spurious"].dtype == torch.bool
    assert s["has_mask"].item() and s["use_mask"].dtype == torch.bool and s["index"] == 0
    assert splits.classes == [str(d) for d in range(10)] and not splits.multi_label
    assert set(splits.tests) == {"test_biased", "test_unbiased"}
    batch = torch.utils.data.default_collate([splits.train[i] for i in range(4)])  # the extra key collates
    assert batch["spurious"].shape == (4, 32, 32)


def test_image_is_normalised_with_given_mean_std(cache_root, splits):
    norm = _build(cache_root, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x, y = splits.train[3]["image"], norm.train[3]["image"]
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    torch.testing.assert_close(y, expected)


def test_render_upsamples_bilinearly_into_the_centre_box_known_answer():
    # 64 px: patch round(64 * 4 / 28) = 9, digit box 64 - 2 * 9 = 46 at rows/columns 9..54, scale 46 / 8 = 5.75.
    scan = torch.zeros(1, 8, 8)
    scan[:, :, :4] = 16.0  # left half full ink
    rgb = render(scan, torch.tensor([3]), torch.tensor([0]), 64, 9, "grey")[0].long()
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[0], rgb[2])
    img = rgb[0]
    # Bilinear (align_corners=False): box column j samples x = (j + 0.5) / 5.75 - 0.5; ink 1 for x <= 3 (j <= 19),
    # 0 for x >= 4 (j >= 26); j = 20: x = 3.0652, ink 0.9348 -> round(238.4) = 238.
    row = img[30]
    assert row[9:29].eq(255).all() and row[29] == 238 and row[35:55].eq(0).all()
    assert (row[29:35].diff() < 0).all()  # the edge falls monotonically
    assert torch.equal(img[9:55], row.expand(46, 64))  # every box row alike
    assert img[:9, :9].eq(255 - 25 * 3).all()  # the patch: top-left corner, shade 180 for digit 3
    outside = img.clone()
    outside[9:55, 9:55] = 0
    outside[:9, :9] = 0
    assert outside.eq(0).all()


def test_split_images_are_their_scans_rendered_with_their_decoys(splits):
    scans, labels = load_scans()
    for ds in (splits.train, splits.tests["test_unbiased"]):
        assert torch.equal(ds.labels, labels[ds.source])
        assert torch.equal(ds.images, render(scans[ds.source], ds.cue, ds.corner, 32, 8, "colour"))


def test_patch_is_a_corner_square_with_the_cue_colour(splits):
    # 32 px, patch_fraction 0.25: an 8 x 8 patch at rows/columns 0..7 or 24..31.
    for ds in (splits.train, splits.tests["test_unbiased"]):
        for i in range(0, len(ds), 37):
            spur = ds.spurious[i]
            rows, cols = spur.any(1).nonzero().flatten(), spur.any(0).nonzero().flatten()
            assert int(spur.sum()) == 64 and len(rows) == 8 and len(cols) == 8
            assert int(rows[0]) in (0, 24) and int(cols[0]) in (0, 24)
            corner = int(ds.corner[i])
            assert (int(rows[0]) == 24) == (corner >= 2) and (int(cols[0]) == 24) == (corner % 2 == 1)
            patch = ds.images[i][:, spur]  # 3 x 64
            assert torch.equal(patch, decoy_colours(ds.cue[i : i + 1], "colour").view(3, 1).expand(3, 64))


def test_masks_are_the_bright_strokes_and_never_the_patch(cache_root, splits):
    ds = splits.train
    for i in range(0, len(ds), 23):
        seg, img, spur = ds.seg[i], ds.images[i, 0], ds.spurious[i]
        y = int(ds.labels[i])
        assert set(seg.unique().tolist()) == {0, y + 1}
        assert not (seg[spur] > 0).any()
        assert torch.equal(seg > 0, (img > 0.25 * 255) & ~spur)  # the default mask_threshold: > 63.75
        assert (seg > 0).sum() > 30  # strokes, not a speck
    higher = _build(cache_root, mask_threshold=0.6).train
    assert torch.equal(higher.seg[0] > 0, (higher.images[0, 0] > 153) & ~higher.spurious[0])
    assert (higher.seg > 0).sum() < (ds.seg > 0).sum()


@pytest.mark.parametrize("decoy", ["colour", "grey"])
def test_decoy_encodes_the_label_in_biased_splits_and_not_in_test_unbiased(cache_root, decoy):
    splits = _build(cache_root, decoy=decoy)
    for name, ds in (("train", splits.train), ("val", splits.val), ("test_biased", splits.tests["test_biased"])):
        assert torch.equal(ds.cue, ds.labels), name  # bias 1.0: every patch names the digit
        painted = torch.stack([ds.images[i][:, ds.spurious[i]][:, 0] for i in range(len(ds))])  # N x 3
        assert torch.equal(painted, decoy_colours(ds.labels, decoy))
        if decoy == "grey":
            assert torch.equal(painted[:, 0].long(), 255 - 25 * ds.labels)
    ub = splits.tests["test_unbiased"]
    painted = torch.stack([ub.images[i][:, ub.spurious[i]][:, 0] for i in range(len(ub))])
    assert torch.equal(painted, decoy_colours(ub.cue, decoy))
    # 500 images: agreement with the label is ~Binomial(500, 0.1), std 0.013; the tolerance is ~4 std.
    assert (ub.cue == ub.labels).float().mean().item() == pytest.approx(0.1, abs=0.055)
    counts = torch.bincount(ub.cue, minlength=10).float() / len(ub)
    assert (counts - 0.1).abs().max() < 0.06  # uniform shades, not just disagreeing
    # Independence: the shade predicts the label no better than chance (best digit per shade, ~0.1 + noise).
    joint = torch.zeros(10, 10)
    joint.index_put_((ub.cue, ub.labels), torch.ones(len(ub)), accumulate=True)
    assert joint.max(1).values.sum().item() / len(ub) < 0.3


def test_bias_below_one_mislabels_that_share_of_patches(tmp_path):
    d = _build(tmp_path, bias=0.8)
    agree = (d.train.cue == d.train.labels).float().mean().item()
    assert agree == pytest.approx(0.8, abs=0.07)  # n = 600: std 0.016


def test_splits_are_disjoint_pools_of_the_scans(splits):
    tr, va, tb, tu = splits.train, splits.val, splits.tests["test_biased"], splits.tests["test_unbiased"]
    assert (len(tr), len(va), len(tb), len(tu)) == (600, 100, 500, 500)
    for ds in (tr, va, tb):
        assert len(set(ds.source.tolist())) == len(ds)
    assert not set(tr.source.tolist()) & set(va.source.tolist())
    assert not (set(tr.source.tolist()) | set(va.source.tolist())) & set(tb.source.tolist())
    assert torch.equal(tb.source, tu.source)  # the same test scans, each with its own decoy
    assert not torch.equal(tb.corner, tu.corner)
    # The digit box is identical; only the patches differ.
    keep = ~(tb.spurious | tu.spurious).unsqueeze(1).expand_as(tb.images)
    assert torch.equal(tb.images[keep], tu.images[keep])


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _build(tmp_path / "a", seed=3)
    b = _build(tmp_path / "b", seed=3)
    c = _build(tmp_path / "c", seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert not torch.equal(a.train.source, c.train.source)


@pytest.mark.parametrize(("masks_to_use", "expected"), [(0, 0), (25, 25), (0.1, 60), (1.0, 600)])
def test_masks_to_use_budget(cache_root, masks_to_use, expected):
    d = _build(cache_root, masks_to_use=masks_to_use)
    assert int(d.train.use_mask.sum()) == expected and d.extras["num_masked_train"] == expected
    for ds in (d.val, *d.tests.values()):
        assert not ds.use_mask.any() and ds[0]["has_mask"].item()
    if expected >= 10:  # a larger budget includes the smaller one
        assert (d.train.use_mask[_build(cache_root, masks_to_use=10).train.use_mask]).all()


def test_cache_is_written_reused_and_regenerated_when_corrupt(tmp_path, monkeypatch, caplog):
    first = _build(tmp_path, seed=7)
    [path] = tmp_path.glob("*.pt")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))

    real = decoy_digits.generate

    def fail(**kwargs):
        raise AssertionError("generator called although a cache file exists")

    monkeypatch.setattr(decoy_digits, "generate", fail)
    again = _build(tmp_path, seed=7, masks_to_use=5, mask_threshold=0.5)  # load-time settings share the file
    assert torch.equal(first.train.images, again.train.images)
    with pytest.raises(AssertionError, match="generator called"):
        _build(tmp_path, seed=8)

    monkeypatch.setattr(decoy_digits, "generate", real)
    path.write_bytes(b"not a torch file")
    fixed = _build(tmp_path, seed=7)
    assert torch.equal(first.train.images, fixed.train.images)
    assert "unreadable" in caplog.text


def test_missing_scikit_learn_is_one_sentence_naming_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    load_scans.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'gain-exp\[digits\]'") as err:
            _build(tmp_path)
    finally:
        monkeypatch.undo()
        load_scans.cache_clear()
    message = str(err.value)
    assert isinstance(err.value, ValueError)  # the app prints ValueErrors as one sentence (run.py)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        (dict(image_size=12), "image_size=12 leaves a 6 px digit box"),
        (dict(image_size=16, patch_fraction=0.3), "image_size=16 leaves a 6 px digit box"),
        (dict(decoy="red"), "decoy='red' is not a decoy kind"),
        (dict(patch_fraction=0.0), "patch_fraction=0.0 is out of range"),
        (dict(patch_fraction=0.4), "set it in (0, 0.3]"),
        (dict(n_train=0), "n_train=0 must be a positive"),
        (dict(n_val=-1), "n_val=-1"),
        (dict(n_test=0), "n_test=0"),
        (dict(n_train=1500, n_test=300), "= 1900 exceeds the 1797 scans"),
        (dict(bias=1.5), "bias=1.5 is not a probability"),
        (dict(mask_threshold=0.0), "mask_threshold=0.0 is not a share of full ink"),
        (dict(mask_threshold=1.0), "strictly between 0 and 1"),
        (dict(masks_to_use=-1), "masks_to_use=-1 is not valid"),
        (dict(masks_to_use=601), "exceeds the 600 training images"),
        (dict(masks_to_use=1.5), "fraction above 1"),
        (dict(std=(0.2, 0.0, 0.2)), "std > 0"),
    ],
)
def test_bad_values_raise_one_sentence(tmp_path, kwargs, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)")) as err:
        _build(tmp_path, **kwargs)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")
    assert not list(tmp_path.glob("*.pt"))  # validation happens before any generation


def test_app_trains_one_epoch_on_tiny_decoy_digits(tmp_path):
    from gain_exp.run import train

    cfg = compose(
        [
            "dataset=decoy_digits",
            "backbone=gain_cnn4",
            "loss=gain_ext",
            f"dataset.root={tmp_path / 'cache'}",
            "dataset.image_size=32",
            "dataset.n_train=48",
            "dataset.n_val=16",
            "dataset.n_test=16",
            "dataset.masks_to_use=0.5",
            "trainer.epochs=1",
            "trainer.batch_size=16",
            "trainer.eval_batch_size=16",
            "trainer.num_panels=2",
            "trainer.device=cpu",
            "logger=json",
        ]
    )
    summary = train(cfg, out_dir=tmp_path / "run")
    assert summary["status"] == "completed"
    for split in ("val", "test_biased", "test_unbiased"):
        assert 0.0 <= summary["final"][f"{split}/acc"] <= 1.0
    assert summary["data"]["num_masked_train"] == 24 and summary["data"]["patch_size"] == 8
    assert (tmp_path / "run" / "summary.json").exists()
