"""ShanghaiTech Campus (STC) video-frame layout: listing, labels, lazy masks, errors, train/test."""

from __future__ import annotations

import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cflow_ad import api, stc
from cflow_ad.data import load_mask
from cflow_ad.errors import CflowInputError
from cflow_ad.source import DataSource, layout
from cflow_ad.stc import make_synthetic_stc, stc_dataset, stc_scenes

from .conftest import TINY

FRAME_HW = (48, 80)  # frames are not square and not the model size: masks get resized


@pytest.fixture(scope="module")
def stc_root(tmp_path_factory) -> Path:
    return make_synthetic_stc(tmp_path_factory.mktemp("stc"), scenes=("01", "02"), frames=6, size=FRAME_HW, seed=0)


@pytest.fixture
def own_root(stc_root, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(stc_root, tmp_path / "stc"))


def _error(fn, *args, **kw) -> str:
    with pytest.raises(CflowInputError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_scenes_and_layout(stc_root, own_root, tmp_path):
    assert stc_scenes(stc_root) == ["01", "02"]
    assert layout(stc_root) == "stc" and layout(tmp_path) == "mvtec" and layout(None) == "folders"
    (own_root / "training" / "frames" / ".cache").mkdir()  # hidden folders are no scene
    (own_root / "training" / "frames" / "10_001").mkdir()
    assert stc_scenes(own_root) == ["01", "02", "10"]
    videos = sorted(p.name for p in (stc_root / "testing" / "frames").iterdir())
    assert videos == ["01_0001", "01_0002", "02_0001", "02_0002"]
    assert np.load(stc_root / "testing" / "test_pixel_mask" / "01_0001.npy").shape == (6, *FRAME_HW)


def test_generator_is_deterministic(stc_root, tmp_path):
    again = make_synthetic_stc(tmp_path, scenes=("01", "02"), frames=6, size=FRAME_HW, seed=0)
    files = sorted(p.relative_to(stc_root) for p in stc_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((stc_root / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert "not empty" in _error(make_synthetic_stc, tmp_path)


def test_train_frames(stc_root):
    ds = stc_dataset(stc_root, "02", "train", 32)
    assert len(ds) == 12 and {(r.label, r.defect_type, r.mask_path) for r in ds.records} == {(0, "good", None)}
    names = [f"{r.path.parent.name}/{r.path.name}" for r in ds.records[:7]]
    assert names == [f"02_001/{i:03d}.jpg" for i in range(6)] + ["02_002/000.jpg"]
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 0


@pytest.mark.parametrize("size", [32, (40, 72)])
def test_test_labels_and_masks_match_the_npy(stc_root, tmp_path, size):
    ds = stc_dataset(stc_root, "01", "test", size)
    assert len(ds) == 12
    for i, rec in enumerate(ds.records):
        frame = np.load(rec.mask_path)[ds.mask_frames[i]]
        assert rec.mask_path.stem == rec.path.parent.name and int(rec.path.stem) == ds.mask_frames[i]
        assert rec.label == int(frame.any()) and rec.defect_type == ("anomalous" if frame.any() else "good")
        png = tmp_path / f"{i}.png"
        Image.fromarray(frame * 255).save(png)
        s = ds.sample(i)
        assert torch.equal(s.mask, load_mask(png, size))  # resized exactly like an MVTec mask
        assert s.label == rec.label and s.path == str(rec.path)
    assert [r.label for r in ds.records] == [0, 0, 0, 1, 1, 1] * 2


def test_labels_from_frame_mask_win_and_pixels_without_it(own_root):
    labels_file = own_root / "testing" / "test_frame_mask" / "01_0001.npy"
    np.save(labels_file, np.array([1, 0, 0, 1, 1, 0], np.uint8))
    assert [r.label for r in stc_dataset(own_root, "01", "test", 32).records][:6] == [1, 0, 0, 1, 1, 0]
    shutil.rmtree(own_root / "testing" / "test_frame_mask")
    ds = stc_dataset(own_root, "01", "test", 32)
    pixels = np.load(own_root / "testing" / "test_pixel_mask" / "01_0001.npy")
    assert [r.label for r in ds.records][:6] == [int(f.any()) for f in pixels] == [0, 0, 0, 1, 1, 1]


def test_frame_step_and_numeric_frame_order(own_root):
    ds = stc_dataset(own_root, "01", "test", 32, frame_step=4)
    assert [(r.path.name, int(f)) for r, f in zip(ds.records, ds.mask_frames)] == [("000.jpg", 0), ("004.jpg", 4)] * 2
    assert len(stc_dataset(own_root, "01", "train", 32, frame_step=2)) == 6
    video = own_root / "training" / "frames" / "01_001"
    for i in range(6):
        (video / f"{i:03d}.jpg").rename(video / f"{998 + i}.jpg")  # 998 ... 1003
    names = [r.path.name for r in stc_dataset(own_root, "01", "train", 32).records[:6]]
    assert names == [f"{998 + i}.jpg" for i in range(6)]
    for bad in (0, -1, 1.5, True):
        assert "frame_step" in _error(stc_dataset, own_root, "01", "train", 32, frame_step=bad)


def test_errors_are_one_line_and_name_the_path(own_root, tmp_path):
    assert "training" in _error(stc_scenes, tmp_path)
    assert "absent" in _error(stc_scenes, tmp_path / "absent")
    assert "available scenes: 01, 02" in _error(stc_dataset, own_root, "07", "train", 32)
    assert "'val'" in _error(stc_dataset, own_root, "01", "val", 32)
    masks = own_root / "testing" / "test_pixel_mask"

    shutil.rmtree(own_root / "testing" / "frames" / "02_0001")
    shutil.rmtree(own_root / "testing" / "frames" / "02_0002")
    assert "scene '02'" in _error(stc_dataset, own_root, "02", "test", 32)

    video = own_root / "training" / "frames" / "01_002"
    for f in video.iterdir():
        f.unlink()
    assert "01_002" in _error(stc_dataset, own_root, "01", "train", 32)
    shutil.rmtree(video)

    np.save(masks / "01_0002.npy", np.zeros((5, *FRAME_HW), np.uint8))  # one frame short
    msg = _error(stc_dataset, own_root, "01", "test", 32)
    assert "01_0002.npy" in msg and "5 frames" in msg and "6" in msg
    np.save(masks / "01_0002.npy", np.zeros((6, 40, 80), np.uint8))  # wrong height
    msg = _error(stc_dataset, own_root, "01", "test", 32)
    assert "01_0002.npy" in msg and "80x40" in msg and "80x48" in msg
    np.save(masks / "01_0002.npy", np.zeros((6, 48 * 80), np.uint8))
    assert "01_0002.npy" in _error(stc_dataset, own_root, "01", "test", 32)
    (masks / "01_0002.npy").write_bytes(b"not numpy")
    assert "01_0002.npy" in _error(stc_dataset, own_root, "01", "test", 32)
    (masks / "01_0002.npy").unlink()
    msg = _error(stc_dataset, own_root, "01", "test", 32)
    assert "01_0002.npy" in msg and "missing mask" in msg
    np.save(masks / "01_0002.npy", np.zeros((6, *FRAME_HW), np.uint8))
    np.save(own_root / "testing" / "test_frame_mask" / "01_0002.npy", np.zeros(7, np.uint8))
    assert "test_frame_mask" in _error(stc_dataset, own_root, "01", "test", 32)

    shutil.rmtree(masks)
    assert "test_pixel_mask" in _error(stc_dataset, own_root, "01", "test", 32)
    shutil.rmtree(own_root / "testing" / "frames")
    assert str(Path("testing") / "frames") in _error(stc_dataset, own_root, "01", "test", 32)


def test_mask_of_another_size_than_its_frame_fails_on_load(own_root):
    frame = own_root / "testing" / "frames" / "01_0001" / "003.jpg"
    Image.new("L", (64, 48)).save(frame)  # the video's first frame still matches its mask
    ds = stc_dataset(own_root, "01", "test", 32)
    msg = _error(ds.sample, 3)
    assert "003.jpg" in msg and "01_0001.npy" in msg and "64x48" in msg


def test_masks_are_mapped_never_read_whole(own_root, monkeypatch):
    """A 40 MB mask: building the set (labels scanned from pixels) and loading a frame stay far below it."""
    video = own_root / "testing" / "frames" / "01_0001"
    n, h, w = 100, 400, 1000
    for f in video.iterdir():
        f.unlink()
    for i in range(n):
        Image.new("L", (w, h)).save(video / f"{i:03d}.jpg", quality=50)
    big = np.zeros((n, h, w), np.uint8)
    big[70, 5:9, 10:30] = 1
    np.save(own_root / "testing" / "test_pixel_mask" / "01_0001.npy", big)
    del big
    shutil.rmtree(own_root / "testing" / "test_frame_mask")
    calls = []
    real_load = np.load
    monkeypatch.setattr(stc.np, "load",
                        lambda path, *a, **kw: calls.append(kw.get("mmap_mode")) or real_load(path, *a, **kw))

    tracemalloc.start()
    try:
        ds = stc_dataset(own_root, "01", "test", 256)
        build_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        s = ds.sample(70)
        sample_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.label for r in ds.records[:n]] == [int(i == 70) for i in range(n)]
    assert s.mask.sum() > 0 and ds.sample(69).mask.sum() == 0
    assert calls and set(calls) == {"r"}
    assert build_peak < 5e6 and sample_peak < 10e6, (build_peak, sample_peak)  # the mask is 40e6 bytes


def test_data_source_detects_stc(stc_root, tmp_path):
    assert layout(stc_root) == "stc" and DataSource(stc_root).layout == "stc"
    assert isinstance(DataSource(stc_root, "01").open("train", 32), stc.STCDataset)
    assert DataSource(stc_root).categories() == ["01", "02"]
    assert "01, 02" in _error(DataSource(stc_root, "13").open, "test", 32)
    assert "01, 02" in _error(DataSource(stc_root).open, "train", 32)


def test_train_and_test_one_scene(stc_root, tmp_path):
    ckpt = api.train(TINY.replace(epochs=1, sub_epochs=1), tmp_path / "m", source=DataSource(stc_root, "01"),
                     progress=False, log=lambda m: None)
    metrics = api.test(ckpt, tmp_path / "t", source=DataSource(stc_root, "01"), progress=False)
    assert metrics["images"] == 12 and metrics["pixel_metrics"] == "exact"
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert math.isfinite(metrics[key]), key
    assert set(metrics["per_type"]) >= {"anomalous"}

    # no room for maps: the same set evaluated from histograms, the same scores and cases
    binned = api.test(ckpt, tmp_path / "b", source=DataSource(stc_root, "01"), progress=False, memory_mb=0)
    assert binned["pixel_metrics"].startswith("binned")
    assert binned["image_auroc"] == metrics["image_auroc"]
    for key in ("pixel_auroc", "aupro"):
        assert binned[key] == pytest.approx(metrics[key], abs=1e-3), key
    for name in ("scores.csv", "cases/cases.json"):
        assert (tmp_path / "b" / name).read_text() == (tmp_path / "t" / name).read_text()

    # every 2nd frame of each video, from the command line
    from cflow_ad.cli import run

    assert run(["--quiet", "test", "--model", str(ckpt), "--data", str(stc_root), "--category", "01",
                "--frame-step", "2", "--output", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "scores.csv").read_text().count("\n") == 1 + 6


def test_frame_step_needs_an_stc_root(stc_root, tmp_path):
    every = len(DataSource(stc_root, "01").open("train", 32))
    assert len(DataSource(stc_root, "01", frame_step=3).open("train", 32)) == every // 3
    for bad in (0, -1):
        assert "--frame-step" in _error(DataSource(stc_root, "01", frame_step=bad).open, "train", 32)
    (tmp_path / "good").mkdir()
    assert "STC root" in _error(DataSource(normal_dir=tmp_path / "good", frame_step=2).open, "train", 32)
