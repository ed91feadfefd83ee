"""onnxruntime scoring of an exported model: numpy in, numpy out, and no PyTorch.

With `images`, `geometry`, `regions`, `visualize`, `thresholds` and `inference`, this is the
scoring runtime that a serving box installs without torch (README, "Lean runtime").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import CFlowConfig
from .device import available_cores, onnx_providers
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


class OnnxModel:
    """An exported model in onnxruntime, called like `CFlowModel` but on numpy arrays: images
    [B, 3, H, W] -> (maps [B, H, W], scores [B]). Batches run in chunks of `chunk` images (see CHUNK)
    on the CPU; `device` (cpu, cuda, cuda:N, auto or a torch.device) picks CUDA's provider when
    onnxruntime-gpu has it."""

    normalizations = ()  # the graph scores in the checkpoint's fixed mode only, with no per-scale maps

    def __init__(self, path: str | Path, threads: int | None = None, chunk: int = CHUNK, device="cpu"):
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
        stored = meta.get("cflow_ad_map_max_score")
        if stored is None:  # an export from before the key: its class's declaration (needs PyTorch)
            from .model import METHOD_CLASSES

            self.map_max_score = METHOD_CLASSES[self.config.method].map_max_score
        else:
            self.map_max_score = bool(json.loads(stored))
        self.quantize = meta.get("cflow_ad_quantize", "none")  # "int8": decoder products in int8 (quantize.py)
        thresholds = meta.get("cflow_ad_thresholds")
        self.thresholds = Thresholds.from_dict(json.loads(thresholds)) if thresholds else None
        # GPU batches run whole; the CPU's in chunks (see CHUNK)
        self.provider = self.session.get_providers()[0]
        self.chunk = chunk if self.provider == "CPUExecutionProvider" else 1 << 30

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
        outs = [self.session.run(None, {"images": x[i : i + self.chunk]}) for i in range(0, len(x), self.chunk)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
