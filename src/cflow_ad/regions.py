"""Defect regions: the connected parts of a defect mask, as the objects inspection software counts.

numpy only (no scipy, no torch), so the same code runs in the lean scoring runtime. The mask
is labelled by its horizontal runs: runs of neighbouring rows that touch are joined, which
takes a few vectorised passes however large the image, instead of a loop over pixels.
"""

from __future__ import annotations

import numpy as np


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, end) of every horizontal run of True, end exclusive, in raster order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    rows, starts = np.nonzero(np.diff(padded, axis=1) == 1)
    _, ends = np.nonzero(np.diff(padded, axis=1) == -1)
    return rows, starts, ends


def _components(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int, connectivity: int) -> np.ndarray:
    """A component index per run, numbered in raster order of each component's first pixel (as
    scipy.ndimage.label numbers them)."""
    n = rows.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    reach = 1 if connectivity == 8 else 0  # diagonal neighbours count for 8-connectivity
    stride = width + 2 * reach + 2  # keys of different rows never meet
    start_keys, end_keys = rows * stride + starts, rows * stride + ends
    below = (rows + 1) * stride  # each run moved one row down, to find the runs it touches there
    lo = np.searchsorted(end_keys, below + starts - reach, side="right")
    hi = np.searchsorted(start_keys, below + ends + reach, side="left")
    count = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(n), count)
    b = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())
    labels = np.arange(n)
    while True:  # min-label propagation with pointer jumping: few passes for real masks
        low = np.minimum(labels[a], labels[b])
        new = labels.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, labels):
            break
        labels = new
    _, first, index = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[index]


def label(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """(labels [H, W] int32 with 0 for background and 1..n per component, n) of a boolean [H, W] mask;
    `connectivity` 8 joins diagonal neighbours, 4 only edge neighbours."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    rows, starts, ends = _runs(mask)
    comp = _components(rows, starts, ends, mask.shape[1], connectivity)
    out = np.zeros(mask.shape, dtype=np.int32)
    out[mask] = np.repeat(comp + 1, ends - starts)  # raster order, as the runs
    return out, int(comp.max() + 1) if comp.size else 0


def regions(mask: np.ndarray, amap: np.ndarray, min_area: float = 0, connectivity: int = 8,
            scale: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, list[dict]]:
    """(the mask without its regions under `min_area` pixels, the regions kept) of a boolean [H, W]
    mask. Each region has its bounding box (x, y, width, height in pixels), its area in pixels and the
    peak and mean of `amap` [H, W] over it; they come sorted by peak score, highest first. `scale`: the
    (height, width) of a mask pixel in the image's own pixels, where the mask is a shrunk copy's (a
    service's large upload); boxes, areas and `min_area` are in the image's own pixels then."""
    mask = np.asarray(mask, dtype=bool)
    rows, starts, ends = _runs(mask)
    if rows.size == 0:
        return mask.copy(), []
    comp = _components(rows, starts, ends, mask.shape[1], connectivity)
    n = int(comp.max()) + 1
    lengths = ends - starts
    sy, sx = scale
    pixels = np.bincount(comp, weights=lengths, minlength=n)
    area = pixels * (sy * sx)
    x0, y0 = np.full(n, mask.shape[1]), np.full(n, mask.shape[0])
    x1, y1 = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    np.minimum.at(x0, comp, starts)
    np.minimum.at(y0, comp, rows)
    np.maximum.at(x1, comp, ends)
    np.maximum.at(y1, comp, rows + 1)
    x0, y0 = np.floor(x0 * sx).astype(np.int64), np.floor(y0 * sy).astype(np.int64)
    x1, y1 = np.round(x1 * sx).astype(np.int64), np.round(y1 * sy).astype(np.int64)
    pixel_comp = np.repeat(comp, lengths)  # the mask's pixels in raster order are the runs in order
    values = np.asarray(amap, dtype=np.float64)[mask]
    peak = np.full(n, -np.inf)
    np.maximum.at(peak, pixel_comp, values)
    total = np.bincount(pixel_comp, weights=values, minlength=n)
    keep = area >= min_area
    kept = np.zeros_like(mask)
    kept[mask] = keep[pixel_comp]
    found = [{"box": {"x": int(x0[i]), "y": int(y0[i]), "width": int(x1[i] - x0[i]), "height": int(y1[i] - y0[i])},
              "area_px": int(round(area[i])), "peak_score": float(peak[i]), "mean_score": float(total[i] / pixels[i])}
             for i in np.flatnonzero(keep)]
    return kept, sorted(found, key=lambda r: -r["peak_score"])


def defect_regions(amap: np.ndarray, threshold: float, min_area: float = 0,
                   scale: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, list[dict]]:
    """The defect regions of an [H, W] map, as `regions` gives them: the connected parts of the pixels over
    `threshold` of at least `min_area` pixels. With the calibrated region threshold (`Thresholds.region`), which
    good images rarely reach anywhere, they are what `predict` reports; with the pixel threshold, which lets
    a share of good pixels through, they include faint specks on most good images (`--all-regions`). `scale`: as
    `regions`'."""
    amap = np.asarray(amap)
    return regions(amap > threshold, amap, min_area, scale=scale)
