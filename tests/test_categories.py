"""`cflow-ad train --category all`: every category trained, one broken category reported, the rest finished."""

from __future__ import annotations

import json

import pytest

from cflow_ad.categories import train_all
from cflow_ad.cli import run
from cflow_ad.data import make_synthetic_mvtec
from cflow_ad.source import DataSource

from .conftest import TINY

FAST = TINY.replace(method="padim", calibration_fraction=0.25)  # closed-form fit: seconds per category


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    """Two good categories and one whose training images are all corrupt."""
    root = tmp_path_factory.mktemp("plant")
    for name, seed in (("bottle", 0), ("cable", 1)):
        make_synthetic_mvtec(root, name, n_train=12, n_test_good=4, n_test_defect=4, size=128, seed=seed)
    broken = root / "broken" / "train" / "good"
    broken.mkdir(parents=True)
    for i in range(3):
        (broken / f"{i:03d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_all_categories_train_and_a_broken_one_is_reported(plant, tmp_path, capsys):
    assert run(["--quiet", "train", "--data", str(plant), "--category", "all", "--output", str(tmp_path),
                *("--method padim --calibration-fraction 0.25 --image-size 128 --border-pad 16 --pool-layers 2"
                  " --last-stride 16 --batch-size 8").split()]) == 1  # not every category trained
    rows = {r["category"]: r for r in json.loads((tmp_path / "summary.json").read_text())}
    assert set(rows) == {"bottle", "broken", "cable"}
    for name in ("bottle", "cable"):
        assert rows[name]["status"] == "ok" and (tmp_path / name / "model.safetensors").is_file()
        assert rows[name]["image_auroc"] > 0.8 and (tmp_path / name / "test" / "metrics.json").is_file()
    assert rows["broken"]["status"] == "failed" and "broken" in rows["broken"]["error"]
    assert "\n" not in rows["broken"]["error"] and not (tmp_path / "broken" / "model.safetensors").exists()
    printed = capsys.readouterr()
    assert "2 of 3 categories trained, 1 failed" in printed.out and "broken: failed" in printed.err
    assert (tmp_path / "summary.md").read_text() in printed.out


def test_parallel_jobs_give_the_same_models(plant, tmp_path):
    serial = train_all(FAST, DataSource(plant), tmp_path / "serial", jobs=1, log=lambda m: None)
    parallel = train_all(FAST, DataSource(plant), tmp_path / "parallel", jobs=2, threads=2, log=lambda m: None)
    assert [r["category"] for r in parallel] == ["bottle", "broken", "cable"]
    for a, b in zip(serial, parallel):
        assert a["status"] == b["status"]
        if a["status"] == "ok":
            assert b["image_auroc"] == pytest.approx(a["image_auroc"]) and b["aupro"] == pytest.approx(a["aupro"])
