"""Tests for decoding image and mask files of every PIL mode (gain_exp/data/images.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gain_exp.data.images import UnreadableFile, check_image, load_rgb, mask_array, to_rgb

# 16-bit values and their 8-bit readings (v / 257 rounded): nothing saturates below full scale.
WIDE = np.array([[0, 128, 129, 257, 32896, 65279, 65535, 1000]], np.uint16)
NARROW = np.array([[0, 0, 1, 1, 128, 254, 255, 4]], np.uint8)


def _rgb(im: Image.Image) -> np.ndarray:
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == im.size
    return np.asarray(out)


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, -1)


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_16_bit_grey_is_scaled_not_clipped(dtype):
    im = Image.fromarray(WIDE.astype(dtype))
    assert im.mode in ("I;16", "I;16B")
    assert np.array_equal(_rgb(im), _grey3(NARROW))


def test_32_bit_int_reads_as_16_bit_and_rejects_other_ranges():
    assert np.array_equal(_rgb(Image.fromarray(WIDE.astype(np.int32))), _grey3(NARROW))
    with pytest.raises(ValueError, match="image x.tif is a 32-bit integer image with values -1..70000 outside 0-65535"):
        to_rgb(Image.fromarray(np.array([[-1, 70000]], np.int32)), "x.tif")


def test_float_images_by_range():
    unit = np.array([[0.0, 0.5, 1.0]], np.float32)
    assert np.array_equal(_rgb(Image.fromarray(unit)), _grey3(np.array([[0, 128, 255]], np.uint8)))
    byte = np.array([[0.0, 7.4, 254.6]], np.float32)
    assert np.array_equal(_rgb(Image.fromarray(byte)), _grey3(np.array([[0, 7, 255]], np.uint8)))
    for bad in (np.array([[0.0, 300.0]], np.float32), np.array([[np.nan, 0.5]], np.float32)):
        with pytest.raises(ValueError, match="image f.tif is a float image with values outside"):
            to_rgb(Image.fromarray(bad), "f.tif")


def test_alpha_is_composited_onto_black():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
    assert np.array_equal(_rgb(Image.fromarray(rgba, "RGBA")), [[[200, 100, 50], [0, 0, 0], [100, 50, 25]]])
    la = np.array([[[200, 255], [200, 0]]], np.uint8)
    assert np.array_equal(_rgb(Image.fromarray(la, "LA")), [[[200] * 3, [0] * 3]])
    assert np.array_equal(_rgb(Image.fromarray(la, "LA").convert("La")), [[[200] * 3, [0] * 3]])
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50])
    assert np.array_equal(_rgb(palette), [[[10, 20, 30], [200, 100, 50]]])
    palette.info["transparency"] = 1  # palette index 1 is fully transparent
    assert np.array_equal(_rgb(palette), [[[10, 20, 30], [0, 0, 0]]])


def test_other_modes():
    bits = Image.fromarray(np.array([[0, 1]], bool))
    assert bits.mode == "1" and np.array_equal(_rgb(bits), [[[0] * 3, [255] * 3]])
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.array_equal(_rgb(cmyk), [[[255, 0, 0]]])
    rgb = Image.new("RGB", (2, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb  # the common case costs nothing


def test_files_round_trip_and_errors(tmp_path: Path):
    png = tmp_path / "wide.png"
    Image.fromarray(WIDE).save(png)
    assert np.array_equal(np.asarray(load_rgb(png)), _grey3(NARROW))
    assert check_image(png) == (8, 1)
    jpg = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 64, 3)).astype(np.uint8)).save(jpg)
    assert check_image(jpg) == (64, 40)  # the full size, though the check decodes at 1/8 scale
    jpg.write_bytes(jpg.read_bytes()[:-400])
    with pytest.raises(UnreadableFile, match=f"cannot decode image {jpg} .*truncated"):
        check_image(jpg)
    with pytest.raises(UnreadableFile, match=f"cannot decode image {jpg} .*truncated"):
        load_rgb(jpg)
    with pytest.raises(FileNotFoundError, match=f"image file {tmp_path / 'gone.png'} does not exist"):
        load_rgb(tmp_path / "gone.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UnreadableFile, match="cannot read image file .*notes.png: it is not an image"):
        check_image(tmp_path / "notes.png")


def test_masks_keep_their_stored_values(tmp_path: Path):
    mask = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(mask)
    arr, fmt = mask_array(mask, "fix it.")
    assert arr.tolist() == [[0, 65535]] and fmt == "PNG"
    Image.fromarray(np.array([[0, 1]], bool)).save(mask)
    assert mask_array(mask, "fix it.")[0].tolist() == [[0, 1]]
    Image.new("RGB", (2, 1)).save(mask)
    with pytest.raises(ValueError, match=f"^ds: mask {mask} is a RGB image with 3 channel\\(s\\); fix it.$"):
        mask_array(mask, "fix it.", "ds: ")
