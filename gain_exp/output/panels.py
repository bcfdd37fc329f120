"""Attention overlay panels as plain PNGs (PIL + torch, no plotting library)."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from gain_exp.output.files import atomic_write, jsonable

SEPARATOR_PX = 2
MIN_TILE_PX = 128  # auto-scaling target: 64 px images are unreadable at their own size
NO_MASK_GREY = 0.35  # darker than a soft mask's midpoint, lighter than a mask's background
COLUMNS = ("image", "attention", "soft mask T(A)", "masked image I*", "ground truth")  # a strip's tiles, in order
NO_MASK_COLUMN = "no ground truth"  # the last column's label on a sheet where no image has a pixel mask
PANEL_INFO = "gain_exp.panel"  # key in a strip's PIL ``info``: its tile size and whether it has a mask (for the header)
HEADER_BG = (242, 242, 242)  # light grey, so the header row stands apart from the white caption rows
_PAD = 4

# matplotlib's "jet" as (position, value) knots per channel; sampled at 256 points below.
_JET_KNOTS = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


def _jet_lut(n: int = 256) -> torch.Tensor:
    """n x 3 RGB table of the jet colour map, piecewise linear between the knots."""
    x = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    channels = []
    for knots in _JET_KNOTS:
        xp = torch.tensor([k[0] for k in knots], dtype=torch.float64)
        fp = torch.tensor([k[1] for k in knots], dtype=torch.float64)
        hi = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
        lo = hi - 1
        t = (x - xp[lo]) / (xp[hi] - xp[lo])
        channels.append(fp[lo] + t * (fp[hi] - fp[lo]))
    return torch.stack(channels, dim=1).float()


JET_LUT = _jet_lut()


def denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo per-channel normalisation: 3 x H x W -> 3 x H x W in [0, 1]."""
    image = image.detach().float().cpu()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image * std_t + mean_t).clamp(0.0, 1.0)


def heatmap(attention: torch.Tensor) -> torch.Tensor:
    """Colour an H x W map in [0, 1] with jet: 3 x H x W RGB in [0, 1]."""
    att = _as_map(attention).nan_to_num(0.0).clamp(0.0, 1.0)
    # Same binning as matplotlib: value v falls in bin floor(v * 256), with 1.0 in the last bin.
    idx = (att * len(JET_LUT)).long().clamp(max=len(JET_LUT) - 1)
    return JET_LUT[idx].permute(2, 0, 1)


def overlay(image01: torch.Tensor, attention: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend a jet heat-map of the attention over a [0, 1] image: 3 x H x W."""
    image01 = image01.detach().float().cpu()
    att = _resize(_as_map(attention), image01.shape[-2:], mode="bilinear")
    return ((1.0 - alpha) * image01 + alpha * heatmap(att)).clamp(0.0, 1.0)


def attention_panel(
    image01: torch.Tensor,
    attention: torch.Tensor,
    soft_mask: torch.Tensor,
    masked_image01: torch.Tensor,
    gt_mask: torch.Tensor | None = None,
    caption: str | None = None,
    scale: int | None = None,
) -> Image.Image:
    """One strip: image | attention overlay | soft mask | masked image | ground-truth mask, captioned.

    Maps of another size than the image are resized to it. ``scale`` upsamples every tile by an integer
    factor (nearest neighbour); None picks the smallest factor that makes tiles >= MIN_TILE_PX.
    """
    image01 = image01.detach().float().cpu().clamp(0.0, 1.0)
    size = image01.shape[-2:]
    if scale is None:
        scale = tile_scale(size)
    if scale < 1:
        raise ValueError(f"attention_panel scale must be a positive integer, got {scale}.")

    tiles = [
        image01,
        overlay(image01, attention),
        _grey(_resize(_as_map(soft_mask), size, mode="bilinear")),
        masked_image01.detach().float().cpu().clamp(0.0, 1.0),
        _grey(_resize(_as_map(gt_mask), size, mode="nearest"))
        if gt_mask is not None
        else torch.full_like(image01, NO_MASK_GREY),
    ]
    tiles = [upscale(t, scale) for t in tiles]
    tile_h, tile_w = tiles[0].shape[-2:]
    separator = torch.ones(3, tile_h, SEPARATOR_PX)
    strip = torch.cat([part for t in tiles for part in (t, separator)][:-1], dim=2)
    panel = to_pil(strip)

    font = ImageFont.load_default(size=max(12, tile_h // 12))
    if gt_mask is None:
        draw = ImageDraw.Draw(panel)
        left = 4 * (tile_w + SEPARATOR_PX)
        draw.text((left + tile_w / 2, tile_h / 2), "no mask", fill=(230, 230, 230), font=font, anchor="mm")
    if caption:
        panel = _add_caption(panel, caption, font)
    panel.info[PANEL_INFO] = {"tile": (tile_w, tile_h), "has_mask": gt_mask is not None}
    return panel


def panel_columns(has_mask: bool) -> tuple[str, ...]:
    """The header labels of a strip's five columns; the last one names the grey tile drawn when there is no mask."""
    return COLUMNS if has_mask else (*COLUMNS[:-1], NO_MASK_COLUMN)


@dataclass(frozen=True)
class HeaderLayout:
    """Where a sheet's header draws, for a given tile size: font size, height, colour bar box."""

    font_size: int
    height: int
    bar: tuple[int, int, int, int]  # (left, top, right, bottom) of the jet colour bar, right/bottom exclusive


def header_layout(tile_w: int, tile_h: int) -> HeaderLayout:
    """Labels in a row, one centred over each column; below the attention label, the overlay's jet scale as a bar
    from 0 (left) to 1 (right), the map's normalised range. The font shrinks until every label fits its tile."""
    room = tile_w - 2 * _PAD
    size = max(12, tile_h // 12)
    while size > 6:
        font = _font(size)
        digits = font.getlength("0") + font.getlength("1") + 4 * _PAD  # "0", gap, bar >= 2 * _PAD, gap, "1"
        if max(font.getlength(label) for label in (*COLUMNS, NO_MASK_COLUMN)) <= room and digits <= room:
            break
        size -= 1
    font = _font(size)
    ascent, descent = font.getmetrics()
    text_h = ascent + descent
    bar_top = _PAD + text_h + _PAD // 2
    left = tile_w + SEPARATOR_PX  # the attention column
    bar = (
        left + _PAD + math.ceil(font.getlength("0")) + _PAD // 2,
        bar_top + text_h // 4,
        left + tile_w - _PAD - math.ceil(font.getlength("1")) - _PAD // 2,
        bar_top + text_h - text_h // 4,
    )
    return HeaderLayout(font_size=size, height=bar_top + text_h + _PAD, bar=bar)


def panel_header(tile_w: int, tile_h: int, has_mask: bool, width: int | None = None) -> Image.Image:
    """The header row of a sheet of strips with ``tile_w`` x ``tile_h`` tiles: column labels and the colour bar."""
    layout = header_layout(tile_w, tile_h)
    width = width or len(COLUMNS) * (tile_w + SEPARATOR_PX) - SEPARATOR_PX
    header = Image.new("RGB", (width, layout.height), HEADER_BG)
    draw = ImageDraw.Draw(header)
    font = _font(layout.font_size)
    for i, label in enumerate(panel_columns(has_mask)):
        draw.text((i * (tile_w + SEPARATOR_PX) + tile_w / 2, _PAD), label, fill="black", font=font, anchor="ma")
    x0, y0, x1, y1 = layout.bar
    if x1 - x0 >= 2 and y1 > y0:  # tiles too small for a bar get the labels only
        header.paste(to_pil(heatmap(torch.linspace(0.0, 1.0, x1 - x0).expand(y1 - y0, -1))), (x0, y0))
    middle = (y0 + y1) / 2
    draw.text((x0 - _PAD // 2, middle), "0", fill="black", font=font, anchor="rm")
    draw.text((x1 + _PAD // 2, middle), "1", fill="black", font=font, anchor="lm")
    return header


def save_panels(panels: Sequence[Image.Image], path: str | os.PathLike) -> None:
    """Stack panels vertically into one PNG at ``path``, written atomically.

    Strips from ``attention_panel`` get a header row above them: the column names (``panel_columns``) and the
    overlay's colour bar, laid out for the first strip's tiles; other images are stacked as they are.
    """
    if not panels:
        raise ValueError(f"save_panels got no panels to write to {path}; pass at least one.")
    width = max(p.width for p in panels)
    infos = [p.info[PANEL_INFO] for p in panels if PANEL_INFO in p.info]
    header = panel_header(*infos[0]["tile"], has_mask=any(i["has_mask"] for i in infos), width=width) if infos else None
    top = header.height if header is not None else 0
    height = top + sum(p.height for p in panels) + SEPARATOR_PX * (len(panels) - 1)
    sheet = Image.new("RGB", (width, height), "white")
    if header is not None:
        sheet.paste(header, (0, 0))
    for panel in panels:
        sheet.paste(panel, (0, top))
        top += panel.height + SEPARATOR_PX

    with atomic_write(path) as f:  # a dashboard or a person refreshing the file never sees half a PNG
        sheet.save(f, format="PNG")


def _as_map(t: torch.Tensor) -> torch.Tensor:
    """Drop leading singleton dims so a 1 x H x W map is accepted as H x W."""
    t = t.detach().float().cpu()
    while t.ndim > 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise ValueError(f"expected an H x W map, got shape {tuple(t.shape)}.")
    return t


def _resize(t: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if tuple(t.shape) == tuple(size):
        return t
    extra = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t[None, None], size=tuple(size), mode=mode, **extra)[0, 0]


def _grey(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(0.0, 1.0).expand(3, -1, -1)


def tile_scale(size: Sequence[int]) -> int:
    """The smallest integer zoom that makes an image of ``size`` (H, W) at least MIN_TILE_PX on its short side."""
    return max(1, math.ceil(MIN_TILE_PX / min(size)))


def upscale(t: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour integer zoom of the last two dimensions."""
    return t.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy())


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _add_caption(panel: Image.Image, caption: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> Image.Image:
    """Put a white row with the (possibly multi-line) caption above the panel."""
    pad = 4
    box = ImageDraw.Draw(panel).multiline_textbbox((0, 0), caption, font=font)
    row_h = box[3] + 2 * pad
    out = Image.new("RGB", (panel.width, panel.height + row_h), "white")
    ImageDraw.Draw(out).multiline_text((pad, pad), caption, fill="black", font=font)
    out.paste(panel, (0, row_h))
    return out


@dataclass
class Panel:
    """One image's attention story, in display units ([0, 1] images, H x W maps)."""

    image: torch.Tensor  # 3 x H x W
    attention: torch.Tensor  # H x W
    mask: torch.Tensor  # H x W soft mask T(A)
    masked_image: torch.Tensor  # 3 x H x W
    gt_mask: torch.Tensor | None  # H x W 0/1, None when the image has no pixel mask
    true_classes: list[str]
    pred_classes: list[str]
    explained: str  # the class(es) the map explains
    score: float  # predicted probability of the top class
    am_drop: float  # true-class score drop on the masked image
    iou: float | None = None  # localisation IoU of this map (None without a mask)
    index: int | None = None  # position of the image in its split (None: the panel's own position)
    positive: bool = True  # binary data: the image is not of the negative class
    first: bool = True  # among the split's first images asked for (not only drawn for a positive/negative quota)

    @property
    def caption(self) -> str:
        return (
            f"true: {', '.join(self.true_classes)} | pred: {', '.join(self.pred_classes)} ({self.score:.2f})"
            f" | map: {self.explained} | AM drop {self.am_drop:+.2f}"
        )

    @functools.cached_property
    def strip(self) -> Any:
        """The PIL strip (image | overlay | soft mask | masked image | ground truth), drawn once for all backends."""
        return attention_panel(
            self.image, self.attention, self.mask, self.masked_image, self.gt_mask, caption=self.caption
        )

    def row(self, position: int) -> dict[str, Any]:
        """The per-image results row (JSON-ready) of this panel, ``position`` standing in for a missing index."""
        return {
            "index": position if self.index is None else self.index,
            "true": self.true_classes,
            "pred": self.pred_classes,
            "explained": self.explained,
            "score": jsonable(self.score),
            "am_drop": jsonable(self.am_drop),
            "iou": jsonable(self.iou),
        }
