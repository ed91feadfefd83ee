"""onnxruntime scoring of an exported model: numpy in, numpy out, and no PyTorch.

With `images`, `geometry`, `regions`, `visualize`, `thresholds` and `inference`, this is the
scoring runtime that a serving box installs without torch (README, "Lean runtime").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .config import CFlowConfig
from .device import available_cores, check_provider, onnx_providers
from .errors import CflowInputError
from .thresholds import Thresholds

# Images per onnxruntime call: on 2 cores, chunks of 2-4 scored 44 img/s where one 32-image call
# scored 33 (a big batch's intermediate maps fall out of cache).
CHUNK = 4


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1  # parallel branches measured slower on 2 cores
    return options


def non_finite_weights(path: Path) -> list[str]:
    """The names of the graph's floating-point weights that hold NaN or Inf, read with the onnx package; the
    lean runtime has none, and there a non-finite score is still an error per image (`Inspector.verdict`)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return []
    graph = onnx.load(str(path)).graph
    weights = [(t.name, t) for t in graph.initializer]
    weights += [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    bad = []
    for name, tensor in weights:
        w = numpy_helper.to_array(tensor)
        if np.issubdtype(w.dtype, np.floating) and not np.isfinite(w).all():
            bad.append(name)
    return bad


class OnnxModel:
    """An exported model in onnxruntime, called like `CFlowModel` but on numpy arrays: images
    [B, 3, H, W] -> (maps [B, H, W], scores [B]). Batches run in chunks of `chunk` images (see CHUNK)
    on the CPU; `device` (cpu, cuda, cuda:N, auto or a torch.device) picks CUDA's provider
    (`device.onnx_providers`: `auto` falls back to the CPU's, an explicit GPU is refused without it)."""

    normalizations = ()  # the graph scores in the checkpoint's fixed mode only, with no per-scale maps

    def __init__(self, path: str | Path, threads: int | None = None, chunk: int = CHUNK, device="cpu"):
        import onnxruntime as ort

        path = Path(path)
        providers = onnx_providers(device)
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for missing or bad files
            raise CflowInputError(f"cannot load ONNX model '{path}' ({str(exc).splitlines()[0]}): "
                                  "pass a file written by 'cflow-ad export'") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "cflow_ad_config" not in meta:
            raise CflowInputError(f"'{path}' was not written by 'cflow-ad export': it has no cflow-ad config")
        try:
            self._read_metadata(meta)
        except (CflowInputError, ValueError) as exc:  # json's and float()'s errors are ValueErrors
            raise CflowInputError(f"'{path}' is not a valid cflow-ad export ({str(exc).splitlines()[0]}): export the"
                                  " model again with 'cflow-ad export'") from None
        bad = non_finite_weights(path)
        if bad:
            raise CflowInputError(f"'{path}' holds NaN or Inf values in {', '.join(bad[:3])}: the model file is broken;"
                                  " export it again from a good checkpoint")
        self.quantize = meta.get("cflow_ad_quantize", "none")  # "int8": decoder products in int8 (quantize.py)
        # GPU batches run whole; the CPU's in chunks (see CHUNK)
        self.provider = self.session.get_providers()[0]  # the one that really runs, reported as the device
        check_provider(device, self.provider)
        self.chunk = chunk if self.provider == "CPUExecutionProvider" else 1 << 30

    def _read_metadata(self, meta: dict[str, str]) -> None:
        """Config, score constants and thresholds from the export's metadata, each checked, and the graph's
        input against the config; with the onnx package (installed with PyTorch) every weight finite."""
        self.config = CFlowConfig.from_dict(json.loads(meta["cflow_ad_config"]))
        self.image_size = self.config.image_size
        self.train_max_score = float(meta.get("cflow_ad_train_max_score", "nan"))
        if not math.isfinite(self.train_max_score):
            raise ValueError("its cflow_ad_train_max_score is missing or not a finite number")
        stored = meta.get("cflow_ad_map_max_score")
        if stored is None:  # an export from before the key: its class's declaration (needs PyTorch)
            from .model import METHOD_CLASSES

            self.map_max_score = METHOD_CLASSES[self.config.method].map_max_score
        else:
            self.map_max_score = bool(json.loads(stored))
        thresholds = meta.get("cflow_ad_thresholds")
        self.thresholds = Thresholds.from_dict(json.loads(thresholds)) if thresholds else None
        takes = list(self.session.get_inputs()[0].shape[1:])
        if takes != [3, *self.image_size]:
            raise ValueError(f"its graph takes {takes} images, its config says {[3, *self.image_size]}")

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
        outs = [self.session.run(None, {"images": x[i : i + self.chunk]}) for i in range(0, len(x), self.chunk)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
