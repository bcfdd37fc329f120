"""The shapes dataset's texture background (dataset.background=texture, gain_exp/data/shapes.py): determinism, the tint
default left byte-for-byte as it was, and a cue that lives in the spatial pattern, not in the background's colour."""

from __future__ import annotations

import builtins
import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose

from gain_exp.data import shapes
from gain_exp.run import train

needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None,
    reason="dataset.background=texture needs pip install 'gain-exp[textures]'",
)

SMALL = dict(num_classes=3, image_size=32, n_train=40, n_val=20, n_test=20, bias=1.0, seed=0)
# The tint build of SMALL as it was before dataset.background existed (GENERATOR_VERSION 2): the name of the cache file
# it wrote and _pixels_digest of its splits, both computed with that code (shapes.build(root=..., **SMALL)).
TINT_CACHE_FILE = "846a591a4b5a0edd.pt"
TINT_PIXELS = "4225f7effae0b3d1"


def _build(root: Path, **kwargs):
    return shapes.build(root=str(root), **{**SMALL, **kwargs})


def _pixels_digest(d) -> str:
    digest = hashlib.sha256()
    for ds in (d.train, d.val, *d.tests.values()):
        digest.update(ds.images.numpy().tobytes())
        digest.update(ds.seg.numpy().tobytes())
    return digest.hexdigest()[:16]


def test_tint_is_unchanged_byte_for_byte(tmp_path):
    default = _build(tmp_path / "a")
    assert [p.name for p in (tmp_path / "a").glob("*.pt")] == [TINT_CACHE_FILE]  # the cache key did not move
    assert _pixels_digest(default) == TINT_PIXELS
    explicit = _build(tmp_path / "a", background="tint")  # the same file, read back
    assert torch.equal(explicit.train.images, default.train.images)
    assert [p.name for p in (tmp_path / "a").glob("*.pt")] == [TINT_CACHE_FILE]


@needs_skimage
def test_texture_is_deterministic_from_the_seed_and_keeps_layout_cue_and_groups(tmp_path):
    a = _build(tmp_path / "a", background="texture", seed=3)
    b = _build(tmp_path / "b", background="texture", seed=3)
    other = _build(tmp_path / "c", background="texture", seed=4)
    tint = _build(tmp_path / "d", seed=3)
    for split in ("train", "val", "test_biased", "test_unbiased"):
        x = a.train if split == "train" else a.val if split == "val" else a.tests[split]
        y = b.train if split == "train" else b.val if split == "val" else b.tests[split]
        t = tint.train if split == "train" else tint.val if split == "val" else tint.tests[split]
        for name in ("images", "seg", "targets", "cue"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (split, name)
        # The background is the only change: objects, labels and cues are those of the tint data of the same seed.
        for name in ("seg", "targets", "cue"):
            assert torch.equal(getattr(x, name), getattr(t, name)), (split, name)
        assert not torch.equal(x.images, t.images)
    assert not torch.equal(a.train.images, other.train.images)
    assert {p.name for p in (tmp_path / "a").glob("*.pt")} != {p.name for p in (tmp_path / "d").glob("*.pt")}
    assert a.groups == [f"{c}_on_{t}" for c in ("circle", "square", "triangle") for t in ("grass", "gravel", "brick")]
    s = a.train[0]
    assert int(s["group"]) == int(s["target"].argmax()) * 3 + int(a.train.cue[0])
    assert torch.equal(s["spurious"], s["seg"] == 0)  # the cue still lives on the background


@needs_skimage
def test_eight_textures_are_bundled_distinct_and_equalised():
    textures = shapes._textures()
    assert textures.shape == (shapes.MAX_CLASSES, 1, shapes.TEXTURE_SIZE, shapes.TEXTURE_SIZE)
    assert len({name for name, _, _ in shapes.TEXTURE_SOURCES}) == shapes.MAX_CLASSES
    # The same grey-level histogram for every texture: zero mean, unit std, the same sorted values.
    torch.testing.assert_close(textures.mean((1, 2, 3)), torch.zeros(shapes.MAX_CLASSES), atol=1e-5, rtol=0)
    torch.testing.assert_close(textures.std((1, 2, 3)), torch.ones(shapes.MAX_CLASSES), atol=1e-3, rtol=0)
    flat = textures.flatten(1).sort(1).values
    torch.testing.assert_close(flat, flat[:1].expand_as(flat))


def _background_colour(ds) -> torch.Tensor:
    """N x 3 mean colour of each image's background (seg == 0), 0..1."""
    img = ds.images.float() / 255
    bg = (ds.seg == 0).unsqueeze(1).float()
    return (img * bg).sum((2, 3)) / bg.sum((2, 3))


def _texture_features(ds) -> torch.Tensor:
    """N x 3 contrast-free texture statistics: log mean gradient energy of the background at 1, 2 and 4 px scales,
    over the background's grey-level std (pixels near an object are left out)."""
    grey = ds.images.float().mean(1, keepdim=True) / 255
    near = F.max_pool2d((ds.seg > 0).unsqueeze(1).float(), 5, 1, 2)
    feats = []
    for s in (1, 2, 4):
        g, keep = (F.avg_pool2d(grey, s), F.max_pool2d(near, s) == 0) if s > 1 else (grey, near == 0)
        energy = (g[..., :-1, 1:] - g[..., :-1, :-1]).abs() + (g[..., 1:, :-1] - g[..., :-1, :-1]).abs()
        k = keep[..., :-1, :-1].float()
        feats.append(((energy * k).sum((1, 2, 3)) / k.sum((1, 2, 3)).clamp(min=1)).log())
    std = torch.stack([grey[i, 0][ds.seg[i] == 0].std() for i in range(len(ds))])
    return torch.stack(feats, 1) - std.log().unsqueeze(1)


def _nearest_class_mean(train_x, train_y, test_x, test_y, k: int) -> float:
    """Accuracy of a nearest-class-mean classifier on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    means = torch.stack([a[train_y == c].mean(0) for c in range(k)])
    return (torch.cdist(b, means).argmin(1) == test_y).float().mean().item()


@needs_skimage
def test_the_cue_is_the_texture_not_the_background_colour(tmp_path):
    # bias=1: the cue is the label in train. On test_unbiased (the cue drawn independently of the label), a probe that
    # reads each image's mean background colour is near chance (1/4) while simple texture statistics read the cue.
    sizes = dict(num_classes=4, image_size=48, n_train=400, n_val=8, n_test=400)
    d = _build(tmp_path / "texture", background="texture", **sizes)
    train, test = d.train, d.tests["test_unbiased"]
    colour_tr, colour_te = _background_colour(train), _background_colour(test)
    class_means = torch.stack([colour_tr[train.cue == c].mean(0) for c in range(4)])
    assert (class_means.max(0).values - class_means.min(0).values).max() < 0.03  # < 8 of 255 grey levels
    assert _nearest_class_mean(colour_tr, train.cue, colour_te, test.cue, 4) < 0.36  # measured 0.28
    tex_tr, tex_te = _texture_features(train), _texture_features(test)
    assert _nearest_class_mean(tex_tr, train.cue, tex_te, test.cue, 4) > 0.55  # measured 0.72
    # The same colour probe reads the tint cue perfectly.
    tint = _build(tmp_path / "tint", **sizes)
    t_tr, t_te = tint.train, tint.tests["test_unbiased"]
    assert _nearest_class_mean(_background_colour(t_tr), t_tr.cue, _background_colour(t_te), t_te.cue, 4) > 0.95


@needs_skimage
def test_texture_cache_is_reused(tmp_path, monkeypatch):
    first = _build(tmp_path, background="texture")
    monkeypatch.setattr(shapes, "_generate_split", lambda *a, **k: pytest.fail("generated although cached"))
    again = _build(tmp_path, background="texture")
    assert torch.equal(first.train.images, again.train.images)


def test_recipe_composes_with_the_texture_background():
    cfg = compose(["experiment=shapes_texture"])
    assert cfg.dataset.background == "texture" and cfg.backbone.name == "gain_cnn4"
    assert compose([]).dataset.background == "tint"


def test_unknown_background_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"background='wood' is unknown; set it to tint or texture\."):
        _build(tmp_path, background="wood")
    assert not list(tmp_path.glob("*.pt"))


def test_missing_scikit_image_is_one_sentence_naming_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    shapes._texture_photos.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'gain-exp\[textures\]'") as err:
            _build(tmp_path, background="texture")
    finally:
        monkeypatch.undo()
        shapes._texture_photos.cache_clear()
    message = str(err.value)
    assert isinstance(err.value, ValueError)  # the app prints ValueErrors as one sentence (run.py)
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert not list(tmp_path.glob("*.pt"))


@needs_skimage
@pytest.mark.slow
def test_baseline_learns_the_texture_cue(tmp_path, one_thread):
    # About 25 s on one CPU thread. The full recipe (24 epochs, 1000 test images) gave 0.971 / 0.305 (docs/data.md).
    overrides = [
        "experiment=shapes_texture",
        "loss=baseline",
        "trainer.device=cpu",
        "trainer.epochs=2",
        "trainer.eval_metrics.deletion_insertion=off",
        "trainer.num_panels=1",
        f"dataset.root={tmp_path / 'shapes'}",
        "dataset.n_val=250",
        "dataset.n_test=500",
        "logger=json",
    ]
    final = train(compose(overrides), out_dir=tmp_path / "run")["final"]
    assert final["test_biased/acc"] > 0.8  # measured 0.900: the cue is learned
    assert final["test_unbiased/acc"] < 0.35  # measured 0.252, chance 0.25: the shapes are not
