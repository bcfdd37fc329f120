"""Attention panels: colours, sizes, value ranges and the written PNG."""

import pytest
import torch
from PIL import Image

from gain_exp.output.panels import (
    HEADER_BG,
    JET_LUT,
    SEPARATOR_PX,
    attention_panel,
    denormalise,
    header_layout,
    heatmap,
    overlay,
    panel_columns,
    panel_header,
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
        header = header_layout(128, 128).height  # the first strip's tiles set the header
        assert img.size == (panels[0].width, header + panels[0].height + SEPARATOR_PX + panels[1].height)
    save_panels(panels[1:], path)  # overwrite in place
    with Image.open(path) as img:
        assert img.size == (panels[1].width, header_layout(64, 64).height + panels[1].height)


def test_save_panels_needs_a_panel(tmp_path):
    with pytest.raises(ValueError, match="no panels"):
        save_panels([], tmp_path / "x.png")


def test_panel_columns_name_the_tiles_drawn():
    assert panel_columns(True) == ("image", "attention", "soft mask T(A)", "masked image I*", "ground truth")
    # Without a mask the last tile is still drawn (flat grey, "no mask"), and its label says so.
    assert panel_columns(False)[:4] == panel_columns(True)[:4]
    assert len(panel_columns(False)) == 5 and panel_columns(False)[4] == "no ground truth"
    panel = attention_panel(*tiny_sample(), scale=1)
    assert panel.width == len(panel_columns(True)) * (64 + SEPARATOR_PX) - SEPARATOR_PX


@pytest.mark.parametrize("has_mask", [True, False])
def test_saved_sheet_has_a_header_with_labels_and_a_jet_colour_bar(tmp_path, has_mask):
    image01, attention, soft, masked, gt = tiny_sample()
    panels = [attention_panel(image01, attention, soft, masked, gt if has_mask else None, caption="a") for _ in "ab"]
    path = tmp_path / "sheet.png"
    save_panels(panels, path)
    layout = header_layout(128, 128)
    with Image.open(path) as img:
        sheet = img.convert("RGB")
    # Taller by the header exactly, and the panels below it unchanged.
    assert sheet.size == (panels[0].width, layout.height + 2 * panels[0].height + SEPARATOR_PX)
    below = sheet.crop((0, layout.height, panels[0].width, layout.height + panels[0].height))
    assert torch.equal(pixels(below), pixels(panels[0]))
    # The header is the one for the columns drawn: the mask column's label follows the data.
    header = sheet.crop((0, 0, sheet.width, layout.height))
    assert torch.equal(pixels(header), pixels(panel_header(128, 128, has_mask)))
    assert not torch.equal(pixels(header), pixels(panel_header(128, 128, not has_mask)))
    # Every column has dark label pixels over it; the rest of the header is its plain background.
    rgb = pixels(header)
    for i in range(5):
        cell = rgb[:, i * (128 + SEPARATOR_PX) : i * (128 + SEPARATOR_PX) + 128]
        assert (cell.int().sum(dim=2) < 200).sum() > 20, f"no label over column {i}"
    assert (rgb == torch.tensor(HEADER_BG, dtype=torch.uint8)).all(dim=2).float().mean() > 0.5
    # The colour bar sits over the attention column: jet's 0 (blue) on the left, 1 (red) on the right.
    x0, y0, x1, y1 = layout.bar
    assert 128 + SEPARATOR_PX <= x0 < x1 <= 2 * 128 + SEPARATOR_PX and 0 <= y0 < y1 <= layout.height
    r, g, b = rgb[(y0 + y1) // 2, x0].tolist()
    assert b > 100 and b > r + 50 and b > g + 50
    r, g, b = rgb[(y0 + y1) // 2, x1 - 1].tolist()
    assert r > 100 and r > g + 50 and r > b + 50
    assert torch.equal(rgb[(y0 + y1) // 2, x0], (JET_LUT[0] * 255).round().to(torch.uint8))
    assert torch.equal(rgb[(y0 + y1) // 2, x1 - 1], (JET_LUT[-1] * 255).round().to(torch.uint8))


def test_header_labels_fit_small_tiles_and_the_sheet_is_deterministic(tmp_path):
    small = header_layout(64, 64)
    assert small.font_size < header_layout(128, 128).font_size  # shrunk so "masked image I*" fits 64 px
    sample = tiny_sample()
    for name in ("a.png", "b.png"):
        save_panels([attention_panel(*sample, scale=1), attention_panel(*sample[:4], None, scale=1)], tmp_path / name)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as img:
        assert img.height == small.height + 2 * 64 + SEPARATOR_PX


def test_save_panels_of_plain_images_adds_no_header(tmp_path):
    plain = Image.new("RGB", (40, 30), "red")
    save_panels([plain], tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as img:
        assert img.size == (40, 30)
