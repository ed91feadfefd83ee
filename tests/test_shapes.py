"""Any input shape: (H, W) sizes, keep-aspect padding and tiling, from the geometry to train, test,
predict, serve and the ONNX export."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.cli import build_parser, run
from cflow_ad.config import CFlowConfig
from cflow_ad.data import load_image_and_original, make_fine_defect_mvtec, make_synthetic_mvtec
from cflow_ad.errors import CflowInputError
from cflow_ad.encoder import Tiling
from cflow_ad.geometry import InputFrame, resize_bilinear, restore, tile_starts
from cflow_ad.source import DataSource

from .conftest import TINY


# ---------------------------------------------------------------- geometry


def test_keep_aspect_fits_the_longer_side_centres_the_image_and_mirrors_the_rest():
    frame = InputFrame((64, 128), keep_aspect=True)
    assert frame.box(100, 50) == (0, 48, 64, 32)  # a portrait image in a landscape input
    assert frame.box(10, 100) == (25, 0, 13, 128)  # a strip: the width fits, (64 - 13) // 2 above
    assert frame.box(64, 128) == (0, 0, 64, 128)  # the input's own shape: no padding
    assert InputFrame((64, 128)).box(100, 50) == (0, 0, 64, 128)  # squashed, the paper's way
    ramp = np.tile(np.arange(40, dtype=np.uint8)[None, :] * 6, (80, 1))
    arr, (top, left, h, w) = frame.place(Image.fromarray(ramp))
    assert arr.shape == (64, 128, 3) and (top, left, h, w) == (0, 48, 64, 32)
    inside = arr[:, left : left + w, 0].astype(int)
    assert np.abs(inside - np.asarray(Image.fromarray(ramp).resize((32, 64), Image.Resampling.BILINEAR))).max() == 0
    assert (arr[:, left - 1] == arr[:, left]).all() and (arr[:, left + w] == arr[:, left + w - 1]).all()  # mirrored
    assert (arr[:, :left] > 0).any() and (arr[:, left + w :] > 0).any()  # filled with image content, not zeros


def test_restore_leaves_the_padding_out_of_maps_and_scores():
    maps = np.zeros((2, 8, 16), dtype=np.float32)
    maps[0, :, :4] = 100.0  # in image 0's padding only
    maps[0, 2, 6] = 5.0
    maps[1, 3, 3] = 7.0
    boxes = np.array([[0, 4, 8, 8], [0, 0, 8, 16]])
    out, scores = restore(maps, np.array([100.0, 7.0]), boxes)
    assert out.shape == maps.shape and scores.tolist() == pytest.approx([out[0].max(), 7.0])
    assert out[0].max() < 6.0 and out[0].max() > 1.0  # the 100s are gone, the 5 is resized into the frame
    assert np.array_equal(out[1], maps[1])  # a whole-frame box is left as it is
    kept = restore(maps, np.array([42.0, 7.0]), boxes, rescore=False)[1]
    assert kept.tolist() == [42.0, 7.0]  # a score from the features (SPADE, PatchCore) stays
    same = restore(maps, np.array([1.0, 2.0]), np.array([[0, 0, 8, 16]] * 2))
    assert same[0] is maps and same[1].tolist() == [1.0, 2.0]


def test_numpy_resize_equals_torch_interpolate():
    rng = np.random.default_rng(0)
    for (h, w), size in (((64, 64), (256, 256)), ((7, 9), (301, 33)), ((256, 256), (100, 50)), ((5, 5), (5, 5))):
        x = rng.normal(size=(2, h, w)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        assert np.allclose(resize_bilinear(x, size), want.numpy(), atol=1e-5)


def test_tile_starts_cover_the_axis_with_the_last_tile_flush():
    assert tile_starts(256, 128, 32) == [0, 96, 128]
    assert tile_starts(128, 64, 32) == [0, 32, 64]
    assert tile_starts(64, 64, 0) == [0]
    assert tile_starts(192, 64, 0) == [0, 64, 128]


def test_tiled_features_are_the_whole_images_where_the_encoder_is_local():
    """With an encoder whose cells see only their own pixels (average pooling), features put back from
    tiles must equal the whole image's exactly, overlaps included; a per-tile constant shows the average."""
    strides = (8, 16)
    tiling = Tiling((64, 96), 32, 16, strides)
    pool = lambda x: [torch.nn.functional.avg_pool2d(x, s) for s in strides]  # noqa: E731
    x = torch.rand(2, 3, 64, 96)
    for whole, tiled in zip(pool(x), tiling(x, pool)):
        assert tiled.shape == whole.shape and torch.allclose(tiled, whole, atol=1e-6)
    index = lambda t: [torch.arange(len(t), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)]  # noqa: E731
    out = Tiling((64, 96), 32, 16, (8,))(torch.zeros(1, 3, 64, 96), index)[0][0, 0]  # 3 x 5 tiles, row-major
    # cell (0, 0) is only in tile 0; cell (2, 2) (pixels 16-23) is in tiles 0, 1, 5, 6 (rows 0/16, cols 0/16)
    assert out[0, 0] == 0.0 and out[2, 2] == pytest.approx((0 + 1 + 5 + 6) / 4)


# ---------------------------------------------------------------- config and CLI


def test_image_size_takes_a_square_or_a_pair_everywhere():
    assert CFlowConfig(image_size=128).image_size == (128, 128)
    assert CFlowConfig(image_size=[64, 128]).image_size == (64, 128)
    old = json.loads(CFlowConfig().to_json()) | {"image_size": 256}  # checkpoints before (H, W)
    assert CFlowConfig.from_dict(old).image_size == (256, 256)
    back = CFlowConfig.from_dict(json.loads(CFlowConfig(image_size=(64, 96)).to_json()))
    assert back == CFlowConfig(image_size=(64, 96)) and back.size_text == "64x96 px"
    parse = lambda *a: build_parser().parse_args(["train", "--output", "x", *a])  # noqa: E731
    assert parse("--image-size", "96").image_size == (96, 96)
    assert parse("--image-size", "64", "128").image_size == (64, 128)
    with pytest.raises(SystemExit):
        parse("--image-size", "64", "128", "32")
    for bad, match in (({"image_size": (64, 100)}, "multiples of 32"), ({"image_size": "big"}, "one int or"),
                       ({"tile": 48}, "tile must be"), ({"tile": 512}, "tile must be"),
                       ({"tile": 128, "tile_overlap": 20}, "tile_overlap"),
                       ({"tile": 128, "tile_overlap": 128}, "tile_overlap")):
        with pytest.raises(CflowInputError, match=match):
            CFlowConfig(**bad)


# ---------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served_score(checkpoint: Path, image: Path) -> dict:
    """POST one image to `cflow-ad serve`'s app (uvicorn in a thread) and return its JSON answer."""
    import uvicorn

    from cflow_ad.inference import Inspector
    from cflow_ad.serve import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Inspector(checkpoint, "torch")), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if server.started:
                break
            time.sleep(0.1)
        r = requests.post(f"http://127.0.0.1:{port}/predict", data=image.read_bytes(),
                          headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def oblong_root(tmp_path_factory) -> Path:
    """The synthetic set at 96 x 160 (3:5): a shape neither square nor the inputs' 1:2."""
    return make_synthetic_mvtec(tmp_path_factory.mktemp("oblong"), n_train=16, n_test_good=4, n_test_defect=4,
                                size=(96, 160), seed=1)


def test_a_held_out_split_keeps_the_aspect_handling(oblong_root):
    from cflow_ad.data import split_train_val

    frame = InputFrame((64, 128), keep_aspect=True)
    full = DataSource(oblong_root, "synthetic").open("train", CFlowConfig(image_size=(64, 128), keep_aspect=True))
    train, held_out = split_train_val(full, 0.25, 0)
    assert full.frame == train.frame == held_out.frame == frame
    assert train[0]["box"].tolist() == held_out[0]["box"].tolist() == list(frame.box(96, 160)) != [0, 0, 64, 128]


SHAPES = {
    "keep-aspect": ["--image-size", "64", "128", "--keep-aspect", "--calibration-fraction", "0.25"],
    "tiled": ["--image-size", "96", "160", "--tile", "64", "--tile-overlap", "32", "--calibration-fraction", "0.25"],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_oblong_inputs_train_test_predict_serve_and_export(shape, oblong_root, tmp_path):
    pytest.importorskip("onnxruntime")
    tiny = ["--pool-layers", "2", "--last-stride", "16", "--coupling-layers", "2", "--condition-dim", "16",
            "--epochs", "1", "--sub-epochs", "1", "--min-steps", "0", "--batch-size", "8", "--fiber-batch", "256"]
    data = ["--data", str(oblong_root), "--category", "synthetic"]
    model = tmp_path / "m" / "model.safetensors"
    assert run(["--quiet", "train", *data, "--output", str(model.parent), *tiny, *SHAPES[shape]]) == 0
    config = load_checkpoint(model).config
    assert config.image_size == (64, 128) if shape == "keep-aspect" else (config.tile, config.image_size) == (64, (96, 160))

    assert run(["--quiet", "test", "--model", str(model), *data, "--output", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    # maps put back in the frame of the masks: 1.0 / 0.99 measured for both (misaligned maps would fall far)
    assert metrics["images"] == 8 and metrics["image_auroc"] >= 0.9 and metrics["pixel_auroc"] >= 0.9

    folder = oblong_root / "synthetic" / "test"
    onnx = tmp_path / "m.onnx"
    assert run(["export", "--model", str(model), "--output", str(onnx)]) == 0
    torch_rows = api.predict(model, [folder], tmp_path / "p", progress=False)
    onnx_rows = api.predict(onnx, [folder], tmp_path / "o", progress=False)
    assert len(torch_rows) == len(onnx_rows) == 8 and not any(r["error"] for r in torch_rows)
    for a, b in zip(torch_rows, onnx_rows):
        assert b["score"] == pytest.approx(a["score"], rel=1e-5, abs=1e-4)
        assert (a["width"], a["height"]) == (160, 96)
        for kind in ("heatmap", "mask", "overlay"):
            assert Image.open(a[kind]).size == (160, 96)  # at the image's own size, not the input's
    # the exported graph itself, on a batch of inputs: maps and scores to 1e-4
    from cflow_ad.runtime import OnnxModel

    net = load_checkpoint(model).eval()
    inputs = torch.stack([load_image_and_original(p, config)[0] for p in sorted(folder.rglob("*.png"))])
    with torch.no_grad():
        ref_maps, ref_scores = net(inputs)
    maps, scores = map(torch.from_numpy, OnnxModel(onnx)(inputs))
    assert maps.shape == (8, *config.image_size) and ref_maps.std() > 1e-3
    assert torch.allclose(maps, ref_maps, rtol=1e-5, atol=1e-4) and torch.allclose(scores, ref_scores, rtol=1e-5, atol=1e-4)

    served = _served_score(model, Path(torch_rows[0]["path"]))
    assert served["score"] == pytest.approx(torch_rows[0]["score"], rel=1e-5, abs=1e-5)
    assert (served["width"], served["height"]) == (160, 96) and served["label"] == torch_rows[0]["label"]


def test_tiling_finds_small_defects_that_squashing_erases(tmp_path):
    source = DataSource(make_fine_defect_mvtec(tmp_path / "data"), "fine")
    base = TINY.replace(border_pad=0, fiber_batch=1024, sub_epochs=1)
    found = {}
    for name, config in (("squashed", base.replace(image_size=64)),
                         ("tiled", base.replace(image_size=256, tile=128, tile_overlap=32))):
        path = api.train(config, tmp_path / name, source, progress=False, log=lambda m: None)
        found[name] = api.test(path, None, source, progress=False)
    assert found["squashed"]["pixel_auroc"] < 0.7  # near chance: 4x smaller, the checkerboard is gone
    assert found["tiled"]["pixel_auroc"] >= 0.95 and found["tiled"]["image_auroc"] >= 0.95
