"""The offline demo as a new user sees it (issue 32's acceptance): heat maps that show the defect brightest,
regions on defect images only, and one score scale that leaves the ranking alone."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cflow_ad import api
from cflow_ad.demo import run_demo
from cflow_ad.metrics import image_auroc

LUMA = np.array([0.2126, 0.7152, 0.0722])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, progress=False)


def _rows(demo):
    out, _ = demo
    with open(out / "predict" / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_regions_only_where_there_is_a_defect(demo):
    rows = _rows(demo)
    good = [r for r in rows if "/good/" in r["path"]]
    defect = [r for r in rows if "/good/" not in r["path"]]
    assert len(good) == len(defect) == 12
    assert sum(int(r["region_count"]) > 0 for r in good) <= 1
    assert all(int(r["region_count"]) >= 1 and r["label"] == "defect" for r in defect)
    assert all(r["label"] == "defect" or int(r["region_count"]) == 0 for r in rows)  # an ok image has none
    rates = demo[1]["at_threshold"]
    assert rates["region_false_alarm_rate"] <= 1 / 12 and rates["region_recall"] == 1.0


def test_heat_maps_show_the_defect_brighter_than_the_surface(demo):
    out, _ = demo
    truth = out / "data" / "synthetic" / "ground_truth"
    for r in _rows(demo):
        if "/good/" in r["path"]:
            continue
        kind, stem = r["path"].split("/")[-2], r["path"].split("/")[-1][:-4]
        gt = np.asarray(Image.open(truth / kind / f"{stem}_mask.png")) > 127
        lum = np.asarray(Image.open(r["heatmap"]), dtype=np.float64) @ LUMA / 255
        assert lum[gt].mean() - lum[~gt].mean() >= 0.25, r["heatmap"]


def test_one_score_scale_keeps_the_ranking(demo):
    out, metrics = demo
    with open(out / "test" / "scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    labels = [int(r["label"]) for r in table]
    normal, raw = [float(r["score"]) for r in table], [float(r["raw_score"]) for r in table]
    assert abs(image_auroc(labels, normal) - metrics["image_auroc"]) < 1e-6
    assert abs(image_auroc(labels, raw) - metrics["image_auroc"]) < 1e-6
    rows = _rows(demo)
    good = [float(r["score"]) for r in rows if "/good/" in r["path"]]
    assert abs(float(np.median(good))) < 1.5  # about 0 at a typical good image (the held-out median)
    assert all(np.isfinite(float(r["score"])) and float(r["score"]) < 100 for r in rows)
    assert all((float(r["score"]) > 1) == (r["label"] == "defect") for r in rows)  # 1 is the image threshold
    summary = json.loads((out / "predict" / "predictions.json").read_text())
    first = summary["predictions"][0]
    assert list(first)[:2] == ["path", "score"] and "raw_score" in first  # the one scale first


def test_predict_legend_puts_the_colour_bar_beside_the_overlay(demo, tmp_path):
    out, _ = demo
    image = sorted((out / "data" / "synthetic" / "test" / "spot").glob("*.png"))[0]
    rows = api.predict(out / "model" / "model.safetensors", [image], tmp_path, progress=False, legend=True)
    overlay, heat = Image.open(rows[0]["overlay"]), Image.open(rows[0]["heatmap"])
    assert overlay.size == (heat.size[0] + 120, heat.size[1])
