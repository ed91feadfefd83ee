"""Heat maps, overlays, outlines and region boxes as uint8 RGB arrays.

numpy and Pillow only, so the torch-free scoring runtime draws exactly what `predict` draws.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .outputs import replacing
from .thresholds import ScoreScale

# matplotlib's "inferno" sampled at 33 evenly spaced points (its colours, as hex); interpolated to 256 entries it
# is within 2 levels in 255 of matplotlib's table (tested). Its luminance rises from black to a pale yellow, so
# the strongest anomaly is the brightest colour, and the map reads in greyscale too.
_INFERNO_33 = (
    "000004 040312 0b0724 150b37 210c4a 2f0a5b 3d0965 4a0c6b 57106e 64156e 71196e 7d1e6d 8a226a 972766 a32c61"
    " b0315b bc3754 c63d4d d04545 da4e3c e35933 eb6429 f1711f f67e14 f98c0a fb9b06 fcaa0f fbba1f f9c932 f5d949"
    " f2e865 f3f586 fcffa4"
)
_ANCHORS = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _INFERNO_33.split()], dtype=np.float64)
INFERNO = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), c) for c in _ANCHORS.T], 1)
COLOURS = INFERNO.round().astype(np.uint8)  # [256, 3]


def heat_rgb(amap, scale: ScoreScale) -> np.ndarray:
    """[H, W] anomaly map -> uint8 RGB inferno image on the model's fixed colour scale: a typical good pixel
    black, the pixel threshold at the middle (where the colours turn from purple to orange), `ScoreScale.TOP`
    and above pale yellow. Colours mean the same on every image and every model."""
    position = scale.colour_position(np.asarray(amap, dtype=np.float32))
    return COLOURS[np.minimum((position * 256).astype(np.int64), 255)]


def overlay_rgb(image, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [3, H, W] image in [0,1] with a heat image of the same size."""
    img = (np.asarray(image, dtype=np.float32).transpose(1, 2, 0) * 255).astype(np.float32)
    return ((1 - alpha) * img + alpha * heat.astype(np.float32)).round().clip(0, 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel inner border of a boolean [H, W] mask (its pixels with a 4-neighbour outside it, the
    image's edge counting as outside), to draw a region without hiding it."""
    mask = np.asarray(mask, dtype=bool)
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def draw_boxes(rgb: np.ndarray, boxes: list[dict], color=(255, 214, 0), width: int = 2) -> np.ndarray:
    """`rgb` [H, W, 3] with the frame of each region box ({x, y, width, height}) drawn in place, inside the
    box so a box at the border stays visible."""
    for b in boxes:
        x0, y0, x1, y1 = b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]
        t = max(1, min(width, b["width"] // 2, b["height"] // 2))
        for sl in ((slice(y0, y0 + t), slice(x0, x1)), (slice(y1 - t, y1), slice(x0, x1)),
                   (slice(y0, y1), slice(x0, x0 + t)), (slice(y0, y1), slice(x1 - t, x1))):
            rgb[sl] = color
    return rgb


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Written under a temporary name and renamed: a killed run leaves no half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path


def colour_bar(height: int, scale: ScoreScale, width: int = 120) -> np.ndarray:
    """A vertical colour bar [height, width, 3] for heat maps on `scale`: the colours with the top at the
    top, ticks at a typical good pixel (0), the pixel threshold (1, marked by a white line across the
    bar) and `ScoreScale.TOP`, labelled on that one scale. Pillow's built-in font: no font files needed."""
    height = max(int(height), 48)
    bar_w, pad = 20, 6
    rgb = np.full((height, width, 3), 255, dtype=np.uint8)
    top, bottom = pad, height - pad
    rows = np.arange(top, bottom)
    position = 1.0 - (rows - top) / max(bottom - top - 1, 1)
    rgb[top:bottom, pad : pad + bar_w] = COLOURS[np.minimum((position * 256).astype(np.int64), 255)][:, None]
    image = Image.fromarray(rgb)
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=13)
    for value, text in ((0.0, "0 good"), (1.0, "1 threshold"), (ScoreScale.TOP, f"{ScoreScale.TOP:g} defect")):
        p = float(scale.colour_position(scale.raw(value)))
        y = int(round(bottom - 1 - p * (bottom - top - 1)))
        if value == 1.0:
            draw.line([(pad - 3, y), (pad + bar_w + 2, y)], fill=(255, 255, 255), width=2)
            draw.line([(pad - 3, y - 2), (pad + bar_w + 2, y - 2)], fill=(0, 0, 0), width=1)
        draw.line([(pad + bar_w, y), (pad + bar_w + 4, y)], fill=(0, 0, 0), width=1)
        draw.text((pad + bar_w + 6, min(max(y - 7, 0), height - 15)), text, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def with_legend(rgb: np.ndarray, scale: ScoreScale) -> np.ndarray:
    """`rgb` [H, W, 3] with the colour bar of `scale` to its right (`predict --legend`); an image lower than the
    bar's least height gets a white strip below it."""
    bar = colour_bar(rgb.shape[0], scale)
    if bar.shape[0] > rgb.shape[0]:
        rgb = np.concatenate([rgb, np.full((bar.shape[0] - rgb.shape[0], *rgb.shape[1:]), 255, np.uint8)], axis=0)
    return np.concatenate([rgb, bar], axis=1)
