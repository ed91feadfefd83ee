"""ONNX export: the whole model in onnxruntime, against PyTorch."""

from __future__ import annotations

import csv

import pytest
import torch

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.cli import run
from cflow_ad.data import load_image
from cflow_ad.errors import CflowInputError
from cflow_ad.runtime import OnnxModel

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert run(["export", "--model", str(tiny_checkpoint), "--output", str(path)]) == 0
    return path


def test_onnx_maps_and_scores_match_pytorch(exported, tiny_checkpoint, synthetic_root):
    model = load_checkpoint(tiny_checkpoint)
    files = sorted((synthetic_root / "synthetic" / "test").rglob("*.png"))
    images = torch.stack([load_image(f, 128) for f in files])
    onnx_model = OnnxModel(exported)
    assert onnx_model.config == model.config
    assert onnx_model.train_max_score == pytest.approx(float(model.train_max_score))
    with torch.no_grad():
        ref_maps, ref_scores = model(images)
    for lo, hi in ((0, 1), (1, 4), (0, len(files))):  # the batch size is dynamic
        maps, scores = map(torch.from_numpy, onnx_model(images[lo:hi]))
        assert maps.shape == (hi - lo, 128, 128)
        assert torch.allclose(maps, ref_maps[lo:hi], rtol=1e-5, atol=1e-4)
        assert torch.allclose(scores, ref_scores[lo:hi], rtol=1e-5, atol=1e-4)
    assert ref_maps.std() > 1e-3  # the comparison is not between constant maps
    noise = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))  # far out of range: log scores
    with torch.no_grad():
        ref_maps, ref_scores = model(noise)
    maps, scores = map(torch.from_numpy, onnx_model(noise))
    assert torch.allclose(maps, ref_maps, rtol=1e-5, atol=1e-4) and torch.allclose(scores, ref_scores, rtol=1e-5)
    assert ref_scores.min() > 10 * model.train_max_score  # where Eq. 8 would have saturated


def test_predict_in_onnxruntime_matches_pytorch(exported, tiny_checkpoint, synthetic_root, tmp_path):
    folder = synthetic_root / "synthetic" / "test"
    torch_rows = api.predict(tiny_checkpoint, [folder], tmp_path / "t", progress=False)
    onnx_rows = api.predict(exported, [folder], tmp_path / "o", progress=False)
    runtime_rows = api.predict(tiny_checkpoint, [folder], tmp_path / "r", progress=False, runtime="onnx")
    assert len(torch_rows) == len(onnx_rows) == len(runtime_rows) == 12
    for a, b, c in zip(torch_rows, onnx_rows, runtime_rows):
        assert a["path"] == b["path"] == c["path"]
        assert b["score"] == pytest.approx(a["score"], rel=1e-5, abs=1e-4)  # log scores reach hundreds
        assert c["score"] == pytest.approx(a["score"], rel=1e-5, abs=1e-4)  # log scores reach hundreds
    with open(tmp_path / "o" / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 12
    with pytest.raises(CflowInputError, match="paper normalisation"):
        api.predict(exported, [folder], tmp_path / "p", normalization="paper", progress=False)


def test_a_bad_onnx_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CflowInputError, match="broken.onnx") as err:
        OnnxModel(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(CflowInputError, match="format"):
        api.export(tmp_path / "x.safetensors", tmp_path / "x.tflite", format="tflite")
