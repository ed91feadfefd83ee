"""Decision thresholds: calibration on good images, F1 on a labelled set, storage, and their use by test,
predict and calibrate."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.cli import run
from cflow_ad.errors import CflowInputError
from cflow_ad.runtime import OnnxModel
from cflow_ad.source import DataSource
from cflow_ad.thresholds import Thresholds


def _flagged(values, t) -> float:
    return float((np.asarray(values) > t).mean())


def test_good_image_calibration_is_the_tightest_threshold_within_the_rate():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=500)
    maps = rng.gamma(2.0, size=(40, 32, 32)).astype(np.float32)
    t = Thresholds.from_good(scores, maps, 0.01, "500 good images")
    assert _flagged(scores, t.image) <= 0.01 < _flagged(scores, np.sort(scores)[np.sort(scores) < t.image][-1])
    assert t.source == "500 good images" and t.calibration_images == 500 and t.target_fpr == 0.01
    # pixel thresholds: exact on the stored grid, interpolated between its points
    for fpr in (0.01, 0.003, 0.2):
        moved = t.at_fpr(fpr)
        assert _flagged(maps, moved.pixel) == pytest.approx(fpr, rel=0.05)
        assert _flagged(scores, moved.image) <= fpr
    assert t.at_fpr(0.2).image < t.image and t.at_fpr(0.2).pixel < t.pixel


def test_few_images_cannot_resolve_a_small_rate_and_say_so():
    t = Thresholds.from_good([0.1, 0.5, 0.3], np.zeros((3, 4, 4)), 0.01, "3 good images")
    assert t.image == 0.5  # with 3 images, 1% means: none above
    assert _flagged([0.1, 0.5, 0.3], t.at_fpr(0.34).image) == pytest.approx(1 / 3)


def test_f1_thresholds_match_scikit_learn():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 30 + [1] * 20)
    scores = rng.normal(size=50) + labels
    masks = rng.random((50, 8, 8)) < 0.1
    maps = rng.normal(size=(50, 8, 8)) + 1.5 * masks
    t = Thresholds.f1(labels, scores, masks, maps)

    def best_f1(y, s):
        p, r, _ = precision_recall_curve(y, s)
        return np.max(2 * p * r / np.maximum(p + r, 1e-12))

    def f1_at(y, s, thr):
        pred = s > thr
        return 2 * (pred & y).sum() / (pred.sum() + y.sum())

    assert f1_at(labels.astype(bool), scores, t.image) == pytest.approx(best_f1(labels, scores))
    assert f1_at(masks.ravel(), maps.ravel(), t.pixel) == pytest.approx(best_f1(masks.ravel(), maps.ravel()))
    with pytest.raises(CflowInputError, match="good and defective"):
        Thresholds.f1([1, 1], [0.1, 0.2], masks[:2], maps[:2])


def test_bad_rates_and_missing_calibration_are_clear_errors():
    t = Thresholds.from_good([0.1, 0.2], np.zeros((2, 4, 4)), 0.01, "2 good images")
    for fpr in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(CflowInputError, match="false-positive rate"):
            t.at_fpr(fpr)
    manual = Thresholds(1.0, 2.0, "manual")
    with pytest.raises(CflowInputError, match="calibrate"):
        manual.at_fpr(0.05)
    assert Thresholds.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert t.with_overrides(image=0.15).source == "2 good images + manual" and t.with_overrides(image=0.15).pixel == t.pixel


def test_thresholds_travel_in_checkpoints_and_onnx_exports(padim_checkpoint, tmp_path):
    model = load_checkpoint(padim_checkpoint)
    t = model.thresholds
    assert t is not None and t.source == "6 held-out good images" and t.target_fpr == 0.01
    onnx = OnnxModel(api.export(padim_checkpoint, tmp_path / "m.onnx"))
    assert onnx.thresholds == t


def test_test_reports_the_rates_the_thresholds_reach(padim_checkpoint, synthetic_root, tmp_path):
    metrics = api.test(padim_checkpoint, tmp_path, source=DataSource(synthetic_root, "synthetic"), progress=False)
    t, at = metrics["thresholds"], metrics["at_threshold"]
    with open(tmp_path / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    good = [float(r["raw_score"]) for r in rows if r["label"] == "0"]
    bad = [float(r["raw_score"]) for r in rows if r["label"] == "1"]
    assert all((float(r["score"]) > 1) == (r["verdict"] == "defect") for r in rows)  # 1: the image threshold
    assert at["image_fpr"] == pytest.approx(_flagged(good, t["image"]))
    assert at["image_recall"] == pytest.approx(_flagged(bad, t["image"]))
    assert at["image_recall"] >= 0.8 and at["pixel_recall"] > 0.5 and at["pixel_fpr"] < 0.2
    assert {r["verdict"] for r in rows} <= {"ok", "defect"}


def test_calibrate_then_predict_at_other_thresholds(padim_checkpoint, synthetic_root, tmp_path, capsys):
    out = tmp_path / "f1.safetensors"
    assert run(["--quiet", "calibrate", "--model", str(padim_checkpoint), "--data", str(synthetic_root),
                "--category", "synthetic", "--f1", "--output", str(out)]) == 0
    assert "F1 on 12 labelled images" in capsys.readouterr().out
    assert load_checkpoint(out).thresholds.source == "F1 on 12 labelled images"
    assert load_checkpoint(padim_checkpoint).thresholds.source.endswith("held-out good images")  # untouched

    # without room for the maps the F1 search runs on binned values: the same thresholds, to the bin width
    model = load_checkpoint(padim_checkpoint)
    test_set = DataSource(synthetic_root, "synthetic").open("test", model.config.image_size)
    exact = api.calibrate_thresholds(model, test_set, f1=True)
    model.config = model.config.replace(memory_mb=0)
    binned = api.calibrate_thresholds(model, test_set, f1=True)
    assert binned.image == exact.image and binned.pixel == pytest.approx(exact.pixel, rel=1e-3)

    good_dir = synthetic_root / "synthetic" / "test" / "good"
    refit = tmp_path / "good.safetensors"
    api.calibrate(padim_checkpoint, refit, DataSource(normal_dir=good_dir), target_fpr=0.2, progress=False)
    t = load_checkpoint(refit).thresholds
    assert t.source == f"6 good images of {good_dir}" and t.target_fpr == 0.2

    test_dir = synthetic_root / "synthetic" / "test"
    stored = api.predict(padim_checkpoint, [test_dir], tmp_path / "a", progress=False)
    loose = api.predict(padim_checkpoint, [test_dir], tmp_path / "b", progress=False, target_fpr=0.3)
    assert all(b["pixel_threshold"] < a["pixel_threshold"] and b["defect_area_px"] >= a["defect_area_px"]
               for a, b in zip(stored, loose))
    manual = api.predict(padim_checkpoint, [test_dir], tmp_path / "c", progress=False, image_threshold=-1.0,
                         pixel_threshold=1e9)
    assert {r["label"] for r in manual} == {"defect"} and {r["defect_area_px"] for r in manual} == {0}


def test_predict_outputs_are_each_optional(padim_checkpoint, synthetic_root, tmp_path, capsys):
    test_dir = synthetic_root / "synthetic" / "test"
    assert run(["--quiet", "predict", "--model", str(padim_checkpoint), str(test_dir), "--output", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    assert "good: " in printed and "false-positive rate" in printed and "spot: " in printed and "recall" in printed
    assert "thresholds: image " in printed
    names = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert len([n for n in names if n.endswith("_mask.png")]) == 12 and "predictions.csv" in names
    summary = json.loads((tmp_path / "all" / "predictions.json").read_text())
    assert summary["scored"] == 12 and summary["thresholds"]["source"] == "6 held-out good images"
    assert summary["folders"]["good"]["images"] == 6 and len(summary["predictions"]) == 12
    first = summary["predictions"][0]
    assert first["label"] in ("ok", "defect") and first["defect_area_px"] >= 0 and first["width"] == 128

    assert run(["--quiet", "predict", "--model", str(padim_checkpoint), str(test_dir), "--output", str(tmp_path / "few"),
                "--no-overlays", "--no-heatmaps", "--no-json"]) == 0
    names = sorted(p.name for p in (tmp_path / "few").iterdir())
    assert names == sorted([".cflow-ad-predict-files", "predictions.csv",  # the manifest: what a rerun removes
                            *(n for n in (p.name for p in (tmp_path / "all").iterdir()) if n.endswith("_mask.png"))])


def test_a_model_without_thresholds_still_scores_and_says_why_there_are_no_labels(tiny_checkpoint, synthetic_root,
                                                                                  tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    model.thresholds = None
    warnings: list[str] = []
    rows = api.predict(model, [synthetic_root / "synthetic" / "test" / "good"], tmp_path, progress=False,
                       warn=warnings.append)
    # raw scores only: the one scale needs the good images' scores that calibration keeps
    assert all(r["label"] is None and r["score"] is None and np.isfinite(r["raw_score"]) for r in rows)
    assert any("calibrate" in w for w in warnings) and not list(tmp_path.glob("*_mask.png"))
    with pytest.raises(CflowInputError, match="no calibrated thresholds"):
        api.predict(model, [synthetic_root / "synthetic" / "test" / "good"], tmp_path, progress=False, target_fpr=0.1)
