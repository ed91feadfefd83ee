"""ONNX export: the whole model in onnxruntime, against PyTorch."""

from __future__ import annotations

import csv
import json

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


def _auroc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def test_int8_export_quantises_every_decoder_product_and_onnxruntime_fuses_them(tiny_checkpoint, synthetic_root,
                                                                                 tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = load_checkpoint(tiny_checkpoint)
    ranges = model.activation_ranges  # recorded when training fixed its constants
    assert (ranges[..., 0] < ranges[..., 1]).all() and (ranges[:, :, 1, 0] == 0).all()  # ReLU output: from 0
    products = len(model.decoders) * model.config.coupling_layers * 3
    path = tmp_path / "int8.onnx"
    assert run(["export", "--model", str(tiny_checkpoint), "--output", str(path), "--quantize", "int8"]) == 0
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == products and ops.count("DequantizeLinear") == 2 * products
    assert sum(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2 for t in proto.graph.initializer) == products
    assert {p.key: p.value for p in proto.metadata_props}["cflow_ad_quantize"] == "int8"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("MatMulIntegerToFloat") == products  # the integer kernels run every decoder product

    files = sorted((synthetic_root / "synthetic" / "test").rglob("*.png"))
    images = torch.stack([load_image(f, 128) for f in files]).numpy()
    labels = [int("good" not in str(f)) for f in files]
    fp32_maps, fp32_scores = OnnxModel(_fp32(tiny_checkpoint, tmp_path))(images)
    int8 = OnnxModel(path)
    assert int8.quantize == "int8" and OnnxModel(_fp32(tiny_checkpoint, tmp_path)).quantize == "none"
    int8_maps, int8_scores = int8(images)
    assert not np.array_equal(int8_maps, fp32_maps)  # int8 arithmetic really ran
    good = np.array(labels) == 0  # within the training range the maps agree closely
    assert np.corrcoef(int8_maps[good].ravel(), fp32_maps[good].ravel())[0, 1] > 0.95
    assert _auroc(labels, int8_scores) >= _auroc(labels, fp32_scores) - 0.05


def _fp32(checkpoint, tmp_path):
    path = tmp_path / "fp32.onnx"
    api.export(checkpoint, path)
    return path


def test_int8_needs_recorded_ranges_and_a_checkpoint_for_onnxruntime(tiny_checkpoint, exported, synthetic_root, tmp_path):
    from safetensors.torch import load_file, save_file

    from cflow_ad.checkpoint import FORMAT, read_metadata

    old = tmp_path / "old.safetensors"  # a checkpoint from before the ranges were recorded: it still loads
    state = load_file(str(tiny_checkpoint))
    del state["activation_ranges"]
    meta = read_metadata(tiny_checkpoint)
    save_file(state, str(old), metadata={"format": FORMAT, "config": json.dumps(meta["config"]), "extra": "{}"})
    assert not load_checkpoint(old).has_activation_ranges
    with pytest.raises(CflowInputError, match="no recorded decoder input ranges"):
        api.export(old, tmp_path / "x.onnx", quantize="int8")
    assert api.export(old, tmp_path / "x.onnx").is_file()  # fp32 still exports
    folder = synthetic_root / "synthetic" / "test"
    with pytest.raises(CflowInputError, match="scored as it was exported"):
        api.predict(exported, [folder], tmp_path / "p", progress=False, quantize="int8")
    with pytest.raises(CflowInputError, match="for --runtime onnx"):
        api.predict(tiny_checkpoint, [folder], tmp_path / "p", progress=False, quantize="int8")
    with pytest.raises(CflowInputError, match="unknown --quantize"):
        api.export(tiny_checkpoint, tmp_path / "y.onnx", quantize="int4")


def test_test_scores_an_onnx_file_as_exported(exported, tiny_checkpoint, synthetic_root, tmp_path):
    """`test --model model.onnx` measures the deployed file: the same metrics as the checkpoint exported on the fly,
    its thresholds from the file's metadata, and its int8 setting read from the file rather than a flag."""
    source = api.DataSource(synthetic_root, "synthetic")
    calibrated = tmp_path / "calibrated.safetensors"
    api.calibrate(tiny_checkpoint, calibrated, source, target_fpr=0.2, progress=False)
    onnx_file = api.export(calibrated, tmp_path / "m.onnx")
    on_the_fly = api.test(calibrated, None, source, progress=False, runtime="onnx")
    from_file = api.test(onnx_file, tmp_path / "t", source, progress=False)
    assert from_file["runtime"] == "onnx" and from_file["quantize"] == "none" and from_file["images"] == 12
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert from_file[key] == pytest.approx(on_the_fly[key], abs=1e-6)
    assert from_file["thresholds"] == on_the_fly["thresholds"]
    assert from_file["at_threshold"] == on_the_fly["at_threshold"] and from_file["at_threshold"]
    assert (tmp_path / "t" / "scores.csv").read_text().count("\n") == 13
    int8_file = api.export(tiny_checkpoint, tmp_path / "q.onnx", quantize="int8")
    assert api.test(int8_file, None, source, progress=False)["quantize"] == "int8"
    with pytest.raises(CflowInputError, match="scored as it was exported"):
        api.test(exported, None, source, progress=False, quantize="int8")
    with pytest.raises(CflowInputError, match="fixed mode"):
        api.test(exported, None, source, progress=False, normalization="paper")


def test_test_and_predict_score_int8_in_onnxruntime(tiny_checkpoint, synthetic_root, tmp_path):
    source = api.DataSource(synthetic_root, "synthetic")
    fp32 = api.test(tiny_checkpoint, None, source, progress=False)
    onnx_fp32 = api.test(tiny_checkpoint, None, source, progress=False, runtime="onnx")
    int8 = api.test(tiny_checkpoint, None, source, progress=False, runtime="onnx", quantize="int8")
    assert onnx_fp32["quantize"] == "none" and int8["quantize"] == "int8" and int8["runtime"] == "onnx"
    for key in ("image_auroc", "pixel_auroc"):
        assert onnx_fp32[key] == pytest.approx(fp32[key], abs=1e-4)
        assert abs(int8[key] - fp32[key]) <= 0.05
    rows = api.predict(tiny_checkpoint, [synthetic_root / "synthetic" / "test"], tmp_path / "p", progress=False,
                       runtime="onnx", quantize="int8")
    assert len(rows) == 12 and all(r["raw_score"] is not None for r in rows)
