"""Tests for image I/O, dataset layouts and the synthetic MVTec generator."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cflow_ad import images
from cflow_ad.data import (AnomalyDataset, folder_dataset, list_images, load_image, load_mask,
                           make_synthetic_mvtec, mvtec_categories, mvtec_dataset, split_train_val)
from cflow_ad.errors import CflowInputError

REAL_ROOT = Path(__file__).parents[1].parent / "shared" / "data" / "magnetic_tile"


def _save(arr, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _raises_naming(path, fn, *args):
    """The error must be a single line that names the offending file."""
    with pytest.raises(CflowInputError) as info:
        fn(path, *args)
    msg = str(info.value)
    assert path.name in msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------- colour modes

def test_grayscale_becomes_three_equal_channels(tmp_path):
    arr = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))
    img = load_image(_save(arr, tmp_path / "g.png"), (8, 25))
    assert img.shape == (3, 8, 25) and img.dtype == torch.float32
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert torch.allclose(img[0], torch.from_numpy(arr.astype(np.float32) / 255))


def test_rgba_drops_alpha_keeping_colour(tmp_path):
    arr = np.zeros((6, 6, 4), np.uint8)
    arr[...] = (10, 200, 30, 0)
    img = load_image(_save(arr, tmp_path / "a.png"), 6)
    assert img.shape == (3, 6, 6)
    assert torch.allclose(img[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0)


def test_palette_expanded_to_palette_colours(tmp_path):
    im = Image.new("P", (4, 4))
    im.putpalette([255, 0, 0, 0, 0, 255])
    im.putpixel((3, 3), 1)
    path = tmp_path / "p.png"
    im.save(path)
    img = load_image(path, 4)
    assert torch.allclose(img[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(img[:, 3, 3], torch.tensor([0.0, 0.0, 1.0]))


def test_16bit_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(2, 0)
    path = _save(arr, tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    img = load_image(path, (2, 4))
    assert torch.allclose(img[0, 0], torch.tensor([0, 64, 128, 255]) / 255.0)
    assert torch.equal(img[0], img[2])


def test_32bit_int_mode_treated_as_16bit(tmp_path):
    arr = np.array([[0, 257 * 100, 65535]], dtype=np.int32).repeat(2, 0)
    path = _save(arr, tmp_path / "g32.tif")
    assert Image.open(path).mode == "I"
    img = load_image(path, (2, 3))
    assert torch.allclose(img[1, 0], torch.tensor([0, 100, 255]) / 255.0)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide: red left half, blue right half
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: red ends up on top
    path = _save(arr, tmp_path / "rot.png", exif=exif)
    img = load_image(path, (40, 20))
    assert img[0, :15].min() > 0.9 and img[2, :15].max() < 0.1
    assert img[2, 25:].min() > 0.9 and img[0, 25:].max() < 0.1


def test_resize_without_crop_non_square(tmp_path):
    arr = np.zeros((30, 50), np.uint8)
    arr[:, -1] = 255  # last column would vanish under a centre crop
    path = _save(arr, tmp_path / "wide.png")
    img = load_image(path, (20, 40))
    assert img.shape == (3, 20, 40)
    assert img[0, :, -1].min() > 0.3
    assert load_image(path, 16).shape == (3, 16, 16)


def test_invalid_size_rejected(tmp_path):
    path = _save(np.zeros((4, 4), np.uint8), tmp_path / "s.png")
    for bad in (0, (4,), (4, -1), "4", True):
        with pytest.raises(CflowInputError):
            load_image(path, bad)


def test_mask_binarised_and_nearest_resize_stays_binary(tmp_path):
    rng = np.random.default_rng(0)
    arr = np.where(rng.random((37, 53)) > 0.5, 255, 0).astype(np.uint8)
    arr[0, 0], arr[0, 1] = 127, 128
    mask = load_mask(_save(arr, tmp_path / "m.png"), (37, 53))
    assert mask.shape == (1, 37, 53) and mask.dtype == torch.float32
    assert mask[0, 0, 0] == 0 and mask[0, 0, 1] == 1
    small = load_mask(tmp_path / "m.png", (16, 24))
    assert small.shape == (1, 16, 24)
    assert set(small.unique().tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------- bad files

def test_bad_files_raise_naming_the_file(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    raw = _save(noise, tmp_path / "ok.png").read_bytes()
    assert len(raw) > 600
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(raw[:300] + b"\x00garbage\xff" * 8 + raw[380:])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path in (truncated, corrupt, empty, text, tmp_path / "missing.png", tmp_path):
        _raises_naming(path, load_image, 16)
        _raises_naming(path, load_mask, 16)
    assert "empty" in _raises_naming(empty, load_image, 16)


def test_too_large_image_refused(tmp_path, monkeypatch):
    path = _save(np.zeros((20, 20), np.uint8), tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 399)
    assert "megapixel" in _raises_naming(path, load_image, 8)


# ---------------------------------------------------------------- datasets

def test_dataset_masks_and_size_mismatch(tmp_path):
    img = _save(np.zeros((20, 30, 3), np.uint8), tmp_path / "img.png")
    ok_mask = _save(np.full((20, 30), 255, np.uint8), tmp_path / "ok_mask.png")
    bad_mask = _save(np.zeros((21, 30), np.uint8), tmp_path / "bad_mask.png")
    ds = AnomalyDataset([(img, 0, "good", None), (img, 1, "x", ok_mask), (img, 1, "x", bad_mask), (img, 1, "x", None)],
                        (8, 12))
    assert ds.size == (8, 12) and len(ds.records) == 4
    good = ds[0]
    assert set(good) == {"image", "mask", "label", "defect_type", "path", "has_mask", "box"}
    assert good["box"].tolist() == [0, 0, 8, 12]  # squashed: the whole input
    assert good["mask"].shape == (1, 8, 12) and good["mask"].sum() == 0 and good["label"] == 0 and good["has_mask"]
    assert ds[1]["mask"].min() == 1 and ds[1]["label"] == 1 and ds[1]["has_mask"]
    unmasked = ds[3]  # a defect image labelled per image only: its zero mask means nothing
    assert unmasked["label"] == 1 and not unmasked["has_mask"] and unmasked["mask"].sum() == 0
    assert [r.has_mask for r in ds.records] == [True, True, True, False]
    with pytest.raises(CflowInputError) as info:
        ds[2]
    assert "bad_mask.png" in str(info.value) and "img.png" in str(info.value)
    batch = next(iter(torch.utils.data.DataLoader(AnomalyDataset([ds.records[i] for i in (0, 1, 3)], 8), batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].tolist() == [0, 1, 1]
    assert batch["defect_type"] == ["good", "x", "x"] and batch["has_mask"].tolist() == [True, True, False]


def test_list_images_expands_folders(tmp_path):
    folder = tmp_path / "imgs"
    for name in ("b.PNG", "a.jpg", "sub/c.tif", ".hidden.png"):
        _save(np.zeros((4, 4), np.uint8), folder / name)
    (folder / "readme.txt").write_text("x")
    single = _save(np.zeros((4, 4), np.uint8), tmp_path / "single.bmp")
    assert list_images([single, folder]) == [single, folder / "a.jpg", folder / "b.PNG", folder / "sub" / "c.tif"]
    assert list_images(str(single)) == [single]
    with pytest.raises(CflowInputError, match="nope"):
        list_images([tmp_path / "nope"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CflowInputError, match="empty_dir"):
        list_images([tmp_path / "empty_dir"])


def test_mvtec_layout_errors(tmp_path):
    with pytest.raises(CflowInputError, match="does not exist"):
        mvtec_dataset(tmp_path / "absent", "bottle", "train", 32)
    _save(np.zeros((8, 8), np.uint8), tmp_path / "bottle" / "train" / "good" / "0.png")
    (tmp_path / "cable" / "train" / "good").mkdir(parents=True)
    assert mvtec_categories(tmp_path) == ["bottle", "cable"]
    with pytest.raises(CflowInputError) as info:
        mvtec_dataset(tmp_path, "screw", "train", 32)
    assert "screw" in str(info.value) and "bottle, cable" in str(info.value)
    with pytest.raises(CflowInputError, match="no training images"):
        mvtec_dataset(tmp_path, "cable", "train", 32)
    with pytest.raises(CflowInputError, match="test"):
        mvtec_dataset(tmp_path, "bottle", "test", 32)
    _save(np.zeros((8, 8), np.uint8), tmp_path / "bottle" / "test" / "crack" / "007.png")
    assert [r.has_mask for r in mvtec_dataset(tmp_path, "bottle", "test", 32).records] == [False]  # labelled only
    msg = _raises_naming(tmp_path, mvtec_dataset, "bottle", "test", 32, True)
    mask = tmp_path / "bottle" / "ground_truth" / "crack" / "007_mask.png"
    assert msg == (f"missing mask '{mask}' for test image '{tmp_path / 'bottle' / 'test' / 'crack' / '007.png'}': "
                   "add the mask or move the image out of test/")


def test_folder_dataset(tmp_path):
    _save(np.zeros((8, 8), np.uint8), tmp_path / "normal" / "n1.png")
    _save(np.zeros((8, 8), np.uint8), tmp_path / "bad" / "d1.png")
    _save(np.zeros((8, 8), np.uint8), tmp_path / "bad" / "d2.png")
    _save(np.full((8, 8), 255, np.uint8), tmp_path / "masks" / "d1.png")
    _save(np.full((8, 8), 255, np.uint8), tmp_path / "masks" / "d2_mask.png")
    ds = folder_dataset(tmp_path / "normal", 8, tmp_path / "bad", tmp_path / "masks")
    assert [(r.label, r.defect_type) for r in ds.records] == [(0, "good"), (1, "abnormal"), (1, "abnormal")]
    assert ds[2]["mask"].min() == 1 and ds[0]["mask"].max() == 0
    assert folder_dataset(tmp_path / "normal", 8, tmp_path / "bad")[1]["mask"].max() == 0
    labelled_only = folder_dataset(tmp_path / "normal", 8, tmp_path / "bad")
    assert [r.has_mask for r in labelled_only.records] == [True, False, False]
    with pytest.raises(CflowInputError, match="d1.*--mask-dir"):
        folder_dataset(tmp_path / "normal", 8, tmp_path / "bad", require_masks=True)
    (tmp_path / "masks" / "d2_mask.png").unlink()
    ds = folder_dataset(tmp_path / "normal", 8, tmp_path / "bad", tmp_path / "masks")
    assert [r.has_mask for r in ds.records] == [True, True, False] and not ds[2]["has_mask"]
    with pytest.raises(CflowInputError, match="d2"):
        folder_dataset(tmp_path / "normal", 8, tmp_path / "bad", tmp_path / "masks", require_masks=True)


def test_split_train_val_deterministic_and_disjoint(tmp_path):
    ds = AnomalyDataset([(tmp_path / f"{i}.png", 0, "good", None) for i in range(20)], 16)
    train, val = split_train_val(ds, 0.25, seed=3)
    train2, val2 = split_train_val(ds, 0.25, seed=3)
    assert train.records == train2.records and val.records == val2.records
    assert len(val) == 5 and len(train) == 15 and train.size == val.size == (16, 16)
    assert not set(train.records) & set(val.records)
    assert set(train.records) | set(val.records) == set(ds.records)
    assert split_train_val(ds, 0.25, seed=4)[1].records != val.records
    with pytest.raises(CflowInputError):
        split_train_val(ds, 1.0, seed=0)


# ---------------------------------------------------------------- synthetic data

def test_synthetic_generator_deterministic_and_readable(tmp_path):
    kw = dict(n_train=6, n_test_good=3, n_test_defect=6, size=(64, 96), seed=5)
    roots = [make_synthetic_mvtec(tmp_path / name, **kw) for name in ("a", "b")]
    files = [sorted(p.relative_to(r) for p in r.rglob("*.png")) for r in roots]
    assert files[0] == files[1] and len(files[0]) == 6 + 3 + 6 + 6
    assert all((roots[0] / f).read_bytes() == (roots[1] / f).read_bytes() for f in files[0])
    other = make_synthetic_mvtec(tmp_path / "c", **{**kw, "seed": 6})
    assert (other / "synthetic/train/good/000.png").read_bytes() != (roots[0] / "synthetic/train/good/000.png").read_bytes()
    with pytest.raises(CflowInputError, match="not empty"):
        make_synthetic_mvtec(tmp_path / "a", **kw)

    assert mvtec_categories(roots[0]) == ["synthetic"]
    train = mvtec_dataset(roots[0], "synthetic", "train", (64, 96))
    test = mvtec_dataset(roots[0], "synthetic", "test", (64, 96))
    assert len(train) == 6 and {r.label for r in train.records} == {0}
    assert [r.defect_type for r in test.records].count("good") == 3
    assert sorted(r.defect_type for r in test.records if r.label == 1) == ["scratch"] * 3 + ["spot"] * 3
    for i, rec in enumerate(test.records):
        item = test[i]
        gray = item["image"][0]
        if rec.label == 0:
            assert rec.mask_path is None and item["mask"].sum() == 0
            continue
        inside = item["mask"][0].bool()
        assert 0.005 < inside.float().mean() < 0.06
        assert abs(gray[inside].mean() - gray[~inside].mean()) > 0.15


# ---------------------------------------------------------------- real data

def test_real_magnetic_tile():
    if not (REAL_ROOT / "magnetic_tile").is_dir():
        pytest.skip(f"real dataset not present at {REAL_ROOT}")
    train = mvtec_dataset(REAL_ROOT, "magnetic_tile", "train", 256)
    test = mvtec_dataset(REAL_ROOT, "magnetic_tile", "test", 256)
    assert len(train) == 762 and len(test) == 582
    kinds = {}
    for rec in test.records:
        kinds[rec.defect_type] = kinds.get(rec.defect_type, 0) + 1
        assert rec.label == (rec.defect_type != "good")
        assert (rec.mask_path is None) == (rec.defect_type == "good")
    assert kinds == {"good": 190, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    item = train[0]
    assert item["image"].shape == (3, 256, 256) and 0 <= item["image"].min() and item["image"].max() <= 1
    defect = next(i for i, r in enumerate(test.records) if r.defect_type == "blowhole")
    item = test[defect]
    assert item["mask"].shape == (1, 256, 256) and item["mask"].sum() > 0 and item["label"] == 1


def test_a_broken_link_or_fifo_in_a_set_stops_it_with_one_line_naming_it(synthetic_root, tmp_path):
    import os

    from cflow_ad.data import folder_dataset, mvtec_dataset

    train = tmp_path / "data" / "synthetic" / "train" / "good"
    train.mkdir(parents=True)
    for p in sorted((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))[:3]:
        (train / p.name).write_bytes(p.read_bytes())
    assert len(mvtec_dataset(tmp_path / "data", "synthetic", "train", 32)) == 3
    for name, make in (("gone.png", lambda p: p.symlink_to(tmp_path / "missing.png")), ("pipe.png", os.mkfifo)):
        make(train / name)
        for build in (lambda: mvtec_dataset(tmp_path / "data", "synthetic", "train", 32),
                      lambda: folder_dataset(train, 32)):
            with pytest.raises(CflowInputError) as info:
                build()
            assert name in str(info.value) and "\n" not in str(info.value)
        (train / name).unlink()
