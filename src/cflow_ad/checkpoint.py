"""One-file checkpoints: safetensors weights with the config and provenance as JSON metadata.

Loading never unpickles anything, and needs neither the training data nor the encoder's
original weights file: the (truncated) encoder weights travel inside the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CFlowConfig
from .device import FLOW_PRECISIONS, PRECISIONS
from .errors import CflowInputError
from .model import build_model
from .outputs import replacing
from .thresholds import Thresholds

FORMAT = "cflow-ad/1"


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or Inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def save_checkpoint(model: torch.nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint; a model with
    non-finite weights is refused, so a diverged run never replaces a good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = non_finite(tensors)
    if bad:
        raise CflowInputError(f"refusing to save a model with NaN or Inf values in {', '.join(bad[:3])} to '{path}':"
                              " training diverged; check the training images or lower --lr")
    meta = {"format": FORMAT, "config": model.config.to_json(), "extra": json.dumps(extra or {}),
            "precision": model.precision, "flow_precision": model.flow_precision}
    if model.thresholds is not None:
        meta["thresholds"] = json.dumps(model.thresholds.to_dict())
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _invalid(path: Path, what: str) -> CflowInputError:
    return CflowInputError(f"'{path}' is not a valid cflow-ad model ({what}): pass the file written by"
                           " 'cflow-ad train', or train again")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The config, extra and thresholds (or None) of a checkpoint as plain JSON values, each checked
    (`CFlowConfig` bounds, `Thresholds.from_dict`), and the precision and flow precision they were fitted in
    (fp32 for a file from before either was recorded, when every fit ran in fp32 unless asked otherwise): an
    edited file is one line naming it."""
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
    out = {}
    for key, default in (("config", None), ("extra", "{}"), ("thresholds", "null")):
        if key not in meta and default is None:
            raise _invalid(path, f"no {key} in its metadata")
        try:
            out[key] = json.loads(meta.get(key, default))
        except ValueError as exc:
            raise _invalid(path, f"its {key} is not JSON: {exc}") from None
    if not isinstance(out["extra"], dict):
        raise _invalid(path, f"its extra metadata is a {type(out['extra']).__name__}, not an object")
    for key, allowed in (("precision", PRECISIONS), ("flow_precision", FLOW_PRECISIONS)):
        out[key] = meta.get(key, "fp32")
        if out[key] not in allowed:
            raise _invalid(path, f"its {key.replace('_', ' ')} '{out[key]}' is none of {', '.join(allowed)}")
    try:
        CFlowConfig.from_dict(out["config"])
        if out["thresholds"] is not None:
            Thresholds.from_dict(out["thresholds"])
    except CflowInputError as exc:
        raise _invalid(path, str(exc)) from None
    return out


# State added after checkpoints were in use: a file without it still loads.
ADDED_LATER = ("activation_ranges", "location_stats")
# safetensors' names of the dtypes that models hold
DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}


def check_layout(path: Path, config: CFlowConfig) -> None:
    """Refuse a file whose tensors (names, shapes, dtypes) are not those `config` implies, from its header
    alone and before anything is built: the model is built on the meta device, which allocates nothing.
    The buffers that fitting sizes (a gallery, a memory bank) may have any length, which the file pays for."""
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            skeleton = build_model(config, pretrained=False)
    except CflowInputError as exc:
        raise _invalid(path, str(exc)) from None
    expected = skeleton.state_dict()
    with safe_open(str(path), framework="pt") as f:
        found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    what = f"a {config.method} model on {config.encoder}"
    missing = [k for k in expected if k not in found and k not in ADDED_LATER]
    unknown = [k for k in found if k not in expected]
    if missing or unknown:
        raise _invalid(path, f"its tensors do not fit {what}: " + "; ".join(
            f"{label} {', '.join(keys[:3])}" + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            for label, keys in (("missing", missing), ("unexpected", unknown)) if keys))
    fitted = getattr(skeleton, "fitted", ())
    for key, (shape, dtype) in found.items():
        want = tuple(expected[key].shape)
        fits = shape[1:] == want[1:] and len(shape) == len(want) if key in fitted else shape == want
        if not fits or dtype != DTYPES.get(expected[key].dtype):
            raise _invalid(path, f"tensor {key} is {dtype} {list(shape)}, where {what} has"
                                 f" {DTYPES.get(expected[key].dtype)} {list(want)}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model a checkpoint holds, of whichever method it was trained with, in eval mode, with its
    decision thresholds as `model.thresholds` (None when it has none). The file is checked before the
    model is built (its metadata, its tensors' layout) and before it is used (every tensor finite)."""
    path = Path(path)
    meta = read_metadata(path)
    config = CFlowConfig.from_dict(meta["config"])
    check_layout(path, config)
    state = load_file(str(path), device="cpu")
    bad = non_finite(state)
    if bad:
        raise CflowInputError(f"'{path}' holds NaN or Inf values in {', '.join(bad[:3])}: the model file is broken;"
                              " train it again")
    model = build_model(config, pretrained=False)
    own = model.state_dict()
    for key in ADDED_LATER:  # older checkpoints keep the model's initial value (for ranges: "not recorded")
        if key in own:
            state.setdefault(key, own[key])
    model.load_state_dict(state, strict=True)
    model.thresholds = Thresholds.from_dict(meta["thresholds"]) if meta["thresholds"] is not None else None
    model.precision, model.flow_precision = meta["precision"], meta["flow_precision"]
    return model.to(device).eval()
