"""Hostile or broken model files (issue 33): every one is refused on load with one line naming the file,
before it costs memory, runs code or scores a single image."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cflow_ad import api, checkpoint
from cflow_ad.checkpoint import load_checkpoint, save_checkpoint
from cflow_ad.cli import main
from cflow_ad.config import CFlowConfig
from cflow_ad.errors import CflowInputError
from cflow_ad.export import export_onnx
from cflow_ad.runtime import OnnxModel
from cflow_ad.training import load_state

from .test_serve import _free_port, _serving


@pytest.mark.parametrize("changes,needle", [
    ({"coupling_layers": 100000}, "coupling_layers must be from 1 to 64"),
    ({"coupling_layers": None}, "coupling_layers must be an integer"),
    ({"pool_layers": "3"}, "pool_layers must be an integer"),
    ({"clamp_alpha": float("nan")}, "clamp_alpha"),
    ({"lr": float("inf")}, "lr"),
    ({"condition_dim": 1 << 20}, "condition_dim"),
    ({"batch_size": 10**9}, "batch_size"),
    ({"blur_sigma": 1e9}, "blur_sigma"),
    ({"image_size": [1 << 20, 32]}, "image_size"),
    ({"conditional": "yes"}, "conditional must be true or false"),
    ({"weights": 7}, "weights must be a string"),
])
def test_config_fields_have_types_and_sane_bounds(changes, needle):
    data = {**json.loads(CFlowConfig().to_json()), **changes}
    with pytest.raises(CflowInputError, match=needle) as err:
        CFlowConfig.from_dict(data)
    assert "\n" not in str(err.value)


def test_a_config_that_is_not_an_object_is_a_clear_error():
    with pytest.raises(CflowInputError, match="expected an object of options, got list"):
        CFlowConfig.from_dict([1, 2])


_DROP = object()


def _rewrite(src: Path, dst: Path, meta: dict | None = None, config: dict | None = None,
             thresholds: dict | None = None, tensors=None) -> Path:
    """A copy of checkpoint `src` with its header metadata edited: `meta` keys replaced (None: removed),
    `config` / `thresholds` fields replaced (None: removed), and `tensors(state)` applied to its tensors."""
    with safe_open(str(src), framework="pt") as f:
        header, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for key, fields in (("config", config), ("thresholds", thresholds)):
        if fields is not None:
            data = json.loads(header[key])
            data.update(fields)
            header[key] = json.dumps({k: v for k, v in data.items() if v is not _DROP})
    for key, value in (meta or {}).items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    if tensors is not None:
        tensors(state)
    save_file(state, str(dst), metadata=header)
    return dst


def _set(name: str, value: float):
    def edit(state):
        state[name].view(-1)[0] = value
    return edit


def _swap(state):
    """The first non-square matrix of the decoders, transposed."""
    key = next(k for k, v in state.items() if k.startswith("decoders") and v.ndim == 2 and v.shape[0] != v.shape[1])
    state[key] = state[key].T.contiguous()


def _retype(state):
    state["map_offset"] = state["map_offset"].double()


# (fixture, edit, what the one line says)
BROKEN = {
    "config not JSON": ("tiny", {"meta": {"config": "{not json"}}, "config is not JSON"),
    "thresholds not JSON": ("padim", {"meta": {"thresholds": "[1,"}}, "thresholds is not JSON"),
    "extra not JSON": ("tiny", {"meta": {"extra": "nope"}}, "extra is not JSON"),
    "extra a list": ("tiny", {"meta": {"extra": "[]"}}, "extra metadata is a list"),
    "no config": ("tiny", {"meta": {"config": None}}, "no config"),
    "config a list": ("tiny", {"meta": {"config": "[1, 2]"}}, "expected an object of options"),
    "pool_layers a string": ("tiny", {"config": {"pool_layers": "3"}}, "pool_layers must be an integer"),
    "coupling_layers null": ("tiny", {"config": {"coupling_layers": None}}, "coupling_layers must be an integer"),
    "coupling_layers 100000": ("tiny", {"config": {"coupling_layers": 100000}}, "coupling_layers must be from 1 to 64"),
    "clamp_alpha NaN": ("tiny", {"config": {"clamp_alpha": float("nan")}}, "clamp_alpha"),
    "one coupling more": ("tiny", {"config": {"coupling_layers": 3}}, "missing decoders.0.blocks.2"),
    "unknown thresholds key": ("padim", {"thresholds": {"surprise": 1}}, "unknown key 'surprise'"),
    "threshold a string": ("padim", {"thresholds": {"image": "0.5"}}, "image must be a finite number"),
    "threshold missing": ("padim", {"thresholds": {"pixel": _DROP}}, "'pixel' is missing"),
    "threshold NaN": ("padim", {"thresholds": {"image": float("nan")}}, "image must be a finite number"),
    "threshold Inf": ("padim", {"thresholds": {"pixel": float("inf")}}, "pixel must be a finite number"),
    "region NaN": ("padim", {"thresholds": {"region": float("nan")}}, "region must be a finite number"),
    "calibration scores NaN": ("padim", {"thresholds": {"good_image_scores": [0.1, float("nan")]}},
                               "good_image_scores must be a list of finite numbers"),
    "method changed": ("tiny", {"config": {"method": "padim"}}, "do not fit a padim model on mobilenet_v2"),
    "encoder changed": ("padim", {"config": {"encoder": "resnet18"}}, "do not fit a padim model on resnet18"),
    "shape swapped": ("tiny", {"tensors": _swap}, "where a cflow model on mobilenet_v2 has F32"),
    "dtype changed": ("tiny", {"tensors": _retype}, "tensor map_offset is F64"),
    "NaN weight": ("tiny", {"tensors": _set("decoders.0.blocks.0.in_x.weight", float("nan"))}, "NaN or Inf values in"
                   " decoders.0.blocks.0.in_x.weight"),
    "Inf constant": ("padim", {"tensors": _set("train_max_score", float("inf"))}, "NaN or Inf values in train_max_score"),
    "unknown precision": ("tiny", {"meta": {"precision": "fp8"}}, "its precision 'fp8' is none of fp32, bf16, fp16"),
    "unknown flow precision": ("tiny", {"meta": {"flow_precision": "fp16"}},
                               "its flow precision 'fp16' is none of fp32, bf16"),
}


@pytest.fixture
def checkpoints(tiny_checkpoint, padim_checkpoint):
    return {"tiny": tiny_checkpoint, "padim": padim_checkpoint}


@pytest.mark.parametrize("case", list(BROKEN))
def test_an_edited_checkpoint_is_one_line_naming_it_before_anything_is_built(case, checkpoints, tmp_path, monkeypatch):
    which, edit, needle = BROKEN[case]
    bad = _rewrite(checkpoints[which], tmp_path / "edited.safetensors", **edit)
    built = []
    real = checkpoint.build_model

    def spy(config, pretrained=True):
        model = real(config, pretrained)
        built.append(next(model.buffers()).device.type)
        return model

    monkeypatch.setattr(checkpoint, "build_model", spy)
    with pytest.raises(CflowInputError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert needle in msg and str(bad) in msg and "\n" not in msg
    assert set(built) <= {"meta"}  # refused before a model took any memory
    with pytest.raises(CflowInputError):  # `export` loads the same way
        api.export(bad, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("key", ["precision", "flow_precision"])
def test_a_checkpoint_from_before_the_precision_was_recorded_reads_as_fp32(key, padim_checkpoint, tmp_path):
    old = _rewrite(padim_checkpoint, tmp_path / "old.safetensors", meta={key: None})
    assert key not in safe_open(str(old), framework="pt").metadata()
    assert checkpoint.read_metadata(old)[key] == getattr(load_checkpoint(old), key) == "fp32"
    assert getattr(load_checkpoint(padim_checkpoint), key) == "fp32"  # trained in fp32, recorded


def _cli(*args: str) -> list[str]:
    """Run the CLI; its stderr lines (the run must exit 2)."""
    proc = subprocess.run([sys.executable, "-m", "cflow_ad", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_predict_and_serve_refuse_a_broken_model_with_one_line(checkpoints, synthetic_root, tmp_path):
    huge = _rewrite(checkpoints["tiny"], tmp_path / "huge.safetensors", config={"coupling_layers": 100000})
    lines = _cli("predict", "--model", str(huge), str(synthetic_root / "synthetic" / "test"), "--output",
                 str(tmp_path / "out"))
    assert len(lines) == 1 and "coupling_layers must be from 1 to 64" in lines[0] and str(huge) in lines[0]
    nan = _rewrite(checkpoints["padim"], tmp_path / "nan.safetensors", thresholds={"image": float("nan")})
    lines = _cli("serve", "--model", str(nan), "--port", str(_free_port()), "--device", "cpu")
    assert len(lines) == 1 and "image must be a finite number" in lines[0] and str(nan) in lines[0]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> Path:
    return api.export(tiny_checkpoint, tmp_path_factory.mktemp("export") / "model.onnx")


def _edit_onnx(src: Path, dst: Path, meta: dict | None = None, config: dict | None = None,
               thresholds: dict | None = None, nan_weight: bool = False) -> Path:
    """A copy of export `src` with metadata values replaced, config or thresholds fields replaced, or the
    first floating-point weight set to NaN."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    props = {p.key: p for p in proto.metadata_props}
    for key, fields in (("cflow_ad_config", config), ("cflow_ad_thresholds", thresholds)):
        if fields is not None:
            meta = {**(meta or {}), key: json.dumps({**json.loads(props[key].value if key in props else "{}"), **fields})}
    for key, value in (meta or {}).items():
        if key not in props:
            props[key] = proto.metadata_props.add()
            props[key].key = key
        props[key].value = value
    if nan_weight:
        t = next(t for t in proto.graph.initializer if numpy_helper.to_array(t).dtype == np.float32)
        w = numpy_helper.to_array(t).copy()
        w.flat[0] = np.nan
        t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("edit,needle", [
    ({"config": {"coupling_layers": 100000}}, "coupling_layers must be from 1 to 64"),
    ({"config": {"image_size": [64, 64]}}, "its graph takes [3, 128, 128] images"),
    ({"meta": {"cflow_ad_config": "[1]"}}, "expected an object of options"),
    ({"meta": {"cflow_ad_train_max_score": "nan"}}, "cflow_ad_train_max_score"),
    ({"meta": {"cflow_ad_config": "{"}}, "Expecting property name"),
    ({"thresholds": {"image": float("nan"), "pixel": 1.0, "source": "x"}}, "image must be a finite number"),
    ({"thresholds": {"image": 1.0, "pixel": "high", "source": "x"}}, "pixel must be a finite number"),
    ({"nan_weight": True}, "NaN or Inf values in"),
])
def test_an_edited_onnx_export_is_one_line_naming_it(exported, tmp_path, edit, needle):
    bad = _edit_onnx(exported, tmp_path / "edited.onnx", **edit)
    with pytest.raises(CflowInputError) as err:
        OnnxModel(bad)
    msg = str(err.value)
    assert needle in msg and str(bad) in msg and "\n" not in msg


def test_the_lean_service_refuses_a_nan_threshold_export(exported, tmp_path):
    nan = _edit_onnx(exported, tmp_path / "nan.onnx", thresholds={"image": float("nan"), "pixel": 1.0, "source": "x"})
    lines = _cli("serve", "--model", str(nan), "--port", str(_free_port()))
    assert len(lines) == 1 and "image must be a finite number" in lines[0] and str(nan) in lines[0]


def _poisoned(path: Path) -> torch.nn.Module:
    """The model in `path` with one encoder weight NaN: every image it scores gets a NaN score."""
    model = load_checkpoint(path)
    with torch.no_grad():
        next(model.encoder.parameters()).view(-1)[0] = float("nan")
    return model


def test_export_refuses_a_model_with_nan_weights(tiny_checkpoint, tmp_path):
    with pytest.raises(CflowInputError, match="refusing to export a model with NaN or Inf values in encoder"):
        export_onnx(_poisoned(tiny_checkpoint), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_model_files_get_the_usual_file_mode(tiny_checkpoint, tmp_path):
    old = os.umask(0o022)
    try:
        model = load_checkpoint(tiny_checkpoint)
        written = [save_checkpoint(model, tmp_path / "model.safetensors"), export_onnx(model, tmp_path / "model.onnx")]
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [0o644, 0o644]


def test_export_replaces_a_model_only_once_it_is_whole(tiny_checkpoint, exported, tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(exported.read_bytes())

    def killed(*args):
        raise KeyboardInterrupt("killed while writing the metadata")

    monkeypatch.setattr(pytest.importorskip("onnx"), "save", killed)  # the step that writes the metadata
    with pytest.raises(KeyboardInterrupt):
        api.export(tiny_checkpoint, path)
    assert path.read_bytes() == exported.read_bytes()  # the working model is still whole, metadata and all
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # and no temporary file is left


def test_a_non_finite_score_is_an_error_for_its_image_never_ok(padim_checkpoint, synthetic_root, tmp_path):
    folder = synthetic_root / "synthetic" / "test" / "good"
    rows = api.predict(_poisoned(padim_checkpoint), [folder], tmp_path / "out", progress=False, warn=lambda m: None)
    assert rows and all(r["label"] is None and "non-finite score" in r["error"] for r in rows)
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["scored"] == 0 and summary["skipped"] == len(rows)
    from cflow_ad.inference import Inspector
    from cflow_ad.serve import Limits

    with _serving(Inspector(_poisoned(padim_checkpoint), "torch"), Limits()) as url:  # the model's fault: 500
        r = requests.post(url + "/predict", files={"file": ("g.png", next(folder.glob("*.png")).read_bytes(), "image/png")},
                          timeout=60)
        assert r.status_code == 500 and "non-finite score" in r.json()["error"]


@pytest.mark.parametrize("flag", ["--image-threshold", "--pixel-threshold"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_threshold_flags_are_refused(flag, value, padim_checkpoint, synthetic_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        main(["predict", "--model", str(padim_checkpoint), str(synthetic_root / "synthetic" / "test" / "good"),
              "--output", str(tmp_path / "out"), f"{flag}={value}"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and "\n" not in err and f"{flag} must be a finite number" in err
    assert not (tmp_path / "out" / "predictions.csv").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", "list", "no config"])
def test_a_damaged_training_state_says_to_delete_it_or_start_over(content, tmp_path):
    path = tmp_path / "training_state.pt"
    if content == "list":
        torch.save([1, 2, 3], path)
    elif content == "no config":
        torch.save({"epoch": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CflowInputError) as err:
        load_state(path, CFlowConfig())
    msg = str(err.value)
    assert str(path) in msg and "delete it" in msg and "without --resume" in msg and "\n" not in msg
