"""One-file checkpoints: safetensors weights with the config and provenance as JSON metadata.

Loading never unpickles anything, and needs neither the training data nor the encoder's
original weights file: the (truncated) encoder weights travel inside the checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CFlowConfig
from .errors import CflowInputError
from .model import build_model
from .thresholds import Thresholds

FORMAT = "cflow-ad/1"


def save_checkpoint(model: torch.nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint; a model with
    non-finite weights is refused, so a diverged run never replaces a good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CflowInputError(f"refusing to save a model with NaN or Inf values in {', '.join(bad[:3])} to '{path}':"
                              " training diverged; check the training images or lower --lr")
    meta = {"format": FORMAT, "config": model.config.to_json(), "extra": json.dumps(extra or {})}
    if model.thresholds is not None:
        meta["thresholds"] = json.dumps(model.thresholds.to_dict())
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CflowInputError(f"checkpoint '{path}' does not exist: pass the file written by 'cflow-ad train'")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CflowInputError(f"'{path}' is not a cflow-ad checkpoint ({exc}): pass the file written by 'cflow-ad train'") from None
    if meta.get("format") != FORMAT:
        raise CflowInputError(f"'{path}' is not a {FORMAT} checkpoint: pass the file written by 'cflow-ad train'")
    return {"config": json.loads(meta["config"]), "extra": json.loads(meta.get("extra", "{}")),
            "thresholds": json.loads(meta["thresholds"]) if "thresholds" in meta else None}


# State added after checkpoints were in use: a file without it still loads.
ADDED_LATER = ("activation_ranges", "location_stats")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model a checkpoint holds, of whichever method it was trained with, in eval mode, with its
    decision thresholds as `model.thresholds` (None when it has none)."""
    meta = read_metadata(path)
    config = CFlowConfig.from_dict(meta["config"])
    model = build_model(config, pretrained=False)
    state = load_file(str(path), device="cpu")
    own = model.state_dict()
    for key in ADDED_LATER:  # older checkpoints keep the model's initial value (for ranges: "not recorded")
        if key in own:
            state.setdefault(key, own[key])
    model.load_state_dict(state, strict=True)
    model.thresholds = Thresholds.from_dict(meta["thresholds"]) if meta["thresholds"] else None
    return model.to(device).eval()
