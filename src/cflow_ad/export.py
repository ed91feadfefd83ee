"""ONNX export of a whole model (`runtime.OnnxModel` runs it).

The exported graph takes [B, 3, H, W] images in [0, 1] and returns the anomaly map
[B, H, W] and the image score [B], with the normalisation constants and the folded
decoders baked in, so a line's software needs only the .onnx file and onnxruntime.
onnxruntime runs this model several times faster than eager PyTorch on a CPU
(benchmarks/speed.py), which is why `predict --runtime onnx` exists.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .checkpoint import non_finite
from .config import QUANTIZE
from .errors import CflowInputError
from .model import CFlowModel
from .outputs import replacing
from .runtime import OnnxModel

OPSET = 17


def trace_onnx(module: torch.nn.Module, image_size: tuple[int, int], path: str | Path,
               output_names: list[str]) -> Path:
    """Trace `module` (a [B, 3, H, W] image batch in) to ONNX with a dynamic batch size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.rand(1, 3, *image_size, device=next(module.buffers()).device)  # traced where the module is
    with torch.no_grad():
        module(dummy)  # first call: lazily built constants (the folded decoders) exist before the trace
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(
                module, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                input_names=["images"], output_names=output_names,
                dynamic_axes={name: {0: "batch"} for name in ["images", *output_names]},
            )
    return path


def export_onnx(model: CFlowModel, path: str | Path, quantize: str | None = None) -> Path:
    """Write `model` (image -> anomaly map, score) as ONNX with a dynamic batch size; returns the path.
    Its config, heat-map scale and decision thresholds travel as metadata. `quantize="int8"` makes the
    decoders' matrix products int8 with the ranges recorded in training (`quantize.py`)."""
    import onnx

    if quantize is not None and quantize not in QUANTIZE:
        raise CflowInputError(f"unknown --quantize '{quantize}': choose {', '.join(QUANTIZE)}")
    if quantize and not model.quantizable:
        raise CflowInputError(f"{type(model).__name__} has no int8 form: --quantize applies to CFLOW-AD models")
    for flag, fitted in (("precision", model.precision), ("flow-precision", model.flow_precision)):
        if fitted != "fp32":  # so every export's constants and thresholds are fp32's, as onnxruntime runs
            raise CflowInputError(f"refusing to export a model fitted with --{flag} {fitted}: onnxruntime runs fp32;"
                                  f" recalibrate it first with 'cflow-ad calibrate --{flag} fp32'")
    bad = non_finite(model.state_dict())
    if bad:
        raise CflowInputError(f"refusing to export a model with NaN or Inf values in {', '.join(bad[:3])}: it would"
                              " score every image NaN; train it again")
    model = model.eval()
    products = model.int8_products() if quantize else None  # before the trace: a missing range fails fast
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:  # a file without its metadata (a kill mid-way) never replaces a model
        trace_onnx(model, model.image_size, tmp, ["anomaly_map", "score"])
        proto = onnx.load(str(tmp))
        if products is not None:
            from .quantize import quantize_products

            quantize_products(proto, [(w.cpu().numpy(), lo, hi) for w, lo, hi in products])
        props = [("cflow_ad_config", model.config.to_json()),
                 ("cflow_ad_train_max_score", repr(float(model.train_max_score))),
                 ("cflow_ad_map_max_score", json.dumps(bool(model.map_max_score))), ("cflow_ad_quantize", quantize or "none")]
        if model.thresholds is not None:
            props.append(("cflow_ad_thresholds", json.dumps(model.thresholds.to_dict())))
        for key, value in props:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    return path


def onnx_runner(model: CFlowModel, threads: int | None = None, device="cpu", quantize: str | None = None) -> OnnxModel:
    """`model` exported (int8 with `quantize`) to a temporary file and loaded in onnxruntime (the file
    is removed once loaded)."""
    fd, tmp = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        return OnnxModel(export_onnx(model, tmp, quantize), threads or torch.get_num_threads(), device=device)
    finally:
        os.remove(tmp)
