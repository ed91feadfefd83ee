"""Decision thresholds: turning anomaly scores into OK / defect, maps into masks and defect regions.

Thresholds are calibrated without defect examples: on held-out defect-free images, the
image threshold is the score that at most a target fraction (the false-positive rate,
1% by default) of them exceed, and the pixel threshold does the same for their pixels.
A defect region is a connected part of the map over the region threshold, set so that at most
that fraction of good images reach it anywhere (`extreme_quantile`).
The calibration keeps those images' score distribution (all image scores and map maxima,
pixel scores at a log-spaced grid of rates), so a different rate can be chosen at predict
time without the images, and every score can be put on one scale (`ScoreScale`).
With a labelled validation set the F1-optimal thresholds are the alternative.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .errors import CflowInputError

# Pixel false-positive rates whose thresholds are kept: 1e-5 .. 0.5, 20 per decade.
PIXEL_FPR_GRID = np.geomspace(1e-5, 0.5, 95)
# A held-out set's pixels are sampled down to this many before the quantiles (memory, not accuracy).
PIXEL_SAMPLE = 20_000_000


def _check_fpr(fpr: float) -> float:
    if not 0.0 < fpr < 1.0 or math.isnan(fpr):
        raise CflowInputError(f"target false-positive rate {fpr} is invalid: use a value between 0 and 1, e.g. 0.01")
    return float(fpr)


def _upper_quantile(values: np.ndarray, fpr: float, presorted: bool = False) -> float:
    """The smallest t with at most `fpr` of `values` strictly above it (score > t is a defect);
    `presorted`: values are sorted ascending already (one sort serves a whole grid of rates)."""
    v = np.asarray(values).ravel()
    v = v if presorted else np.sort(v)
    k = int(math.floor(fpr * v.size))  # values allowed above t
    return float(v[v.size - 1 - min(k, v.size - 1)])


EULER_GAMMA = 0.5772156649015329


@functools.lru_cache(maxsize=64)  # pure and deterministic; calibrating again reuses it
def _gumbel_step(n: int, fpr: float) -> float:
    """k such that a new draw exceeds mean - gamma*b + k*b (b = the moment scale, both from n draws) with
    probability `fpr` on average over the n draws, for any Gumbel: the quantity is free of the law's location
    and scale, so a seeded simulation of the standard one gives it. Why not the plug-in k = -ln(-ln(1 - fpr)):
    a scale estimated from a few images is often too small, and then that many more good images pass it
    (on average 8.5% instead of 1% from 3 images, 4.7% from 5). Past 2,000 images k is within 0.2% of the
    plug-in and that of 2,000 is used (k falls with n, so this errs high), which bounds the work to 4M draws."""
    n = min(n, 2000)
    x = np.random.default_rng(0).gumbel(size=(min(20000, 4_000_000 // n), n))
    b = x.std(axis=1, ddof=1) * math.sqrt(6.0) / math.pi
    m = x.mean(axis=1) - EULER_GAMMA * b
    lo, hi = 0.0, -math.log(-math.log1p(-fpr))
    while np.mean(-np.expm1(-np.exp(-(m + hi * b)))) > fpr:
        lo, hi = hi, 2 * hi
    for _ in range(50):  # bisection: the rate falls as k grows
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.mean(-np.expm1(-np.exp(-(m + mid * b)))) > fpr else (lo, mid)
    return hi


def extreme_quantile(maxima, fpr: float) -> float:
    """The value that on average at most `fpr` of new good images' map maxima exceed: a Gumbel (the law of
    the largest of many pixels) fitted to `maxima` by moments, widened for the uncertainty of a fit from few
    images (`_gumbel_step`), and never below their empirical quantile. Why: a held-out set of n images cannot
    show a 1% tail, and its largest value is exceeded by 1/(n+1) of new good images (a quarter with PIPED's
    3), which would put defect regions on them."""
    x = np.asarray(maxima, dtype=np.float64).ravel()
    empirical = _upper_quantile(x, fpr)
    if x.size < 2:
        return empirical
    beta = float(x.std(ddof=1)) * math.sqrt(6.0) / math.pi
    mu = float(x.mean()) - EULER_GAMMA * beta
    return max(empirical, mu + beta * _gumbel_step(x.size, float(fpr)))


@dataclass(frozen=True)
class ScoreScale:
    """Raw scores on one scale for every model: 0 at a typical good value, 1 at the threshold, linear between
    and log-compressed above it (1 + ln r for r = (v - typical) / (threshold - typical) > 1): monotone, smooth
    at the threshold, and finite, so that a defect scoring 1e14 raw reads as a number in the tens."""

    typical: float
    threshold: float

    # Where the heat-map colours end, on this scale: about 7 threshold steps above a typical good value.
    TOP = 3.0

    @property
    def unit(self) -> float:
        """threshold - typical, kept positive (a degenerate calibration still gives a monotone scale)."""
        return max(self.threshold - self.typical, 1e-6 * max(abs(self.threshold), abs(self.typical), 1.0))

    def __call__(self, raw):
        r = (np.asarray(raw, dtype=np.float64) - self.typical) / self.unit
        return np.where(r <= 1.0, r, 1.0 + np.log(np.maximum(r, 1.0)))

    def raw(self, value):
        """The raw score at a point of this scale (the inverse)."""
        v = np.asarray(value, dtype=np.float64)
        return self.typical + self.unit * np.where(v <= 1.0, v, np.exp(np.minimum(v, 700.0) - 1.0))

    def colour_position(self, raw) -> np.ndarray:
        """Where raw values sit on the heat-map colour bar, 0-1: a typical good value at 0, the threshold at
        0.5 (where the colours turn warm), `TOP` and above at 1."""
        v = self(raw)
        return np.where(v <= 1.0, 0.5 * np.clip(v, 0.0, 1.0), 0.5 + 0.5 * np.clip((v - 1.0) / (self.TOP - 1.0), 0.0, 1.0))


def heat_scale(thresholds: "Thresholds | None", train_max_score: float) -> ScoreScale:
    """The colour scale of a model's heat maps: its thresholds' pixel scale, or without thresholds one that
    ends its cool half at the largest training map value."""
    return thresholds.pixel_scale if thresholds is not None else ScoreScale(0.0, float(train_max_score))


@dataclass
class Thresholds:
    """A score above `image` flags the image; a map value above `pixel` is a defect pixel."""

    image: float
    pixel: float
    source: str  # how they were set: held-out good images, training images, f1, manual
    target_fpr: float | None = None
    calibration_images: int = 0
    good_image_scores: list[float] = field(default_factory=list, repr=False)
    pixel_fpr_thresholds: list[float] = field(default_factory=list, repr=False)
    good_map_maxima: list[float] = field(default_factory=list, repr=False)
    region: float | None = None  # defect regions are the map over it; None (older models): the pixel threshold

    @classmethod
    def from_good(cls, image_scores, maps, target_fpr: float, source: str, seed: int = 0,
                  map_maxima=None) -> "Thresholds":
        """Calibrate on defect-free images: their scores [N] and anomaly maps [N, H, W] (or a sample of their
        values, with each image's `map_maxima` [N] given; without them, the region threshold is the pixel one)."""
        target_fpr = _check_fpr(target_fpr)
        scores = np.sort(np.asarray(image_scores, dtype=np.float64).ravel())
        if scores.size == 0:
            raise CflowInputError("no defect-free images to calibrate thresholds on: add good images")
        pixels = np.asarray(maps, dtype=np.float32).ravel()
        if pixels.size > PIXEL_SAMPLE:
            pixels = np.random.default_rng(seed).choice(pixels, PIXEL_SAMPLE, replace=False)
        pixels = np.sort(pixels)
        grid = [_upper_quantile(pixels, f, presorted=True) for f in PIXEL_FPR_GRID]
        if map_maxima is None:  # from the maps themselves where they are one per image; else no region threshold
            maps = np.asarray(maps, dtype=np.float32)
            map_maxima = maps.reshape(len(maps), -1).max(1) if maps.ndim > 1 and len(maps) == scores.size else []
        t = cls(0.0, 0.0, source, target_fpr, int(scores.size), scores.tolist(), grid,
                np.asarray(map_maxima, dtype=np.float64).ravel().tolist())
        return t.at_fpr(target_fpr)

    def at_fpr(self, fpr: float) -> "Thresholds":
        """The same calibration at another false-positive rate."""
        fpr = _check_fpr(fpr)
        if not self.good_image_scores:
            raise CflowInputError(
                f"these thresholds were set by {self.source}, not on good images: recalibrate with "
                "'cflow-ad calibrate' to choose a false-positive rate")
        log_grid = np.log(PIXEL_FPR_GRID)
        pixel = float(np.interp(np.log(fpr), log_grid, self.pixel_fpr_thresholds))
        image = _upper_quantile(np.asarray(self.good_image_scores), fpr)
        region = max(extreme_quantile(self.good_map_maxima, fpr), pixel) if self.good_map_maxima else None
        return Thresholds(image, pixel, self.source, fpr, self.calibration_images,
                          self.good_image_scores, self.pixel_fpr_thresholds, self.good_map_maxima, region)

    @classmethod
    def f1(cls, labels, scores, masks, maps) -> "Thresholds":
        """F1-optimal image and pixel thresholds on a labelled set (needs defect images and masks)."""
        from .metrics import f1_optimal_threshold  # scipy: not in the scoring runtime, which only applies thresholds

        return cls.f1_with_pixel(labels, scores, f1_optimal_threshold(masks, maps)[0])

    @classmethod
    def f1_with_pixel(cls, labels, scores, pixel: float) -> "Thresholds":
        """The F1-optimal image threshold of a labelled set, with its F1-optimal pixel threshold `pixel`
        (map >= pixel flags a pixel) found already, e.g. batch by batch (`metrics.Evaluation`)."""
        from .metrics import f1_optimal_threshold

        labels = np.asarray(labels)
        if labels.min(initial=1) == 1 or labels.max(initial=0) == 0:
            raise CflowInputError("F1 thresholds need both good and defective images: add the missing kind")
        image, _ = f1_optimal_threshold(labels.reshape(-1, 1, 1), np.asarray(scores, dtype=np.float64).reshape(-1, 1, 1))
        if math.isnan(pixel):
            raise CflowInputError("F1 pixel threshold needs defect masks with marked pixels: pass --mask-dir or masks")
        # f1_optimal_threshold flags score >= t; these thresholds flag score > t.
        return cls(float(np.nextafter(image, -np.inf)), float(np.nextafter(pixel, -np.inf)),
                   f"F1 on {labels.size} labelled images", None, int(labels.size))

    def good_share(self, score: float) -> float | None:
        """The share of the calibration's good images that score lower than `score`: a score in [0, 1]
        that reads the same for every model (None without their scores, e.g. F1 or manual thresholds)."""
        if not self.good_image_scores:
            return None
        return int(np.searchsorted(self.good_image_scores, score, side="left")) / len(self.good_image_scores)

    @property
    def region_threshold(self) -> float:
        """Where defect regions start: the calibrated region threshold, never below the pixel threshold."""
        return self.pixel if self.region is None else max(self.region, self.pixel)

    @property
    def image_scale(self) -> ScoreScale | None:
        """Image scores on one scale: 0 at the median good image, 1 at the image threshold (None without the
        good images' scores, e.g. F1 or manual thresholds)."""
        if not self.good_image_scores:
            return None
        return ScoreScale(float(np.median(self.good_image_scores)), self.image)

    @property
    def pixel_scale(self) -> ScoreScale:
        """Map values on one scale, for the heat map's colours: 0 at the median good pixel (the grid's 50% rate),
        1 at the pixel threshold. Without the good pixels' quantiles, 0 at zero (or one below a threshold <= 0)."""
        if self.pixel_fpr_thresholds:
            typical = float(self.pixel_fpr_thresholds[-1])
        else:
            typical = 0.0 if self.pixel > 0 else self.pixel - 1.0
        return ScoreScale(typical, self.pixel)

    def normalized(self, score: float) -> float | None:
        """`score` on the image scale (None without one)."""
        scale = self.image_scale
        return None if scale is None else float(scale(score))

    def with_overrides(self, image: float | None = None, pixel: float | None = None) -> "Thresholds":
        if image is None and pixel is None:
            return self
        source = "manual" if image is not None and pixel is not None else f"{self.source} + manual"
        pixel = self.pixel if pixel is None else float(pixel)
        region = None if self.region is None else max(self.region, pixel)
        return Thresholds(self.image if image is None else float(image), pixel, source,
                          self.target_fpr, self.calibration_images, self.good_image_scores, self.pixel_fpr_thresholds,
                          self.good_map_maxima, region)

    def summary(self) -> dict:
        """The fields people read (no stored distributions)."""
        image_scale, pixel_scale = self.image_scale, self.pixel_scale
        return {"image": self.image, "pixel": self.pixel, "region": self.region_threshold, "source": self.source,
                "target_fpr": self.target_fpr, "calibration_images": self.calibration_images,
                "typical_good_score": None if image_scale is None else image_scale.typical,
                "typical_good_pixel": pixel_scale.typical}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        """Thresholds as `to_dict` wrote them, checked field by field: a model file's JSON may hold anything,
        and a NaN threshold would label every image ok."""
        def bad(msg: str) -> None:
            raise CflowInputError(f"invalid thresholds: {msg}")

        if not isinstance(d, dict):
            bad(f"expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                bad(f"unknown key {key!r}")
        for key in ("image", "pixel", "source"):
            if key not in d:
                bad(f"'{key}' is missing")
        for key in ("image", "pixel", "region", "target_fpr"):
            value = d.get(key)
            if not (_finite(value) or value is None and key in ("region", "target_fpr")):
                bad(f"{key} must be a finite number, got {value!r}")
        if d.get("target_fpr") is not None and not 0.0 < d["target_fpr"] < 1.0:
            bad(f"target_fpr must be between 0 and 1, got {d['target_fpr']}")
        if not isinstance(d["source"], str):
            bad(f"source must be a string, got {d['source']!r}")
        count = d.get("calibration_images", 0)
        if not (_finite(count) and count == int(count) >= 0):
            bad(f"calibration_images must be a count, got {count!r}")
        for key in ("good_image_scores", "pixel_fpr_thresholds", "good_map_maxima"):
            values = d.get(key, [])
            if not isinstance(values, list) or not all(map(_finite, values)):
                bad(f"{key} must be a list of finite numbers")
        if len(d.get("pixel_fpr_thresholds", [])) not in (0, len(PIXEL_FPR_GRID)):
            bad(f"pixel_fpr_thresholds must hold {len(PIXEL_FPR_GRID)} values, one per rate of the grid")
        return cls(**d)


def _finite(value) -> bool:
    """A finite int or float (not a bool, a string or None)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
