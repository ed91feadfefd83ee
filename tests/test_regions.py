"""Defect regions: labelling against scipy, the region facts, and `--min-defect-area` in predict and serve."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image
from scipy import ndimage

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.inference import Inspector, Verdict
from cflow_ad.regions import label, regions
from cflow_ad.visualize import draw_boxes

from .test_serve import _free_port, _wait_healthy

SCIPY_STRUCTURE = {8: np.ones((3, 3), dtype=bool), 4: None}  # scipy's default is the 4-connected cross


def _masks():
    rng = np.random.default_rng(0)
    for _ in range(200):  # random densities and shapes, single rows and columns included
        h, w = rng.integers(1, 48, 2)
        yield rng.random((h, w)) < rng.random()
    yield np.zeros((5, 7), dtype=bool)  # empty
    yield np.ones((5, 7), dtype=bool)  # one region touching every border
    yield np.eye(6, dtype=bool)  # a diagonal: one region with 8-connectivity, six with 4
    yield ndimage.binary_dilation(rng.random((300, 400)) < 0.002, iterations=4)  # blobs at a realistic size


@pytest.mark.parametrize("connectivity", [8, 4])
def test_labels_equal_scipys(connectivity):
    for mask in _masks():
        ours, n = label(mask, connectivity)
        theirs, m = ndimage.label(mask, structure=SCIPY_STRUCTURE[connectivity])
        assert n == m and np.array_equal(ours, theirs)


def test_region_facts_equal_scipys():
    rng = np.random.default_rng(1)
    for mask in _masks():
        amap = rng.normal(size=mask.shape)
        kept, found = regions(mask, amap)
        assert np.array_equal(kept, mask)
        labels, n = ndimage.label(mask, structure=SCIPY_STRUCTURE[8])
        assert len(found) == n
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        want = {}
        for i, sl in zip(index, ndimage.find_objects(labels)):
            box = (sl[1].start, sl[0].start, sl[1].stop - sl[1].start, sl[0].stop - sl[0].start)
            want[box + (int((labels == i).sum()),)] = (ndimage.maximum(amap, labels, i), ndimage.mean(amap, labels, i))
        got = {(r["box"]["x"], r["box"]["y"], r["box"]["width"], r["box"]["height"], r["area_px"]):
               (r["peak_score"], r["mean_score"]) for r in found}
        assert got.keys() == want.keys()
        for key, (peak, mean) in want.items():
            assert got[key] == pytest.approx((peak, mean), rel=1e-9, abs=1e-12)
        peaks = [r["peak_score"] for r in found]
        assert peaks == sorted(peaks, reverse=True)


def test_known_components_and_the_minimum_area():
    mask = np.zeros((20, 30), dtype=bool)
    mask[0:4, 0:5] = True  # 20 px in the top-left corner
    mask[10:20, 25:30] = True  # 50 px at the bottom-right border
    mask[8, 12] = mask[9, 13] = True  # 2 px touching diagonally
    amap = np.zeros(mask.shape)
    amap[mask] = 1.0
    amap[15, 27] = 9.0
    amap[8, 12] = 5.0
    kept, found = regions(mask, amap, min_area=3)
    assert [(r["box"], r["area_px"], r["peak_score"]) for r in found] == [
        ({"x": 25, "y": 10, "width": 5, "height": 10}, 50, 9.0),
        ({"x": 0, "y": 0, "width": 5, "height": 4}, 20, 1.0),
    ]
    assert found[0]["mean_score"] == pytest.approx((49 + 9) / 50)
    assert not kept[8, 12] and kept.sum() == 70  # the dropped region is out of the mask too
    assert len(regions(mask, amap)[1]) == 3 and len(regions(mask, amap, connectivity=4)[1]) == 4
    assert regions(np.zeros((4, 4), dtype=bool), np.zeros((4, 4)))[1] == []


def test_regions_of_a_shrunk_mask_come_in_the_images_pixels():
    """A service finds regions on a large upload's shrunk copy (issue 33): boxes, areas and the minimum area
    are in the upload's pixels, here 4 x 3 of them per mask pixel."""
    mask = np.zeros((20, 30), dtype=bool)
    mask[0:4, 0:5] = True  # 20 px: 240 in the image
    mask[10:20, 25:30] = True  # 50 px: 600
    amap = mask.astype(float)
    kept, found = regions(mask, amap, min_area=300, scale=(4.0, 3.0))
    assert [(r["box"], r["area_px"]) for r in found] == [({"x": 75, "y": 40, "width": 15, "height": 40}, 600)]
    assert kept.sum() == 50
    verdict = Verdict(None, 0.0, None, None, 90, 80, amap, np.zeros((3, 20, 30)), kept, found)
    assert verdict.defect_area_px == 600 and verdict.drawn_boxes() == [{"x": 25, "y": 10, "width": 5, "height": 10}]


def test_boxes_are_drawn_inside_the_image():
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    draw_boxes(rgb, [{"x": 8, "y": 6, "width": 4, "height": 4}, {"x": 0, "y": 0, "width": 1, "height": 1}], width=2)
    drawn = rgb.any(2)
    assert drawn[6, 8] and drawn[9, 11] and drawn[0, 0] and not drawn[5, 7] and not drawn[3, 3]


def test_predict_reports_regions_and_drops_small_ones(padim_checkpoint, synthetic_root, tmp_path):
    spot = sorted((synthetic_root / "synthetic" / "test" / "spot").glob("*.png"))
    rows = api.predict(padim_checkpoint, spot, tmp_path / "all", progress=False)
    assert {r["label"] for r in rows} == {"defect"}
    for r in rows:
        assert r["region_count"] == len(r["regions"]) >= 1 and r["reason"] == "score above the image threshold"
        assert sum(g["area_px"] for g in r["regions"]) == r["defect_area_px"]
        assert r["largest_region_px"] == max(g["area_px"] for g in r["regions"])
        for g in r["regions"]:
            b = g["box"]
            assert 0 <= b["x"] < b["x"] + b["width"] <= r["width"] and 0 <= b["y"] < b["y"] + b["height"] <= r["height"]
            assert g["peak_score"] >= g["mean_score"] > r["pixel_threshold"]
    with open(tmp_path / "all" / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(t["region_count"]) for t in table] == [r["region_count"] for r in rows]
    assert [int(t["largest_region_px"]) for t in table] == [r["largest_region_px"] for r in rows]
    overlay = np.asarray(Image.open(rows[0]["overlay"]))
    box = rows[0]["regions"][0]["box"]
    assert tuple(overlay[box["y"], box["x"] + box["width"] // 2]) == (255, 214, 0)  # the box's top edge

    big = max(r["largest_region_px"] for r in rows) + 1
    dropped = api.predict(padim_checkpoint, spot, tmp_path / "none", progress=False, min_defect_area=big)
    for r in dropped:
        assert r["label"] == "ok" and r["regions"] == [] and r["defect_area_px"] == 0
        assert r["reason"] == f"score above the image threshold, but no defect region of {big} px or more"
    assert not np.asarray(Image.open(dropped[0]["mask"])).any()
    summary = json.loads((tmp_path / "none" / "predictions.json").read_text())
    assert summary["defect"] == 0 and summary["predictions"][0]["min_defect_area_px"] == big


def test_inspector_refuses_a_negative_minimum(padim_checkpoint):
    with pytest.raises(Exception, match="min-defect-area must be >= 0"):
        Inspector(load_checkpoint(padim_checkpoint), min_defect_area=-1)


def test_serve_applies_the_minimum_area(padim_checkpoint, synthetic_root):
    spot = sorted((synthetic_root / "synthetic" / "test" / "spot").glob("*.png"))[0]
    port = _free_port()
    cmd = [sys.executable, "-m", "cflow_ad", "--threads", "1", "serve", "--model", str(padim_checkpoint),
           "--port", str(port), "--device", "cpu", "--min-defect-area", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        r = requests.post(url + "/predict", files={"file": (spot.name, spot.read_bytes(), "image/png")}, timeout=60)
        got = r.json()
        assert r.status_code == 200 and got["label"] == "ok" and got["regions"] == [] and got["region_count"] == 0
        assert "no defect region of 100000 px or more" in got["reason"]
        png = requests.post(url + "/predict?output=mask", files={"file": (spot.name, spot.read_bytes(), "image/png")},
                            timeout=60)
        assert png.headers["X-Cflow-Regions"] == "0" and not np.asarray(Image.open(io.BytesIO(png.content))).any()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
