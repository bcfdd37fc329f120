"""Decompression bombs and outsized images in folder datasets (issue 27): ``dataset.max_pixels`` is checked from the
header before any pixel is decoded; a file over it is unreadable like any other (skipped and counted, or one sentence
with strict=true), and Pillow's own DecompressionBombError never surfaces."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from fixtures_data import make_mask_folder
from PIL import Image

from gain_exp.data.images import MAX_PIXELS, UnreadableFile, check_image, header_size, load_rgb
from gain_exp.data.mask_folder import build

SIZE = 24
pytestmark = pytest.mark.usefixtures("one_thread")


def bomb_png(path: Path, width: int = 30_000, height: int = 30_000) -> Path:
    """A PNG of a few hundred bytes whose header declares width x height 1-bit pixels (900 M by default: ten times
    Pillow's limit); its pixel data is one zero row, so decoding would fail, but nothing should get that far."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    pixels = zlib.compress(b"\x00" * (1 + (width + 7) // 8))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def _build(root: Path, **kwargs):
    return build(root=str(root), **{"image_size": SIZE, "negative_class": "negative", **kwargs})


def test_a_bomb_is_unreadable_from_its_header_in_every_reader(tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    sentence = (
        f"image file {bomb} is 30000 x 30000 = 900,000,000 pixels, over dataset.max_pixels={MAX_PIXELS:,} (a "
        f"decompression bomb, or an outsized image); shrink it, or raise dataset.max_pixels if it is a real image."
    )
    for read in (check_image, load_rgb, header_size):
        with pytest.raises(UnreadableFile) as caught:
            read(bomb)
        assert str(caught.value) == sentence
    assert header_size(bomb, max_pixels=None) == (30_000, 30_000)  # headers alone are safe to read


def test_a_bomb_in_a_split_is_skipped_and_counted_or_one_sentence_when_strict(tmp_path, caplog):
    root = make_mask_folder(tmp_path / "data", size=SIZE)
    bomb = sorted((root / "val" / "negative").glob("*.png"))[0]  # in place of a real image
    bomb_png(bomb)
    with pytest.raises(UnreadableFile, match=rf"^image file {bomb} is 30000 x 30000"):
        _build(root, strict=True)
    with caplog.at_level(logging.WARNING):
        splits = _build(root)
    assert bomb not in splits.val.images and len(splits.val) == 11 and splits.extras["skipped_files"] == 1
    assert caplog.text.count("900,000,000 pixels") == 1


def test_a_bomb_mask_costs_only_the_mask(tmp_path):
    root = make_mask_folder(tmp_path / "data", size=SIZE)
    mask = root / "train" / "lesion" / "img_001_mask.png"
    bomb_png(mask)
    splits = _build(root)
    k = splits.train.images.index(mask.with_name("img_001.png"))
    assert splits.train.masks[k] is None and splits.extras["skipped_files"] == 1


def test_the_pixel_limit_is_the_datasets_own(tmp_path):
    root = make_mask_folder(tmp_path / "data", size=SIZE)
    big = root / "val" / "negative" / "img_001.png"
    Image.fromarray(np.zeros((2 * SIZE, 2 * SIZE, 3), np.uint8)).save(big)  # a real image, 4x the others' pixels
    assert big in _build(root).val.images
    limited = _build(root, max_pixels=SIZE * SIZE)
    assert big not in limited.val.images and limited.extras["skipped_files"] == 1
    for wrong in (0, -5):
        with pytest.raises(ValueError, match=rf"^mask_folder dataset: max_pixels={wrong} must be a pixel count of 1"):
            _build(root, max_pixels=wrong)


@pytest.mark.slow
def test_the_app_with_a_bomb_and_strict_is_one_sentence(tmp_path):
    root = make_mask_folder(tmp_path / "data", size=SIZE)
    bomb_png(root / "train" / "negative" / "img_002.png")
    args = [
        "dataset=mask_folder",
        f"dataset.root={root}",
        f"dataset.image_size={SIZE}",
        "dataset.negative_class=negative",
        "dataset.strict=true",
        "backbone.name=test_resnet",
        "trainer.epochs=1",
        "trainer.device=cpu",
        "logger=json",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gain_exp.run", *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: image file ")
    assert "900,000,000 pixels, over dataset.max_pixels" in done.stderr
