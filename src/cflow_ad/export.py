"""ONNX export of a whole model and the onnxruntime path that runs it.

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

import numpy as np
import torch

from .config import CFlowConfig
from .device import onnx_providers
from .errors import CflowInputError
from .model import METHOD_CLASSES, CFlowModel
from .thresholds import Thresholds

OPSET = 17
# Images per onnxruntime call: on 2 cores, chunks of 2-4 scored 44 img/s where one 32-image call
# scored 33 (a big batch's intermediate maps fall out of cache).
CHUNK = 4


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


def export_onnx(model: CFlowModel, path: str | Path) -> Path:
    """Write `model` (image -> anomaly map, score) as ONNX with a dynamic batch size; returns the path.
    Its config, heat-map scale and decision thresholds travel as metadata."""
    import onnx

    path = trace_onnx(model.eval(), model.image_size, path, ["anomaly_map", "score"])
    proto = onnx.load(str(path))
    props = [("cflow_ad_config", model.config.to_json()), ("cflow_ad_train_max_score", repr(float(model.train_max_score)))]
    if model.thresholds is not None:
        props.append(("cflow_ad_thresholds", json.dumps(model.thresholds.to_dict())))
    for key, value in props:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1  # parallel branches measured slower on 2 cores
    return options


class OnnxModel:
    """An exported model in onnxruntime, called like `CFlowModel`: images -> (maps, scores).
    Batches run in chunks of `chunk` images (see CHUNK)."""

    normalizations = ()  # the graph scores in the checkpoint's fixed mode only, with no per-scale maps

    def __init__(self, path: str | Path, threads: int | None = None, chunk: int = CHUNK,
                 device: torch.device = torch.device("cpu")):
        import onnxruntime as ort

        path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=onnx_providers(device))
        except Exception as exc:  # onnxruntime raises its own exception types for missing or bad files
            raise CflowInputError(f"cannot load ONNX model '{path}' ({str(exc).splitlines()[0]}): "
                                  "pass a file written by 'cflow-ad export'") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "cflow_ad_config" not in meta:
            raise CflowInputError(f"'{path}' was not written by 'cflow-ad export': it has no cflow-ad config")
        self.config = CFlowConfig.from_dict(json.loads(meta["cflow_ad_config"]))
        self.image_size = self.config.image_size
        self.train_max_score = float(meta["cflow_ad_train_max_score"])
        self.map_max_score = METHOD_CLASSES[self.config.method].map_max_score
        thresholds = meta.get("cflow_ad_thresholds")
        self.thresholds = Thresholds.from_dict(json.loads(thresholds)) if thresholds else None
        # GPU batches run whole; the CPU's in chunks (see CHUNK)
        self.provider = self.session.get_providers()[0]
        self.chunk = chunk if self.provider == "CPUExecutionProvider" else 1 << 30

    @classmethod
    def from_model(cls, model: CFlowModel, threads: int | None = None,
                   device: torch.device = torch.device("cpu")) -> "OnnxModel":
        """Export to a temporary file and load it (the file is removed once loaded)."""
        fd, tmp = tempfile.mkstemp(suffix=".onnx")
        os.close(fd)
        try:
            return cls(export_onnx(model, tmp), threads, device=device)
        finally:
            os.remove(tmp)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        outs = [self.session.run(None, {"images": x[i : i + self.chunk]}) for i in range(0, len(x), self.chunk)]
        return (torch.from_numpy(np.concatenate([o[0] for o in outs])),
                torch.from_numpy(np.concatenate([o[1] for o in outs])))
