"""Heat maps, overlays, outlines and region boxes as uint8 RGB arrays.

numpy and Pillow only, so the torch-free scoring runtime draws exactly what `predict` draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# matplotlib's "jet" (its segment data) in 256 colours, as matplotlib samples it (equal to 1 level in 255)
_JET_SEGMENTS = (
    ((0, 0.35, 0.66, 0.89, 1), (0, 0, 1, 1, 0.5)),
    ((0, 0.125, 0.375, 0.64, 0.91, 1), (0, 0, 1, 1, 0, 0)),
    ((0, 0.11, 0.34, 0.65, 1), (0.5, 1, 1, 0, 0)),
)

JET = np.stack([np.interp(np.linspace(0, 1, 256), x, y) for x, y in _JET_SEGMENTS], 1)
_JET_RGB = (JET * 255).round().astype(np.uint8)


def heat_rgb(amap, scale: float) -> np.ndarray:
    """[H, W] anomaly map -> uint8 RGB jet image; `scale` maps to the top of the colour range.

    The scale is fixed by the model (twice the worst training score), so colours mean
    the same thing on every image instead of being stretched per image.
    """
    v = np.clip(np.asarray(amap, dtype=np.float32) / max(scale, 1e-12), 0, 1)
    return _JET_RGB[np.minimum((v * 256).astype(np.int64), 255)]


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


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path
