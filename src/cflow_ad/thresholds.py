"""Decision thresholds: turning anomaly scores into OK / defect and maps into masks.

Thresholds are calibrated without defect examples: on held-out defect-free images, the
image threshold is the score that at most a target fraction (the false-positive rate,
1% by default) of them exceed, and the pixel threshold does the same for their pixels.
The calibration keeps those images' score distribution (all image scores, pixel scores
at a log-spaced grid of rates), so a different rate can be chosen at predict time without
the images. With a labelled validation set the F1-optimal thresholds are the alternative.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

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

    @classmethod
    def from_good(cls, image_scores, maps, target_fpr: float, source: str, seed: int = 0) -> "Thresholds":
        """Calibrate on defect-free images: their scores [N] and anomaly maps [N, H, W]."""
        target_fpr = _check_fpr(target_fpr)
        scores = np.sort(np.asarray(image_scores, dtype=np.float64).ravel())
        if scores.size == 0:
            raise CflowInputError("no defect-free images to calibrate thresholds on: add good images")
        pixels = np.asarray(maps, dtype=np.float32).ravel()
        if pixels.size > PIXEL_SAMPLE:
            pixels = np.random.default_rng(seed).choice(pixels, PIXEL_SAMPLE, replace=False)
        pixels = np.sort(pixels)
        grid = [_upper_quantile(pixels, f, presorted=True) for f in PIXEL_FPR_GRID]
        t = cls(0.0, 0.0, source, target_fpr, int(scores.size), scores.tolist(), grid)
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
        return Thresholds(image, pixel, self.source, fpr, self.calibration_images,
                          self.good_image_scores, self.pixel_fpr_thresholds)

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

    def with_overrides(self, image: float | None = None, pixel: float | None = None) -> "Thresholds":
        if image is None and pixel is None:
            return self
        return Thresholds(self.image if image is None else float(image), self.pixel if pixel is None else float(pixel),
                          "manual" if image is not None and pixel is not None else f"{self.source} + manual",
                          self.target_fpr, self.calibration_images, self.good_image_scores, self.pixel_fpr_thresholds)

    def summary(self) -> dict:
        """The fields people read (no stored distributions)."""
        return {"image": self.image, "pixel": self.pixel, "source": self.source, "target_fpr": self.target_fpr,
                "calibration_images": self.calibration_images}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        return cls(**d)
