"""One score scale and one colour scale for every model (issue 32): the normalised score, the region
threshold's extreme-value fit, the inferno table against matplotlib's, and the colour bar."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest

from cflow_ad.metrics import image_auroc
from cflow_ad.thresholds import PIXEL_FPR_GRID, ScoreScale, Thresholds, extreme_quantile
from cflow_ad.visualize import COLOURS, colour_bar, heat_rgb, with_legend

LUMA = np.array([0.2126, 0.7152, 0.0722])


def test_the_scale_is_zero_at_typical_one_at_the_threshold_monotone_and_readable():
    scale = ScoreScale(typical=6000.0, threshold=15062.0)
    assert scale(6000.0) == 0.0 and scale(15062.0) == pytest.approx(1.0)
    raw = np.concatenate([np.linspace(-1e4, 2e4, 2001), np.geomspace(2.001e4, 4.7e14, 500)])
    n = scale(raw)
    assert np.all(np.diff(n) > 0) and np.isfinite(n).all()
    assert 10 < scale(4.7e14) < 40  # the demo's strongest defect: a number in the tens
    np.testing.assert_allclose(scale.raw(n), raw, rtol=1e-9, atol=1e-6)
    # smooth where the log part starts: the slopes on both sides of the threshold agree
    eps = 1e-3
    assert (scale(15062 + eps) - scale(15062)) == pytest.approx(scale(15062) - scale(15062 - eps), rel=1e-3)
    # a degenerate calibration (threshold at the median) still gives a finite, monotone scale
    flat = ScoreScale(3.0, 3.0)
    assert np.all(np.diff(flat(np.linspace(0, 6, 50))) > 0) and np.isfinite(flat(1e30))


def test_normalised_scores_leave_the_auroc_alone():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(300), np.ones(200)]
    raw = np.r_[rng.lognormal(8, 0.5, 300), rng.lognormal(12, 4, 200)]
    t = Thresholds.from_good(raw[:300], rng.random((300, 4, 4)), 0.01, "test")
    normal = np.array([t.normalized(v) for v in raw])
    assert abs(image_auroc(labels, normal) - image_auroc(labels, raw)) < 1e-6
    assert t.normalized(float(np.median(raw[:300]))) == pytest.approx(0.0, abs=1e-9)
    assert t.normalized(t.image) == pytest.approx(1.0)


def test_the_extreme_value_fit_extrapolates_past_a_few_images_and_never_under_their_quantile():
    rng = np.random.default_rng(1)
    mu, beta = 5.0, 0.5
    true = mu - beta * math.log(-math.log1p(-0.01))
    big = rng.gumbel(mu, beta, 20000)
    assert extreme_quantile(big, 0.01) == pytest.approx(true, rel=0.02)
    for n in (3, 5, 20):
        few = rng.gumbel(mu, beta, (4000, n))
        fitted = np.array([extreme_quantile(x, 0.01) for x in few])
        assert np.all(fitted >= few.max(1))  # never under the empirical quantile (here: the largest)
        # n images' largest value is passed by 1/(n+1) of new good images; the widened fit by 1% on average
        new = rng.gumbel(mu, beta, few.shape[0])
        assert (new > few.max(1)).mean() > 0.5 / (n + 1)
        assert 0.004 < (new > fitted).mean() < 0.018, n
    assert extreme_quantile([2.5], 0.01) == 2.5


def test_the_region_threshold_is_calibrated_and_kept_with_the_thresholds():
    rng = np.random.default_rng(2)
    maps = rng.random((40, 16, 16)).astype(np.float32)
    t = Thresholds.from_good(rng.random(40), maps, 0.01, "test")
    assert t.pixel < t.region_threshold and len(t.good_map_maxima) == 40
    assert t.region_threshold >= maps.reshape(40, -1).max(1).max()  # no calibration image reaches it
    assert Thresholds.from_dict(t.to_dict()) == t
    assert t.at_fpr(0.2).region_threshold < t.region_threshold
    # older models stored no maxima: their regions need the pixel threshold only
    old = {k: v for k, v in t.to_dict().items() if k not in ("good_map_maxima", "region")}
    assert Thresholds.from_dict(old).region_threshold == t.pixel
    # a manual pixel threshold above the region one lifts it too
    assert t.with_overrides(pixel=t.region_threshold + 1).region_threshold == t.region_threshold + 1
    assert t.pixel_scale.typical == pytest.approx(float(np.quantile(maps, 0.5)), abs=0.01)
    assert PIXEL_FPR_GRID[-1] == pytest.approx(0.5)


def test_the_colour_table_is_matplotlibs_inferno_and_gets_brighter():
    reference = matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255
    assert np.abs(COLOURS.astype(float) - reference).max() <= 2.0
    luma = COLOURS @ LUMA
    assert np.diff(luma).min() > -1 and np.diff(luma[::8]).min() > 0  # the strongest anomaly is the brightest


def test_heat_colours_mean_the_same_on_every_model():
    for typical, threshold in ((0.0, 1.0), (-50.0, 1e6), (4000.0, 15062.0)):
        scale = ScoreScale(typical, threshold)
        amap = np.array([[scale.raw(v) for v in (-5.0, 0.0, 1.0, ScoreScale.TOP, 40.0)]])
        rgb = heat_rgb(amap, scale)[0]
        assert (rgb[0] == COLOURS[0]).all() and (rgb[1] == COLOURS[0]).all()  # at or under a typical good pixel
        assert (rgb[2] == COLOURS[128]).all()  # the threshold: the middle, where the colours turn warm
        assert (rgb[3] == COLOURS[255]).all() and (rgb[4] == COLOURS[255]).all()  # clear defects and above: the top


def test_the_colour_bar_marks_the_threshold_and_fits_any_image():
    scale = ScoreScale(1.0, 2.0)
    bar = colour_bar(200, scale)
    assert bar.shape == (200, 120, 3)
    column = bar[:, 12]  # inside the coloured strip
    white = np.flatnonzero((column == 255).all(1))
    mid = 6 + (200 - 12) // 2
    assert white.size and abs(white.mean() - mid) <= 2  # the threshold line, half-way up the colours
    assert column[10] @ LUMA > column[-10] @ LUMA  # bright at the top, dark at the bottom
    tiny = with_legend(np.zeros((1, 1, 3), np.uint8), scale)
    assert tiny.shape[0] == 48 and tiny.shape[1] == 121
