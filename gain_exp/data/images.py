"""Decoding image and mask files for the file-backed datasets: every PIL mode to 8-bit RGB, masks to integer arrays.

Images become 8-bit RGB by a fixed rule per PIL mode (the same for every file, so images stay comparable):

- "RGB" as is; "L", "1", "CMYK", "YCbCr" and other colour modes through PIL's own conversion.
- 16-bit grey ("I;16", "I;16B", "I;16L", ...): divided by 257, so 65535 -> 255 (scaled by the bit depth, never
  clipped; 12-bit data stored in 16 bits therefore reads dark, as it would in any 16-bit viewer).
- "I" (32-bit int, how older Pillow opens 16-bit PNGs): the same as 16-bit; values outside 0-65535 are an error.
- "F" (float): values in [0, 1] are multiplied by 255, values in [0, 255] kept; anything else (or NaN) is an error.
- Transparency ("RGBA", "LA", "PA", "P" with a transparent colour, premultiplied "RGBa"/"La"): composited onto
  black, i.e. colour times alpha, so fully transparent pixels read black whatever colour they store (black is also
  what the geometric augmentations fill in) and opaque images are unchanged.

Masks are read as they are stored (no scaling): single-channel integer modes ("1", "L", "P", "I", "I;16...") give
their integer values, everything else is an error that names the file.

Errors: a file that cannot be opened or decoded (not an image, truncated, or more pixels than ``max_pixels``: a
decompression bomb, checked from the header before any pixel is decoded) raises UnreadableFile and a missing file
FileNotFoundError (the datasets skip and count those unless strict); a decodable file whose content is wrong (an
unsupported mode, out-of-range values, a mask with several channels) raises a plain ValueError, which stops the run.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL.Image

MAX_16BIT = 65535
TO_8BIT = 257  # 65535 / 255: maps the 16-bit range exactly onto the 8-bit one
MASK_MODES = ("1", "L", "P", "I")  # plus every "I;16..." variant
MAX_PIXELS = 89_478_485  # dataset.max_pixels' default: Pillow's own limit (a 9459 x 9459 image)


class UnreadableFile(ValueError):
    """A file that cannot be opened or decoded (not an image, truncated); datasets skip and count it unless strict."""


def to_rgb(im: PIL.Image.Image, path: Path | str = "<image>") -> PIL.Image.Image:
    """The image as 8-bit RGB by the module's per-mode rule; ValueError naming ``path`` if it has no 8-bit reading."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > MAX_16BIT):
            raise ValueError(
                f"image {path} is a 32-bit integer image with values {arr.min()}..{arr.max()} outside 0-{MAX_16BIT};"
                " save it as an 8- or 16-bit image."
            )
        return _grey(np.rint(arr / TO_8BIT))
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and (np.isnan(arr).any() or arr.min() < 0 or arr.max() > 255):
            raise ValueError(
                f"image {path} is a float image with values outside [0, 1] and [0, 255] (or NaN); save it scaled to"
                " [0, 1] or as an 8- or 16-bit image."
            )
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return _grey(np.rint(arr * scale))
    if mode == "La":  # premultiplied: the grey channel already is the composite onto black
        return im.getchannel("L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        black = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return PIL.Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError:
        raise ValueError(
            f"image {path} has the PIL mode {mode}, which has no RGB conversion; save it as an RGB PNG or JPEG."
        ) from None


def _grey(values: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(values.astype(np.uint8), "L").convert("RGB")


def load_rgb(path: Path, max_pixels: int | None = MAX_PIXELS) -> PIL.Image.Image:
    """Decode the whole image (so truncation shows up here, not inside a transform) as 8-bit RGB."""
    with _open(path, "image", max_pixels=max_pixels) as im:
        _decode(im, path, "image")
        return to_rgb(im, path)


def check_image(path: Path, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after decoding the whole file, so a truncated or unconvertible image is found before training."""
    with _open(path, "image", max_pixels=max_pixels) as im:
        size = im.size
        if im.format == "JPEG":
            # A 1/8-scale JPEG decode still reads every byte (so truncation shows) at a fraction of the cost,
            # and every JPEG mode converts to RGB.
            im.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
            _decode(im, path, "image")
        else:
            _decode(im, path, "image")
            to_rgb(im, path)
        return size


def header_size(path: Path, source: str = "", max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the file's header alone (no pixels decoded): where box coordinates need the image size."""
    with _open(path, "image", source, max_pixels) as im:
        return im.size


def mask_array(
    path: Path, fix: str, source: str = "", max_pixels: int | None = MAX_PIXELS
) -> tuple[np.ndarray, str | None]:
    """(H x W integer values as stored, file format) of a single-channel mask; ``fix`` ends the wrong-mode error."""
    with _open(path, "mask", source, max_pixels) as im:
        _decode(im, path, "mask", source)
        if im.format == "JPEG":
            return np.asarray(im.convert("L")), im.format
        if im.mode not in MASK_MODES and not im.mode.startswith("I;16"):
            raise ValueError(f"{source}mask {path} is a {im.mode} image with {len(im.getbands())} channel(s); {fix}")
        arr = np.asarray(im)
        return (arr.astype(np.uint8) if arr.dtype == bool else arr), im.format


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Pillow's global decompression-bomb limit off while a file is opened and decoded: ``_open`` applies
    ``max_pixels`` itself, from the header, so the limit is the dataset's (higher or lower than Pillow's)."""
    pillows = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = pillows


def _open(path: Path, what: str, source: str = "", max_pixels: int | None = MAX_PIXELS) -> PIL.Image.Image:
    try:
        with _own_pixel_limit():
            im = PIL.Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{source}{what} file {path} does not exist; restore it or remove it from the split."
        ) from None
    except PIL.UnidentifiedImageError:
        raise UnreadableFile(
            f"{source}cannot read {what} file {path}: it is not an image; replace it with a valid image or delete it."
        ) from None
    except OSError as e:
        raise UnreadableFile(
            f"{source}cannot read {what} file {path} ({e}); replace it with a valid image or delete it."
        ) from None
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise UnreadableFile(
            f"{source}{what} file {path} is {width} x {height} = {width * height:,} pixels, over "
            f"dataset.max_pixels={max_pixels:,} (a decompression bomb, or an outsized image); shrink it, or raise "
            f"dataset.max_pixels if it is a real image."
        )
    return im


def _decode(im: PIL.Image.Image, path: Path, what: str, source: str = "") -> None:
    try:
        with _own_pixel_limit():  # the size was checked on opening; some formats check again while decoding
            im.load()
    except OSError as e:
        raise UnreadableFile(
            f"{source}cannot decode {what} {path} ({e}); it is corrupt or truncated, replace it or delete it."
        ) from None
