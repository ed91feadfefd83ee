import json
import math

import numpy as np
import pytest
from scipy import ndimage

from cflow_ad.metrics import (
    Evaluation,
    PixelHistograms,
    aupro,
    auroc_per_defect_type,
    evaluate,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    pro_curve,
    to_json,
    value_bins,
)

from .conftest import strict_json


def reference_aupro(masks, maps, fpr_limit=0.3):
    """Slow, literal AUPRO: one pass over the data per distinct threshold."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        for r in range(1, n + 1):
            regions.append(maps[i][labelled == r])
    negatives = maps[~masks]

    fprs, pros = [0.0], [0.0]
    for t in sorted(np.unique(maps), reverse=True):
        fprs.append(float(np.mean(negatives >= t)))
        pros.append(float(np.mean([np.mean(region >= t) for region in regions])))

    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def random_case(seed, tie_decimals):
    """4 images of 16x16: rectangles, an L shape, diagonal touches, one empty mask."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 16, 16), dtype=bool)
    for i in (0, 1, 3):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, 13, size=2)
            h, w = rng.integers(1, 4, size=2)
            masks[i, r : r + h, c : c + w] = True
    masks[1, 10:15, 2] = True  # L shape: vertical bar ...
    masks[1, 14, 2:7] = True  # ... and its foot
    masks[3, 0, 0] = masks[3, 1, 1] = True  # diagonal neighbours: one region under 8-conn
    # image 2 has no region: negatives only
    noise = rng.random(masks.shape)
    maps = noise + rng.uniform(0.2, 0.8) * masks
    maps = np.round(maps, tie_decimals)  # rounding creates many ties
    return masks, maps


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tie_decimals", [1, 2, 6])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_reference(seed, tie_decimals, fpr_limit):
    masks, maps = random_case(seed, tie_decimals)
    expected = reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-6)


def test_aupro_float32_maps_match_reference():
    masks, maps = random_case(42, 2)
    maps32 = maps.astype(np.float32)
    assert aupro(masks, maps32) == pytest.approx(reference_aupro(masks, maps32), abs=1e-6)


def test_perfect_map_gives_one():
    masks, _ = random_case(0, 2)
    maps = masks.astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(1.0)
    assert pixel_auroc(masks, maps) == pytest.approx(1.0)


def test_negatives_ranked_above_positives_gives_zero():
    masks, _ = random_case(1, 2)
    maps = 1.0 - masks.astype(np.float64)
    assert aupro(masks, maps) == pytest.approx(0.0)
    assert pixel_auroc(masks, maps) == pytest.approx(0.0)


def test_aupro_hand_computed():
    # One 2-pixel region, 4 negatives. Curve: (0,0) (0,.5) (.25,.5) (.25,1) (.5,1) ...
    # Area to 0.3 = 0.25*0.5 + 0.05*1 = 0.175; normalised 0.175/0.3.
    masks = np.array([[[1, 1, 0], [0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.8], [0.3, 0.2, 0.1]]])
    assert aupro(masks, maps) == pytest.approx(0.175 / 0.3)
    # Positives 0.9 and 0.5 against negatives 0.8, 0.3, 0.2, 0.1: 7 of 8 pairs won.
    assert pixel_auroc(masks, maps) == pytest.approx(7 / 8)


def test_aupro_uses_8_connectivity_and_weights_regions_equally():
    # (0,0) touches (1,1) only diagonally: 8-connectivity gives one region of 3 pixels,
    # 1 of which is detected. Curve (0,0) (0,1/3) (1,1); PRO at 0.3 is 1/3 + 0.3*2/3 = 8/15,
    # area = 0.3 * (1/3 + 8/15) / 2, normalised 13/30. (4-connectivity would give 0.575.)
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps) == pytest.approx(13 / 30)

    # Two regions (1 and 3 pixels) in separate images; only the small one detected:
    # PRO jumps to 1/2 (mean over regions), not 1/4 (pixel fraction).
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, 0:3] = True
    maps = np.zeros((2, 4, 4))
    maps[0, 0, 0] = 1.0
    # Curve (0,0) (0,.5) (1,1): PRO at 0.3 is 0.65, area 0.3*(0.5+0.65)/2.
    assert aupro(masks, maps) == pytest.approx((0.5 + 0.65) / 2)


def test_empty_mask_image_only_adds_negatives():
    masks = np.array([[[1, 1, 0], [0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.8], [0.3, 0.2, 0.1]]])
    empty = np.zeros_like(masks)
    low = np.full((1, 2, 3), 0.0)
    both_masks = np.concatenate([masks, empty])
    both_maps = np.concatenate([maps, low])
    # 6 low-scoring extra negatives (10 in all): curve (0,.5) (.1,.5) (.1,1) ...
    expected = (0.1 * 0.5 + (0.3 - 0.1) * 1.0) / 0.3
    assert aupro(both_masks, both_maps) == pytest.approx(expected)


def test_aupro_nan_and_errors():
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert math.isnan(aupro(np.zeros((2, 4, 4)), maps))
    assert math.isnan(aupro(np.ones((2, 4, 4)), maps))
    with pytest.raises(ValueError):
        aupro(np.zeros((2, 4, 4)), maps, fpr_limit=0.0)
    with pytest.raises(ValueError):
        aupro(np.zeros((2, 4, 4)), maps[:1])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        aupro(np.eye(4)[None].repeat(2, 0), bad)


def test_aupro_large_case_runs():
    rng = np.random.default_rng(7)
    masks = np.zeros((200, 128, 128), dtype=bool)
    masks[::2, 30:60, 40:90] = True
    masks[1::4, 100:110, 5:20] = True
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.3 * masks).astype(np.float32)
    value = aupro(masks, maps)
    assert math.isfinite(value)
    assert 0.0 <= value <= 1.0
    assert value > 0.3  # the mask-correlated map must beat chance (0.15)


def test_image_auroc_hand_computed_and_one_class():
    # Positives 0.8, 0.4 vs negatives 0.1, 0.4, 0.35: pairs won 3 + (1 + 0.5 tie + 1) = 5.5 of 6.
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    assert image_auroc(labels, scores) == pytest.approx(5.5 / 6)
    assert math.isnan(image_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(image_auroc([0, 0], [0.1, 0.2]))
    assert math.isnan(pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))))
    with pytest.raises(ValueError):
        image_auroc([0, 1], [0.1])


def _small_dataset():
    types = ["good", "good", "scratch", "scratch", "hole"]
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.5, 0.9, 0.3, 0.6])
    masks = np.zeros((5, 4, 4), dtype=bool)
    masks[2:, 1:3, 1:3] = True
    maps = np.random.default_rng(3).random((5, 4, 4)).astype(np.float32)
    maps[4] = masks[4] * 2.0  # hole is segmented perfectly
    return labels, scores, masks, maps, types


def test_auroc_per_defect_type():
    labels, scores, masks, maps, types = _small_dataset()
    per_type = auroc_per_defect_type(labels, scores, types, masks, maps)
    assert set(per_type) == {"scratch", "hole"}
    # scratch 0.9, 0.3 vs good 0.1, 0.5: 3 of 4 pairs; hole 0.6 beats both goods.
    assert per_type["scratch"]["image_auroc"] == pytest.approx(0.75)
    assert per_type["hole"]["image_auroc"] == pytest.approx(1.0)
    chosen = [0, 1, 4]
    assert per_type["hole"]["pixel_auroc"] == pytest.approx(
        pixel_auroc(masks[chosen], maps[chosen])
    )
    image_only = auroc_per_defect_type(labels, scores, types)
    assert image_only == {
        "scratch": {"image_auroc": pytest.approx(0.75)},
        "hole": {"image_auroc": pytest.approx(1.0)},
    }


def test_evaluate_keys_and_json():
    labels, scores, masks, maps, types = _small_dataset()
    result = evaluate(labels, scores, masks, maps, types)
    assert set(result) == {"image_auroc", "pixel_auroc", "aupro", "per_type"}
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert type(result[key]) is float
        assert 0.0 <= result[key] <= 1.0
    assert result["image_auroc"] == pytest.approx(image_auroc(labels, scores))
    assert result["aupro"] == pytest.approx(aupro(masks, maps))
    assert set(result["per_type"]) == {"scratch", "hole"}
    assert all(type(v) is float for d in result["per_type"].values() for v in d.values())
    assert json.loads(json.dumps(result))["image_auroc"] == pytest.approx(result["image_auroc"])

    image_only = evaluate(labels, scores, None, None, types)
    assert math.isnan(image_only["pixel_auroc"])
    assert math.isnan(image_only["aupro"])
    json.dumps(image_only)
    with pytest.raises(ValueError):
        evaluate(labels, scores, masks, None, types)


def test_fast_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from cflow_ad.metrics import pixel_auroc

    rng = np.random.default_rng(7)
    masks = rng.random((5, 20, 20)) < 0.2
    maps = np.round(rng.random((5, 20, 20)) + 0.5 * masks, 1).astype(np.float32)  # many ties
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_f1_optimal_threshold_matches_sklearn():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(3)
    masks = rng.random((3, 20, 20)) < 0.1
    maps = np.round(rng.random((3, 20, 20)) + 0.6 * masks, 2)  # rounding makes ties
    threshold, f1 = f1_optimal_threshold(masks, maps)
    precision, recall, thresholds = precision_recall_curve(masks.ravel(), maps.ravel())
    scores = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(scores[:-1]))
    assert f1 == pytest.approx(scores[best], abs=1e-12)
    assert threshold == pytest.approx(thresholds[best])
    predicted = maps >= threshold
    assert f1 == pytest.approx(2 * (predicted & masks).sum() / (predicted.sum() + masks.sum()))


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_pro_curve_area_is_aupro(fpr_limit):
    from cflow_ad.metrics import pro_curve

    masks, maps = random_case(5, 2)
    fpr, pro = pro_curve(masks, maps, fpr_limit)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and fpr[-1] == pytest.approx(fpr_limit)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert np.trapezoid(pro, fpr) / fpr_limit == pytest.approx(aupro(masks, maps, fpr_limit), abs=1e-12)
    empty = pro_curve(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    assert empty[0].size == empty[1].size == 0


def test_roc_points_are_exact_points_of_sklearns_curve():
    from sklearn.metrics import roc_curve

    from cflow_ad.metrics import roc_points

    rng = np.random.default_rng(11)
    y = rng.random(5000) < 0.1
    s = np.round(rng.random(5000) + 0.5 * y, 3)  # ties
    full_fpr, full_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr, tpr = roc_points(y, s, per_class=10_000)  # classes smaller than per_class: the whole curve
    np.testing.assert_allclose(fpr, full_fpr)
    np.testing.assert_allclose(tpr, full_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(y, s), abs=1e-12)

    fpr, tpr = roc_points(y, s, per_class=50)  # thinned: a subset of the same points, still (0,0) to (1,1)
    assert len(fpr) <= 101 and (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    on_curve = {(a, b) for a, b in zip(full_fpr.round(12), full_tpr.round(12))}
    assert all((a, b) in on_curve for a, b in zip(fpr.round(12), tpr.round(12)))
    assert max(np.diff(fpr).max(), np.diff(tpr).max()) < 1.5 / 50  # about 1/per_class; tied scores move together
    assert roc_points([0, 0], [0.1, 0.2])[0].size == 0


def test_value_bins_keep_order_are_narrow_and_exact_near_the_centre():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.standard_normal(20000) * 10 ** rng.uniform(-30, 30, 20000),
                        [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, np.finfo(np.float32).max]]).astype(np.float32)
    near = np.nextafter(np.float32(1.5), np.float32(3), dtype=np.float32) + np.arange(-9000, 9000) * np.float32(2**-23)
    for centre in (1.5, 0.0, -7.25):
        values = np.sort(np.concatenate([v, near.astype(np.float32)]))
        b = value_bins(values, centre)
        assert np.all(np.diff(b) >= 0)  # sorting bins sorts values
        assert np.abs(b).max() <= 2**21 + 1  # bounded whatever the values
        finite = np.isfinite(values)
        d, fb = np.abs(values[finite].astype(np.float64) - centre), b[finite]
        # neighbours sharing a bin are less than 2^-13 of their distance to the centre apart
        for side in (values[finite] > centre, values[finite] < centre):
            same = fb[side][1:] == fb[side][:-1]
            assert np.all(np.abs(np.diff(d[side]))[same] <= np.maximum(d[side][1:], d[side][:-1])[same] * 2**-13)
    b = value_bins(near, 1.5)
    assert np.unique(b).size == near.size  # within 2^13 steps of the centre every value has its own bin


def _typed_case(seed=0, n=45, size=48, spread=1.0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    types = [("good", "spot", "crack")[i % 3] for i in range(n)]
    for i, t in enumerate(types):
        for _ in range(rng.integers(1, 4) if t != "good" else 0):
            r, c = rng.integers(0, size - 9, size=2)
            masks[i, r : r + rng.integers(2, 9), c : c + rng.integers(1, 9)] = True
    smooth = ndimage.gaussian_filter(rng.standard_normal(masks.shape), (0, 3, 3))
    maps = (spread * (rng.standard_normal(masks.shape) + 1.5 * masks + smooth) - 0.5).astype(np.float32)
    labels = [int(t != "good") for t in types]
    return labels, maps.reshape(n, -1).max(1), masks, maps, types


@pytest.mark.parametrize("spread", [1.0, 1e-3])
def test_binned_metrics_are_within_bin_width_of_exact(spread):
    labels, scores, masks, maps, types = _typed_case(spread=spread)
    h = PixelHistograms()
    for i in range(0, len(labels), 7):  # batch by batch
        h.add(masks[i : i + 7], maps[i : i + 7], types[i : i + 7])
    exact = evaluate(labels, scores, masks, maps, types)
    # a (defect, normal) pixel pair sharing a bin counts one half: that is the whole difference
    pos, neg = (np.bincount(value_bins(maps[m], h.centre) - h.lo) for m in (masks, ~masks))
    n = min(pos.size, neg.size)
    tied = float(np.sum(pos[:n] * neg[:n].astype(np.float64))) / (masks.sum() * float((~masks).sum()))
    assert abs(h.pixel_auroc() - exact["pixel_auroc"]) <= 0.5 * tied + 1e-12
    assert tied < (1e-4 if spread == 1.0 else 1e-2)  # values crowded near -0.5 share bins more often
    per_type = h.pixel_auroc_per_type()
    assert set(per_type) == {"spot", "crack"}
    for t, v in per_type.items():
        assert v == pytest.approx(exact["per_type"][t]["pixel_auroc"], abs=tied)
    assert h.aupro() == pytest.approx(exact["aupro"], abs=10 * tied)
    t_binned, f1_binned = h.f1_optimal_threshold()
    t_exact, f1_exact = f1_optimal_threshold(masks, maps)
    hot = maps >= t_binned  # the threshold flags exactly the pixels the reported F1 counts
    assert 2 * (hot & masks).sum() / (hot.sum() + masks.sum()) == pytest.approx(f1_binned, rel=1e-12)
    assert f1_exact - 10 * tied <= f1_binned <= f1_exact and t_binned == pytest.approx(t_exact, rel=1e-3)
    fpr, tpr = h.roc()
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


@pytest.mark.parametrize("seed", range(3))
def test_binned_metrics_equal_exact_when_values_fall_in_distinct_bins(seed):
    masks, maps = random_case(seed, tie_decimals=1)  # values 0.0, 0.1, ...: each its own bin
    h = PixelHistograms()
    h.add(masks, maps, ["spot"] * len(masks))
    assert h.pixel_auroc() == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert h.aupro() == pytest.approx(reference_aupro(masks, maps), abs=1e-12)
    x, y = h.pro_curve(0.3)
    xe, ye = pro_curve(masks, maps, 0.3)
    assert np.allclose(x, xe) and np.allclose(y, ye)  # the same thresholds: the same points


def test_evaluation_is_exact_within_its_budget_and_binned_past_it():
    labels, scores, masks, maps, types = _typed_case()
    thresholds = (float(np.median(scores)), 1.5)
    hot = maps > thresholds[1]
    good = np.array(labels) == 0
    direct = {"pixel_fpr": hot[good].sum() / masks[good].size, "pixel_recall": (hot & masks).sum() / masks.sum(),
              "image_fpr": np.mean(scores[good] > thresholds[0]),
              "image_recall": np.mean(scores[~good] > thresholds[0])}
    per_batch = masks[:9].nbytes + maps[:9].nbytes
    results = {}
    for budget in (10**12, 0, 2 * per_batch):  # all kept, none kept, two batches kept then binned
        ev = Evaluation(budget, thresholds)
        for i in range(0, len(labels), 9):
            ev.add(labels[i : i + 9], scores[i : i + 9], masks[i : i + 9], maps[i : i + 9], types[i : i + 9])
        results[budget] = ev.result()
        for key, value in direct.items():
            assert results[budget]["at_threshold"][key] == pytest.approx(value), (budget, key)
        curves = ev.curves()
        assert set(curves) == {"image_roc", "pixel_roc", "pro"} and curves["pro"]["fpr"][-1] == pytest.approx(0.3)
    exact = evaluate(labels, scores, masks, maps, types)
    assert results[10**12]["pixel_metrics"] == "exact"
    assert {k: results[10**12][k] for k in exact} == exact
    for budget in (0, 2 * per_batch):
        assert results[budget]["pixel_metrics"].startswith("binned")
        assert results[budget]["image_auroc"] == exact["image_auroc"]  # one score an image: always exact
        assert results[budget]["pixel_auroc"] == pytest.approx(exact["pixel_auroc"], abs=1e-4)
        assert results[budget]["aupro"] == pytest.approx(exact["aupro"], abs=1e-4)
    # switching to bins part-way counts the kept batches too: the same figures as binning from the start
    assert results[2 * per_batch]["pixel_auroc"] == results[0]["pixel_auroc"]
    assert results[2 * per_batch]["per_type"] == results[0]["per_type"]


def test_evaluation_leaves_images_without_masks_out_of_the_pixel_metrics():
    labels, scores, masks, maps, types = _typed_case()
    n = len(labels)
    has_mask = np.array([not (t == "crack" and i % 2 == 0) for i, t in enumerate(types)])
    has_mask[18:27] = False  # a whole batch without masks, good images too
    masks = np.where(has_mask[:, None, None], masks, ~masks)  # what unmasked images carry must not matter
    sub = np.flatnonzero(has_mask)
    sub_types = [types[i] for i in sub]
    exact = evaluate(np.array(labels)[sub], scores[sub], masks[sub], maps[sub], sub_types)
    images = evaluate(labels, scores, None, None, types)
    thresholds = (float(np.median(scores)), 1.5)
    hot, good = maps[sub] > thresholds[1], np.array(labels)[sub] == 0
    rates = {"pixel_fpr": hot[good].mean(), "pixel_recall": (hot & masks[sub]).sum() / masks[sub].sum()}
    per_batch = masks[:9].nbytes + maps[:9].nbytes
    results, f1 = {}, {}
    for budget in (10**12, 0, 2 * per_batch):  # exact, binned from the start, binned part-way
        ev = Evaluation(budget, thresholds)
        for i in range(0, n, 9):
            ev.add(labels[i : i + 9], scores[i : i + 9], masks[i : i + 9], maps[i : i + 9], types[i : i + 9],
                   has_mask[i : i + 9])
        results[budget], f1[budget] = ev.result(), ev.f1_optimal_threshold()
        r = results[budget]
        assert r["images_used"] == {"image_metrics": n, "pixel_metrics": len(sub)}
        assert r["image_auroc"] == images["image_auroc"]  # every image, masked or not
        for t in ("spot", "crack"):
            assert r["per_type"][t]["image_auroc"] == images["per_type"][t]["image_auroc"]
        for key, value in rates.items():
            assert r["at_threshold"][key] == pytest.approx(value), (budget, key)
        assert r["at_threshold"]["good_images"] == labels.count(0)
        strict_json(json.dumps(r))
    assert results[10**12]["pixel_metrics"] == "exact"
    assert {k: results[10**12][k] for k in ("pixel_auroc", "aupro")} == {k: exact[k] for k in ("pixel_auroc", "aupro")}
    for t in ("spot", "crack"):
        assert results[10**12]["per_type"][t]["pixel_auroc"] == exact["per_type"][t]["pixel_auroc"]
    assert f1[10**12] == f1_optimal_threshold(masks[sub], maps[sub])
    for budget in (0, 2 * per_batch):
        assert results[budget]["pixel_metrics"].startswith("binned")
        for key in ("pixel_auroc", "aupro"):
            assert results[budget][key] == pytest.approx(exact[key], abs=1e-4), (budget, key)
        for t in ("spot", "crack"):
            assert results[budget]["per_type"][t]["pixel_auroc"] == pytest.approx(
                exact["per_type"][t]["pixel_auroc"], abs=1e-4)
        assert f1[budget][1] == pytest.approx(f1[10**12][1], abs=1e-3)
    assert results[2 * per_batch] == results[0]  # the kept batches were binned with their has-mask flags


def test_evaluation_without_any_mask_gives_null_pixel_metrics():
    labels, scores, masks, maps, types = _typed_case(n=12)
    ev = Evaluation(10**12, (float(np.median(scores)), 1.5))
    ev.add(labels, scores, masks, maps, types, [False] * len(labels))
    r = ev.result()
    assert r["image_auroc"] == image_auroc(labels, scores)
    assert r["pixel_auroc"] is None and r["aupro"] is None and r["pixel_metrics"] is None
    assert all(v["pixel_auroc"] is None for v in r["per_type"].values())
    assert r["at_threshold"]["pixel_fpr"] is None and r["at_threshold"]["pixel_recall"] is None
    assert r["images_used"] == {"image_metrics": 12, "pixel_metrics": 0}
    assert np.isnan(ev.f1_optimal_threshold()[0])
    curves = ev.curves()
    assert curves["image_roc"]["fpr"] and not curves["pixel_roc"]["fpr"] and not curves["pro"]["fpr"]
    assert "NaN" not in json.dumps(r) and strict_json(json.dumps(r)) == r
    with pytest.raises(ValueError, match="has_mask"):
        ev.add(labels[:2], scores[:2], masks[:2], maps[:2], types[:2], [True])


def test_to_json_writes_null_for_undefined_metrics():
    text = to_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": "x"}})
    assert strict_json(text) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": "x"}}


def test_bins_centred_on_the_maps_upper_bound_resolve_values_piled_up_there():
    """A flow's stateless map is offset - (sum of probabilities): strongly anomalous pixels all sit just
    below the offset. Centred there, the bins separate them; centred lower, they would tie."""
    rng = np.random.default_rng(1)
    offset = np.float32(2.6)
    masks = np.zeros((8, 32, 32), dtype=bool)
    masks[4:, 8:20, 8:20] = True  # the first batch (images 0-3) is defect-free
    # the defects, and some normal pixels of the defect images, sit just below the offset
    near_top = masks | ((np.arange(8) >= 4)[:, None, None] & (rng.random(masks.shape) < 0.1))
    gap = np.where(near_top, rng.uniform(0, 3e-4, masks.shape), rng.uniform(0.5, 2.0, masks.shape))
    maps = (offset - gap).astype(np.float32)
    types = ["good"] * 4 + ["spot"] * 4
    exact = pixel_auroc(masks, maps)
    results = {}
    for centre in (float(offset), None):
        h = PixelHistograms(centre)
        for i in range(0, 8, 4):
            h.add(masks[i : i + 4], maps[i : i + 4], types[i : i + 4])
        results[centre] = h.pixel_auroc()
    assert results[float(offset)] == pytest.approx(exact, abs=1e-9)
    assert abs(results[None] - exact) > 1e-6  # the first batch's maximum is far from the pile
