"""Heat-map and overlay images for people to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage


def heat_rgb(amap: torch.Tensor, scale: float) -> np.ndarray:
    """[H, W] anomaly map -> uint8 RGB jet image; `scale` maps to the top of the colour range.

    The scale is fixed by the model (twice the worst training score), so colours mean
    the same thing on every image instead of being stretched per image.
    """
    v = (amap.float() / max(scale, 1e-12)).clamp(0, 1).cpu().numpy()
    return (colormaps["jet"](v)[..., :3] * 255).round().astype(np.uint8)


def overlay_rgb(image: torch.Tensor, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [3, H, W] image in [0,1] with a heat image of the same size."""
    img = (image.permute(1, 2, 0).cpu().numpy() * 255).astype(np.float32)
    return ((1 - alpha) * img + alpha * heat.astype(np.float32)).round().clip(0, 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The 1-pixel inner border of a boolean [H, W] mask, to draw a region without hiding it."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


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
