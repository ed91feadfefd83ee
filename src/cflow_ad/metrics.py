"""Anomaly-detection metrics: image AUROC, pixel AUROC and AUPRO (numpy in, floats out).

Every figure is a plain Python float in [0, 1]; ``nan`` marks a metric that is undefined for
the data (e.g. only one class present). `Evaluation.result` and `to_json` turn it into None
(JSON null), because NaN is not JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .outputs import json_safe, to_json  # noqa: F401  (to_json: public here too)
from .regions import defect_regions

GOOD = "good"
FPR_LIMIT = 0.3  # the PRO curve's upper false-positive rate: AUPRO is its area up to here (MVTec AD's choice)


# 8-connectivity inside each image and none across images, so one ndimage.label call
# on the whole [N, H, W] stack gives the same regions as labelling image by image.
_PER_IMAGE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTED[1] = True


def _binary_auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Exact AUROC (ties count one half), or nan when only one class is present.

    Computed from one sort as the Mann-Whitney statistic, because sklearn's
    roc_auc_score takes minutes on the tens of millions of pixels of a test set.
    """
    y_true = np.asarray(y_true, dtype=bool).ravel()
    n_pos = int(np.count_nonzero(y_true))
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(y_score, axis=None)
    sorted_scores = np.asarray(y_score).ravel()[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    del sorted_scores
    pos_per_run = np.add.reduceat(y_true[order].astype(np.int64), starts)
    del order
    neg_per_run = np.diff(np.r_[starts, y_true.size]) - pos_per_run
    neg_below = np.cumsum(neg_per_run) - neg_per_run
    wins = np.sum(pos_per_run * (neg_below + 0.5 * neg_per_run), dtype=np.float64)
    return float(wins / (float(n_pos) * float(n_neg)))


def _image_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel() != 0
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    return y, s


def _pixel_arrays(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Masks as bool and maps as floats, both [N, H, W].

    Floating maps keep their dtype: casting float64 to float32 would cost an extra
    copy and could merge distinct scores into ties; other dtypes become float32.
    """
    gt = np.asarray(masks)
    if gt.dtype != bool:
        gt = gt != 0
    scores = np.asarray(maps)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float32)
    if gt.ndim != 3 or gt.shape != scores.shape:
        raise ValueError(
            f"masks and maps must both be [N, H, W] with the same shape, "
            f"got {gt.shape} and {scores.shape}"
        )
    return gt, scores


def image_auroc(labels, scores) -> float:
    """Image-level AUROC; labels are 1 for anomalous images, higher score = more anomalous."""
    y, s = _image_arrays(labels, scores)
    return _binary_auroc(y, s)


def pixel_auroc(masks, maps) -> float:
    """AUROC over every pixel of every image (masks [N, H, W] 0/1, maps [N, H, W])."""
    gt, scores = _pixel_arrays(masks, maps)
    return _binary_auroc(gt.ravel(), scores.ravel())


def _cut_at(fpr: np.ndarray, pro: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The part of the curve (fpr, pro) with fpr in [0, limit], ending exactly at ``limit``.

    ``fpr`` is non-decreasing, starts at 0 and its last point is >= limit, so the
    curve can always be cut at exactly ``limit`` by linear interpolation.
    """
    k = int(np.searchsorted(fpr, limit, side="right"))
    x, y = fpr[:k], pro[:k]
    if x[-1] < limit:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x = np.append(x, limit)
        y = np.append(y, y_at_limit)
    return x, y


def pro_curve(masks, maps, fpr_limit: float = FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve (fpr, pro) from (0, 0) up to fpr == fpr_limit (last point interpolated).

    Follows MVTec AD (Bergmann et al.): each 8-connected ground-truth component is a
    region and counts equally whatever its size, so small defects are not drowned by
    large ones.  Exact: every distinct map value is a threshold.  Vectorised: pixels
    are ranked once and the curve comes from cumulative sums, so the cost is one
    sort rather than one pass per threshold.  Empty arrays when there is no defect
    region or no defect-free pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    gt, scores = _pixel_arrays(masks, maps)
    if np.isnan(scores).any():
        raise ValueError("maps contain NaN; anomaly scores must be finite")

    regions, n_regions = ndimage.label(gt, structure=_PER_IMAGE_8_CONNECTED)
    n_neg = gt.size - int(np.count_nonzero(gt))
    if n_regions == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    flat_regions = regions.ravel()
    del regions

    # Each region adds 1 / n_regions to PRO once all its pixels pass the threshold;
    # region id 0 is the background and adds nothing to PRO.
    sizes = np.bincount(flat_regions, minlength=n_regions + 1)
    pro_weight = np.zeros(n_regions + 1)
    pro_weight[1:] = 1.0 / (sizes[1:] * float(n_regions))

    flat_scores = scores.ravel()
    order = np.argsort(flat_scores, kind="stable")[::-1]
    sorted_scores = flat_scores[order]
    # Pixels sharing a score enter the curve together: keep only the last index of
    # each run of equal values.
    run_ends = np.append(
        np.flatnonzero(sorted_scores[:-1] != sorted_scores[1:]), sorted_scores.size - 1
    )
    del sorted_scores
    sorted_regions = flat_regions[order]
    del order

    fpr = np.cumsum(sorted_regions == 0)[run_ends] / n_neg
    # Points past the first one reaching fpr_limit are cut off anyway, so PRO is
    # only accumulated over that prefix.
    keep = int(np.searchsorted(fpr, fpr_limit, side="left")) + 1
    fpr = fpr[:keep]
    run_ends = run_ends[:keep]
    pro = np.cumsum(pro_weight[sorted_regions[: run_ends[-1] + 1]])[run_ends]

    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    return _cut_at(fpr, pro, fpr_limit)


def aupro(masks, maps, fpr_limit: float = FPR_LIMIT) -> float:
    """Normalised area under the per-region-overlap curve (`pro_curve`) for FPR in [0, fpr_limit].

    A perfect detector scores 1.0; nan when there is no defect region or no
    defect-free pixel.
    """
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    if fpr.size == 0:
        return float("nan")
    return float(np.trapezoid(pro, fpr)) / fpr_limit


def roc_points(y_true, y_score, per_class: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC points (fpr, tpr) from (0, 0) to (1, 1), at most 2 * per_class + 1 of them.

    The thresholds are evenly spaced quantiles of the negatives' and of the positives'
    scores, so neighbouring points are at most about 1/per_class apart in FPR and in TPR,
    and a class of at most per_class samples contributes every one of its scores (the
    full curve). Two plain sorts: sklearn's roc_curve takes ~20 s on a test set's 38M
    pixels. Empty arrays when only one class is present.
    """
    y = np.asarray(y_true).ravel() != 0
    s = np.asarray(y_score).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    neg, pos = np.sort(s[~y]), np.sort(s[y])
    if neg.size == 0 or pos.size == 0:
        return np.zeros(0), np.zeros(0)

    def quantiles(v: np.ndarray) -> np.ndarray:
        return v[np.linspace(0, v.size - 1, min(per_class, v.size)).round().astype(np.int64)]

    thresholds = np.unique(np.concatenate((quantiles(neg), quantiles(pos))))[::-1]
    fpr = 1.0 - np.searchsorted(neg, thresholds, side="left") / neg.size
    tpr = 1.0 - np.searchsorted(pos, thresholds, side="left") / pos.size
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], tpr))


def thin_curve(x: np.ndarray, y: np.ndarray, steps: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Exact points of a non-decreasing curve, about 2 * steps at most: the first point of each of
    `steps` equal steps in x and in y, and the last one. Millions of points plot the same line."""
    if x.size == 0:
        return x, y
    bx, by = (np.floor(v / max(v[-1], 1e-12) * steps) for v in (x, y))
    keep = np.r_[True, (bx[1:] != bx[:-1]) | (by[1:] != by[:-1])]
    keep[-1] = True
    return x[keep], y[keep]


def f1_optimal_threshold(masks, maps) -> tuple[float, float]:
    """(threshold, F1) of the pixel threshold that maximises F1 over a whole set (map >= threshold
    is a defect pixel). Exact over every distinct map value, from one sort."""
    gt, scores = _pixel_arrays(masks, maps)
    flat = scores.ravel()
    order = np.argsort(flat, kind="stable")[::-1]
    sorted_scores = flat[order]
    ends = np.append(np.flatnonzero(sorted_scores[:-1] != sorted_scores[1:]), sorted_scores.size - 1)
    tp = np.cumsum(gt.ravel()[order])[ends].astype(np.float64)
    n_pos = float(np.count_nonzero(gt))
    if n_pos == 0:
        return float("nan"), float("nan")
    f1 = 2 * tp / (ends + 1 + n_pos)  # 2 TP / (predicted positives + actual positives)
    best = int(np.argmax(f1))
    return float(sorted_scores[ends[best]]), float(f1[best])


def auroc_per_defect_type(
    labels, scores, defect_types: Sequence[str], masks=None, maps=None
) -> dict[str, dict[str, float]]:
    """Per defect type, AUROC of that type's images against all 'good' images.

    Shows which defect kinds the model misses, which a single pooled AUROC hides.
    ``pixel_auroc`` is added per type only when masks and maps are given.
    """
    y, s = _image_arrays(labels, scores)
    types = np.asarray([str(t) for t in defect_types], dtype=object)
    if types.shape != y.shape:
        raise ValueError(f"defect_types ({types.size}) and labels ({y.size}) differ in length")
    with_pixels = masks is not None and maps is not None
    if with_pixels:
        gt, pixel_scores = _pixel_arrays(masks, maps)
        if gt.shape[0] != y.size:
            raise ValueError(f"masks hold {gt.shape[0]} images but labels hold {y.size}")

    is_good = types == GOOD
    result: dict[str, dict[str, float]] = {}
    for defect in sorted(set(types.tolist()) - {GOOD}):
        chosen = is_good | (types == defect)
        entry = {"image_auroc": _binary_auroc(y[chosen], s[chosen])}
        if with_pixels:
            entry["pixel_auroc"] = _binary_auroc(gt[chosen].ravel(), pixel_scores[chosen].ravel())
        result[defect] = entry
    return result


def evaluate(
    labels, scores, masks, maps, defect_types: Sequence[str], fpr_limit: float = FPR_LIMIT
) -> dict:
    """All metrics in one JSON-serialisable dict; pixel metrics are nan without masks/maps."""
    if (masks is None) != (maps is None):
        raise ValueError("give both masks and maps, or neither for image-only evaluation")
    if masks is None:
        pix_auroc = pro_area = float("nan")
    else:
        pix_auroc = pixel_auroc(masks, maps)
        pro_area = aupro(masks, maps, fpr_limit=fpr_limit)
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pix_auroc,
        "aupro": pro_area,
        "per_type": auroc_per_defect_type(labels, scores, defect_types, masks, maps),
    }


# --- bounded-memory evaluation --------------------------------------------------------------
# Exact pixel metrics sort every pixel of the set at once. A set too large for that (a video's
# tens of thousands of frames) is instead counted into histograms of the map values. A value's bin
# comes from its difference d to a centre value: d = 0 is a bin of its own, and |d| is binned on
# its float32 bit pattern with 13 mantissa bits, so a bin is at most 2^-13 of |d| wide and values
# within 2^13 float32 steps of the centre each get their own. The centre should be where values
# pile up: for a flow's stateless maps that is their upper bound, the map offset, where every
# strongly anomalous pixel sits (its probability has underflowed to 0); without one it is the
# highest value of the first batch. Only the range of bins seen is stored: 199k bins (1.6 MB a
# histogram) on magnetic_tile's test maps, 2^22 (32 MB) at most whatever the values. Pixels
# sharing a bin count as ties, the only difference from the exact figures: 3e-9 pixel AUROC and
# 6e-8 AUPRO on magnetic_tile, where binning took 1.6 s against 45 s for the exact sort. Centred
# on the first batch's maximum instead, synthetic STC maps lost 2e-5 pixel AUROC to ties at the top.
_MANTISSA = 13
BINNED = f"binned: map values in bins 2^-{_MANTISSA} of their distance to a centre wide"


def _bits(values) -> np.ndarray:
    """Bit patterns of non-negative float32 values as int64, dropping all but 13 mantissa bits."""
    return np.ascontiguousarray(values, dtype=np.float32).view(np.int32).astype(np.int64) >> (23 - _MANTISSA)


def value_bins(values: np.ndarray, centre: float) -> np.ndarray:
    """int64 bin of each value, in the same order as the values (see above)."""
    c = np.float32(centre)
    d = np.asarray(values, dtype=np.float64) - float(c)  # exact, or rounded: either way monotone
    # no two float32 values are closer to c than half its float32 step: bins start there
    smallest = _bits(np.float32(abs(np.spacing(c)) / 2)) if c != 0 else 0
    return np.sign(d).astype(np.int64) * np.maximum(_bits(np.abs(d)) - smallest + 1, 0)


class PixelHistograms:
    """Pixel AUROC (pooled and per defect type), the PRO curve and the pixel ROC of a set seen one
    batch at a time, in memory that does not grow with the set: per defect type, counts of its
    normal and defect pixels per value bin, plus one PRO histogram in which each defect pixel
    weighs 1 / (size of its 8-connected region), so that a bin's cumulative sum is the summed
    per-region overlap. Only the range of bins seen is stored."""

    def __init__(self, centre: float | None = None) -> None:
        self.centre = None if centre is None else np.float32(centre)  # None: the first batch's highest value
        self.lo = 0  # bin number of index 0 in every array
        self.counts: dict[tuple[str, bool], np.ndarray] = {}  # (defect type, defect pixel?) -> counts per bin
        self.pro = np.zeros(0)
        self.low = np.zeros(0, dtype=np.float32)  # the lowest value seen in each bin: a threshold that flags it
        self.regions = 0

    def _grow(self, lo: int, hi: int) -> None:
        size = next(iter(self.counts.values())).size if self.counts else self.pro.size
        if size and lo >= self.lo and hi < self.lo + size:
            return
        new_lo = min(lo, self.lo) if size else lo
        new_size = max(hi + 1, self.lo + size) - new_lo
        pad = (self.lo - new_lo, new_size - size - (self.lo - new_lo)) if size else (0, new_size)
        self.counts = {k: np.pad(v, pad) for k, v in self.counts.items()}
        self.pro = np.pad(self.pro, pad)
        self.low = np.pad(self.low, pad, constant_values=np.inf)
        self.lo = new_lo

    def _add(self, key: tuple[str, bool], bins: np.ndarray) -> None:
        if bins.size:
            size = self.pro.size
            self.counts.setdefault(key, np.zeros(size, dtype=np.int64))
            self.counts[key] += np.bincount(bins - self.lo, minlength=size)

    def add(self, masks: np.ndarray, maps: np.ndarray, defect_types: Sequence[str]) -> None:
        """Count a batch: masks [B, H, W] (nonzero = defect pixel), maps [B, H, W], one type per image."""
        gt, scores = _pixel_arrays(masks, maps)
        if np.isnan(scores).any():
            raise ValueError("maps contain NaN; anomaly scores must be finite")
        if scores.size == 0:
            return
        if self.centre is None:
            self.centre = np.float32(scores.max())
        bins = value_bins(scores, self.centre)
        self._grow(int(bins.min()), int(bins.max()))
        np.minimum.at(self.low, (bins - self.lo).ravel(), scores.ravel().astype(np.float32))
        regions, n = ndimage.label(gt, structure=_PER_IMAGE_8_CONNECTED)
        if n:
            weight = 1.0 / np.bincount(regions.ravel(), minlength=n + 1)[1:]
            self.pro += np.bincount(bins[gt] - self.lo, weights=weight[regions[gt] - 1], minlength=self.pro.size)
            self.regions += n
        types = np.asarray([str(t) for t in defect_types])
        for t in np.unique(types):
            chosen = types == t
            self._add((str(t), False), bins[chosen][~gt[chosen]])
            self._add((str(t), True), bins[chosen][gt[chosen]])

    def _sum(self, defect: bool, types: set[str] | None = None) -> np.ndarray:
        parts = [v for (t, d), v in self.counts.items() if d == defect and (types is None or t in types)]
        return np.sum(parts, axis=0) if parts else np.zeros(self.pro.size, dtype=np.int64)

    def _descending(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normal counts, defect counts, PRO weights) of the occupied bins, highest first: one
        curve point per distinct threshold, as the exact curves have one per distinct value."""
        neg, pos = self._sum(False), self._sum(True)
        used = np.flatnonzero(neg + pos)[::-1]
        return neg[used], pos[used], self.pro[used]

    @staticmethod
    def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
        n_neg, n_pos = int(neg.sum()), int(pos.sum())
        if n_neg == 0 or n_pos == 0:
            return float("nan")
        below = np.cumsum(neg) - neg
        return float(np.sum(pos * (below + 0.5 * neg), dtype=np.float64) / (float(n_pos) * float(n_neg)))

    def pixel_auroc(self) -> float:
        return self._auroc(self._sum(False), self._sum(True))

    def pixel_auroc_per_type(self) -> dict[str, float]:
        """Per defect type: its images' pixels and the good images' pixels, as `auroc_per_defect_type`."""
        types = sorted({t for t, _ in self.counts} - {GOOD})
        return {t: self._auroc(self._sum(False, {t, GOOD}), self._sum(True, {t, GOOD})) for t in types}

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) at every bin, from (0, 0) to (1, 1); empty when a class is missing."""
        neg, pos, _ = self._descending()
        if neg.sum() == 0 or pos.sum() == 0:
            return np.zeros(0), np.zeros(0)
        return np.r_[0.0, np.cumsum(neg) / neg.sum()], np.r_[0.0, np.cumsum(pos) / pos.sum()]

    def pro_curve(self, fpr_limit: float = FPR_LIMIT) -> tuple[np.ndarray, np.ndarray]:
        """As `pro_curve`, with one threshold per bin."""
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        neg, _, pro_weight = self._descending()
        if self.regions == 0 or neg.sum() == 0:
            return np.zeros(0), np.zeros(0)
        fpr = np.r_[0.0, np.cumsum(neg) / neg.sum()]
        pro = np.r_[0.0, np.cumsum(pro_weight) / self.regions]
        return _cut_at(fpr, pro, fpr_limit)

    def f1_optimal_threshold(self) -> tuple[float, float]:
        """As `f1_optimal_threshold` (map >= threshold is a defect pixel), one candidate per bin: the
        lowest value seen in it, which flags exactly that bin and those above."""
        neg, pos = self._sum(False), self._sum(True)
        used = np.flatnonzero(neg + pos)[::-1]
        n_pos = float(pos.sum())
        if n_pos == 0:
            return float("nan"), float("nan")
        tp = np.cumsum(pos[used])
        f1 = 2 * tp / (tp + np.cumsum(neg[used]) + n_pos)
        best = int(np.argmax(f1))
        return float(self.low[used[best]]), float(f1[best])

    def aupro(self, fpr_limit: float = FPR_LIMIT) -> float:
        fpr, pro = self.pro_curve(fpr_limit)
        return float(np.trapezoid(pro, fpr)) / fpr_limit if fpr.size else float("nan")


class Evaluation:
    """`evaluate` for a set seen one batch at a time. The maps are kept, for exact pixel metrics,
    while they and their masks take at most `budget_bytes`; past that they are counted into
    `PixelHistograms` and dropped, so memory stays bounded however many images there are (the
    result's "pixel_metrics" says which). Image metrics are always exact: one score per image.
    Images without a mask (`add`'s `has_mask`) count in the image metrics only. With `thresholds`
    (image, pixel, and optionally region) it also counts what they flag (`at_threshold`); with a region
    threshold, the defect regions as `predict` reports them (`regions.defect_regions` over the region threshold,
    on images over the image threshold): the share of good images with any, and the share of ground-truth defects (connected
    parts of the masks) that one overlaps, overall and per defect type. `centre` is where the
    histograms' bins are finest (see `value_bins`): the maps' upper bound if known."""

    def __init__(self, budget_bytes: int, thresholds: tuple[float, float] | None = None, fpr_limit: float = FPR_LIMIT,
                 centre: float | None = None):
        self.budget, self.thresholds, self.fpr_limit, self.centre = budget_bytes, thresholds, fpr_limit, centre
        self.labels: list[int] = []
        self.scores: list[float] = []
        self.types: list[str] = []
        self.has_mask: list[bool] = []
        self.pixel_types: list[str] = []  # the defect types of the images with masks, in order
        self.kept: list[tuple[np.ndarray, np.ndarray]] | None = []
        self.kept_bytes = 0
        self.binned: PixelHistograms | None = None
        # flagged pixels of good images, pixels of good images, defect pixels flagged, defect pixels
        self.hot = np.zeros(4, dtype=np.int64)
        # per defect type ("good" too): images, images with a region, ground-truth defects, those a region overlaps
        self.region_counts: dict[str, np.ndarray] = {}

    def add(self, labels, scores, masks, maps, defect_types: Sequence[str], has_mask=None) -> None:
        """One batch: labels [B], scores [B], masks [B, H, W], maps [B, H, W], a defect type per image, and
        whether each image has a mask [B] (default: all); the masks of those without are ignored."""
        y, s = _image_arrays(labels, scores)
        gt, m = _pixel_arrays(masks, maps)
        keep = np.ones(y.size, dtype=bool) if has_mask is None else np.asarray(has_mask, dtype=bool).ravel()
        if keep.size != y.size:
            raise ValueError(f"has_mask ({keep.size}) and labels ({y.size}) differ in length")
        self.labels += y.astype(int).tolist()
        self.scores += s.tolist()
        self.types += [str(t) for t in defect_types]
        self.has_mask += keep.tolist()
        if self.thresholds is not None and len(self.thresholds) > 2:
            self._count_regions(y, s, gt, m, keep, defect_types)
        if not keep.any():
            return
        if not keep.all():
            gt, m, y = gt[keep], m[keep], y[keep]
        types = [t for t, k in zip(self.types[-keep.size:], keep) if k]
        self.pixel_types += types
        if self.thresholds is not None:
            hot = m > self.thresholds[1]
            self.hot += (int(hot[~y].sum()), int(hot[~y].size), int((hot & gt).sum()), int(gt.sum()))
        if self.kept is not None and self.kept_bytes + gt.nbytes + m.nbytes <= self.budget:
            self.kept.append((gt.copy(), m.copy()))
            self.kept_bytes += gt.nbytes + m.nbytes
            return
        if self.binned is None:
            self.binned = PixelHistograms(self.centre)
            for (g, mm), kept_types in zip(self.kept or [], self._kept_types()):
                self.binned.add(g, mm, kept_types)
            self.kept = None
        self.binned.add(gt, m, types)

    def _count_regions(self, y, s, gt, m, keep, defect_types) -> None:
        image, _, region = self.thresholds[:3]
        for i in range(y.size):
            found_mask, found = defect_regions(m[i], region) if s[i] > image else (None, [])
            c = self.region_counts.setdefault(str(defect_types[i]) if y[i] else "good", np.zeros(4, dtype=np.int64))
            c[0] += 1
            c[1] += bool(found)
            if y[i] and keep[i]:
                parts, n = ndimage.label(gt[i], structure=np.ones((3, 3)))  # 8-connected, as PRO's defects
                c[2] += n
                if found_mask is not None and n:
                    c[3] += np.unique(parts[found_mask & (parts > 0)]).size

    def _region_rates(self) -> dict:
        def rates(c: np.ndarray, good: bool) -> dict:
            rate = (c[1] / c[0] if c[0] else None) if good else (c[3] / c[2] if c[2] else None)
            return {"images": int(c[0]), "images_with_regions": int(c[1]),
                    "region_false_alarm_rate" if good else "region_recall": None if rate is None else float(rate)}

        defects = [c for t, c in self.region_counts.items() if t != "good"]
        total = np.sum(defects, axis=0) if defects else np.zeros(4, dtype=np.int64)
        good = self.region_counts.get("good", np.zeros(4, dtype=np.int64))
        return {"region_false_alarm_rate": float(good[1] / good[0]) if good[0] else None,
                "region_recall": float(total[3] / total[2]) if total[2] else None,
                "defects": int(total[2]), "defects_found": int(total[3]),
                "regions_per_type": {t: rates(c, t == "good") for t, c in sorted(self.region_counts.items())}}

    def _kept_types(self):
        start = 0
        for g, _ in self.kept or []:
            yield self.pixel_types[start : start + len(g)]
            start += len(g)

    def _exact(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.kept) > 1:  # joined once, for both result() and curves()
            self.kept = [(np.concatenate([g for g, _ in self.kept]), np.concatenate([m for _, m in self.kept]))]
        return self.kept[0]

    def result(self) -> dict:
        """The figures of `evaluate`, the pixel ones over the images with masks only, None where undefined;
        plus pixel_metrics ("exact", how they were binned, or None without a mask), images_used (how many
        images the image and the pixel metrics used) and, with thresholds, at_threshold: the image and
        pixel false-positive rates (on good images) and recalls."""
        out = evaluate(self.labels, self.scores, None, None, self.types, self.fpr_limit)
        per_type: dict[str, float] = {}
        if self.kept is not None and self.kept:
            chosen = np.flatnonzero(self.has_mask)
            pixel = evaluate(np.asarray(self.labels)[chosen], np.asarray(self.scores)[chosen], *self._exact(),
                             self.pixel_types, self.fpr_limit)
            out.update(pixel_auroc=pixel["pixel_auroc"], aupro=pixel["aupro"], pixel_metrics="exact")
            per_type = {t: v["pixel_auroc"] for t, v in pixel["per_type"].items()}
        elif self.binned is not None:
            h = self.binned
            out.update(pixel_auroc=h.pixel_auroc(), aupro=h.aupro(self.fpr_limit), pixel_metrics=BINNED)
            per_type = h.pixel_auroc_per_type()
        else:
            out["pixel_metrics"] = None
        for t, entry in out["per_type"].items():
            entry["pixel_auroc"] = per_type.get(t, float("nan"))
        out["images_used"] = {"image_metrics": len(self.labels), "pixel_metrics": sum(self.has_mask)}
        if self.thresholds is not None:
            out["at_threshold"] = self._rates()
        return json_safe(out)

    def _rates(self) -> dict:
        y, s = _image_arrays(self.labels, self.scores)
        flagged = s > self.thresholds[0]
        return {"good_images": int((~y).sum()), "defect_images": int(y.sum()),
                "image_fpr": float(flagged[~y].mean()) if (~y).any() else None,
                "image_recall": float(flagged[y].mean()) if y.any() else None,
                "pixel_fpr": int(self.hot[0]) / int(self.hot[1]) if self.hot[1] else None,
                "pixel_recall": int(self.hot[2]) / int(self.hot[3]) if self.hot[3] else None,
                **(self._region_rates() if len(self.thresholds) > 2 else {})}

    def f1_optimal_threshold(self) -> tuple[float, float]:
        """(pixel threshold, F1) maximising pixel F1 over the images with masks: exact or binned, as `result`."""
        if self.kept is not None and self.kept:
            return f1_optimal_threshold(*self._exact())
        if self.binned is not None:
            return self.binned.f1_optimal_threshold()
        return float("nan"), float("nan")

    def curves(self) -> dict:
        """Image ROC points (every image), pixel ROC points and the PRO curve (the images with masks), as
        plain lists for JSON."""
        curves = {}
        x, y = roc_points(self.labels, self.scores)
        curves["image_roc"] = {"fpr": x.tolist(), "tpr": y.tolist()}
        if self.kept is not None and self.kept:
            gt, m = self._exact()
            (x, y), (fpr, pro) = roc_points(gt, m), pro_curve(gt, m, self.fpr_limit)
        elif self.binned is not None:
            (x, y), (fpr, pro) = thin_curve(*self.binned.roc()), self.binned.pro_curve(self.fpr_limit)
        else:
            x = y = fpr = pro = np.zeros(0)
        curves["pixel_roc"] = {"fpr": x.tolist(), "tpr": y.tolist()}
        fpr, pro = thin_curve(fpr, pro)
        curves["pro"] = {"fpr": fpr.tolist(), "pro": pro.tolist(), "fpr_limit": self.fpr_limit}
        return curves
