"""Test sets labelled per image: defect images without masks count in the image metrics only, undefined
metrics are null in JSON, and --require-masks restores the strict check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.cli import main, run
from cflow_ad.metrics import evaluate, f1_optimal_threshold
from cflow_ad.source import DataSource

from .conftest import strict_json, without_masks

PADIM = ("--method padim --calibration-fraction 0.25 --image-size 128 --border-pad 16 --pool-layers 2"
         " --last-stride 16 --batch-size 8").split()
DROPPED = ["spot/000_mask.png", "scratch/001_mask.png"]


def _test(model: Path, root: Path, out: Path, *flags: str) -> dict:
    assert run(["--quiet", "test", "--model", str(model), "--data", str(root), "--category", "synthetic",
                "--output", str(out), *flags]) == 0
    return strict_json((out / "metrics.json").read_text())


def test_mvtec_root_without_ground_truth_trains_and_tests(synthetic_root, tmp_path, capsys):
    root = without_masks(synthetic_root, tmp_path / "root")
    assert run(["--quiet", "train", "--data", str(root), "--category", "synthetic", "--output", str(tmp_path / "m"),
                *PADIM]) == 0
    metrics = _test(tmp_path / "m" / "model.safetensors", root, tmp_path / "t")
    assert math.isfinite(metrics["image_auroc"]) and metrics["image_auroc"] > 0.8
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["images_used"] == {"image_metrics": 12, "pixel_metrics": 6}  # the good images' masks are empty
    for entry in metrics["per_type"].values():
        assert math.isfinite(entry["image_auroc"]) and entry["pixel_auroc"] is None
    rates = metrics["at_threshold"]
    assert rates["image_recall"] is not None and rates["pixel_fpr"] is not None and rates["pixel_recall"] is None
    curves = strict_json((tmp_path / "t" / "curves.json").read_text())
    assert curves["image_roc"]["fpr"] and not curves["pixel_roc"]["fpr"] and not curves["pro"]["fpr"]
    out = capsys.readouterr().out
    assert "pixel AUROC n/a  AUPRO n/a" in out and "the 6 of 12 images that have masks" in out


def test_pixel_metrics_use_only_the_images_with_masks(padim_checkpoint, synthetic_root, tmp_path):
    root = without_masks(synthetic_root, tmp_path / "root", DROPPED)
    metrics = _test(padim_checkpoint, root, tmp_path / "t")
    model = load_checkpoint(padim_checkpoint)
    full = DataSource(synthetic_root, "synthetic").open("test", model.config.image_size)
    maps, scores, masks, has_mask, labels, types, paths = api.score_dataset(model, full, "stateless")
    assert has_mask.all()
    keep = np.array([f"{Path(p).parent.name}/{Path(p).stem}_mask.png" not in DROPPED for p in paths])
    assert keep.sum() == 10
    maps, scores, masks = maps.numpy(), scores.numpy(), masks.numpy()
    kept_types = [t for t, k in zip(types, keep) if k]
    subset = evaluate(np.array(labels)[keep], scores[keep], masks[keep], maps[keep], kept_types)
    assert metrics["images_used"] == {"image_metrics": 12, "pixel_metrics": 10}
    assert metrics["image_auroc"] == evaluate(labels, scores, None, None, types)["image_auroc"]  # every image
    for key in ("pixel_auroc", "aupro"):
        assert metrics[key] == pytest.approx(subset[key], abs=1e-12), key
    for t in ("scratch", "spot"):
        assert metrics["per_type"][t]["pixel_auroc"] == pytest.approx(subset["per_type"][t]["pixel_auroc"], abs=1e-12)
    # calibrate --f1 sets the pixel threshold on the same images (it flags map > threshold, F1 counts map >= it)
    thresholds = api.calibrate(padim_checkpoint, tmp_path / "f1.safetensors", DataSource(root, "synthetic"), f1=True,
                               progress=False)
    assert thresholds.pixel == np.nextafter(f1_optimal_threshold(masks[keep], maps[keep])[0], -np.inf)


@pytest.mark.parametrize("command", ["test", "calibrate"])
def test_require_masks_names_the_missing_mask(padim_checkpoint, synthetic_root, tmp_path, capsys, command):
    root = without_masks(synthetic_root, tmp_path / "root", DROPPED[:1])
    out = ["--output", str(tmp_path / "o")] if command == "test" else ["--f1", "--output", str(tmp_path / "o.st")]
    with pytest.raises(SystemExit) as info:
        main(["--quiet", command, "--model", str(padim_checkpoint), "--data", str(root), "--category", "synthetic",
              "--require-masks", *out])
    assert info.value.code == 2
    base = root / "synthetic"
    assert capsys.readouterr().err.splitlines() == [
        f"cflow-ad: error: missing mask '{base / 'ground_truth' / 'spot' / '000_mask.png'}' for test image "
        f"'{base / 'test' / 'spot' / '000.png'}': add the mask or move the image out of test/"]
    with pytest.raises(Exception, match="000_mask.png"):
        DataSource(root, "synthetic", require_masks=True).open("test", 32)


def test_folder_layout_without_masks_gives_null_not_nan(padim_checkpoint, synthetic_root, tmp_path):
    test_dir = synthetic_root / "synthetic" / "test"
    assert run(["--quiet", "test", "--model", str(padim_checkpoint), "--normal-dir", str(test_dir / "good"),
                "--abnormal-dir", str(test_dir / "spot"), "--output", str(tmp_path / "t")]) == 0
    text = (tmp_path / "t" / "metrics.json").read_text()
    metrics = strict_json(text)
    assert "NaN" not in text and metrics["image_auroc"] > 0.8
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["per_type"]["abnormal"]["pixel_auroc"] is None
    assert metrics["images_used"] == {"image_metrics": 9, "pixel_metrics": 6}


def test_every_category_without_masks_and_with_require_masks(synthetic_root, tmp_path, capsys):
    root = without_masks(synthetic_root, tmp_path / "root")
    assert run(["--quiet", "train", "--data", str(root), "--category", "all", "--output", str(tmp_path / "a"),
                *PADIM]) == 0
    (row,) = strict_json((tmp_path / "a" / "summary.json").read_text())
    assert row["status"] == "ok" and row["image_auroc"] > 0.8 and row["pixel_auroc"] is None and row["aupro"] is None
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "| n/a | n/a |" in summary and summary in capsys.readouterr().out
    assert run(["--quiet", "train", "--data", str(root), "--category", "all", "--output", str(tmp_path / "r"),
                "--require-masks", *PADIM]) == 1
    (row,) = strict_json((tmp_path / "r" / "summary.json").read_text())
    assert row["status"] == "failed" and row["error"].startswith("missing mask '") and "000_mask.png" in row["error"]
