"""Attention panels: colours, sizes, value ranges and the written PNG."""

import pytest
import torch
from PIL import Image

from gain_exp.output.panels import (
    JET_LUT,
    SEPARATOR_PX,
    attention_panel,
    denormalise,
    heatmap,
    overlay,
    save_panels,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pixels(img: Image.Image) -> torch.Tensor:
    """H x W x 3 uint8 tensor of an RGB image."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)


def tiny_sample(size: int = 64):
    gen = torch.Generator().manual_seed(0)
    image01 = torch.rand(3, size, size, generator=gen)
    attention = torch.rand(size, size, generator=gen)
    soft = torch.sigmoid(10 * (attention - 0.5))
    masked = image01 - soft * image01
    gt = torch.zeros(size, size)
    gt[size // 4 : size // 2, size // 4 : size // 2] = 1
    return image01, attention, soft, masked, gt


def test_jet_endpoints_are_dark_blue_and_dark_red():
    assert JET_LUT.shape == (256, 3)
    assert JET_LUT[0].tolist() == pytest.approx([0.0, 0.0, 0.5])
    assert JET_LUT[-1].tolist() == pytest.approx([0.5, 0.0, 0.0])
    colours = heatmap(torch.tensor([[0.0, 1.0]]))
    assert colours[:, 0, 0].tolist() == pytest.approx([0.0, 0.0, 0.5])
    assert colours[:, 0, 1].tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert heatmap(torch.tensor([[0.5]]))[1, 0, 0] == pytest.approx(1.0)  # green in the middle


def test_heatmap_and_overlay_shapes_and_ranges():
    image01, attention, *_ = tiny_sample()
    heat = heatmap(attention * 3 - 1)  # out-of-range values are clamped, not wrapped
    assert heat.shape == (3, 64, 64)
    assert heat.min() >= 0 and heat.max() <= 1
    mixed = overlay(image01, attention[None], alpha=0.5)
    assert mixed.shape == (3, 64, 64)
    assert mixed.min() >= 0 and mixed.max() <= 1
    assert torch.allclose(overlay(image01, attention, alpha=0.0), image01)
    # A 7x7 Grad-CAM is resized to the image.
    assert overlay(image01, torch.rand(7, 7)).shape == (3, 64, 64)


def test_denormalise_inverts_normalisation():
    image01, *_ = tiny_sample()
    normalised = (image01 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    back = denormalise(normalised, MEAN, STD)
    assert torch.allclose(back, image01, atol=1e-6)
    assert denormalise(normalised * 10, MEAN, STD).max() <= 1


@pytest.mark.parametrize(("size", "scale", "tile"), [(64, None, 128), (224, None, 224), (64, 1, 64), (32, 3, 96)])
def test_panel_size_follows_scale(size, scale, tile):
    panel = attention_panel(*tiny_sample(size), scale=scale)
    assert isinstance(panel, Image.Image) and panel.mode == "RGB"
    assert panel.size == (5 * tile + 4 * SEPARATOR_PX, tile)


def test_panel_tiles_separators_and_caption():
    image01, attention, soft, masked, gt = tiny_sample()
    panel = attention_panel(image01, attention, soft, masked, gt, scale=1)
    rgb = pixels(panel)
    assert (rgb[:, 64 : 64 + SEPARATOR_PX] == 255).all()  # white separator after the first tile
    first = rgb[:, :64].permute(2, 0, 1).float() / 255
    assert torch.allclose(first, image01, atol=1 / 255)
    gt_tile = rgb[:, 4 * (64 + SEPARATOR_PX) :, 0]
    assert set(gt_tile.unique().tolist()) == {0, 255}

    captioned = attention_panel(image01, attention, soft, masked, gt, caption="cat / dog\np=0.93", scale=1)
    assert captioned.width == panel.width and captioned.height > panel.height


def test_panel_without_gt_mask_shows_a_neutral_tile():
    image01, attention, soft, masked, _ = tiny_sample()
    panel = attention_panel(image01, attention, soft, masked, None, scale=2)
    tile = pixels(panel.crop((4 * (128 + SEPARATOR_PX), 0, panel.width, 128))).reshape(-1, 3)
    # Mostly flat grey, with some lighter "no mask" text pixels.
    grey = (tile == tile.mode(dim=0).values).all(dim=1).float().mean()
    assert grey > 0.8
    assert tile.unique(dim=0).shape[0] > 1


def test_panel_rejects_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        attention_panel(*tiny_sample(), scale=0)


def test_save_panels_writes_a_readable_png(tmp_path):
    sample = tiny_sample()
    panels = [attention_panel(*sample, caption="a"), attention_panel(*sample[:4], None, scale=1)]
    path = tmp_path / "sub" / "epoch_3.png"
    save_panels(panels, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["epoch_3.png"]  # no temp file left behind
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (panels[0].width, panels[0].height + SEPARATOR_PX + panels[1].height)
    save_panels(panels[1:], path)  # overwrite in place
    with Image.open(path) as img:
        assert img.size == panels[1].size


def test_save_panels_needs_a_panel(tmp_path):
    with pytest.raises(ValueError, match="no panels"):
        save_panels([], tmp_path / "x.png")
