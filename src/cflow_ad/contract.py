"""What every method's model is: one interface, and the capabilities in which the methods differ.

Code that treats methods differently reads these declared class attributes, never the method's
name or class, so a new method states once what it can do and every command follows.
"""

from __future__ import annotations

from torch import nn

from .thresholds import Thresholds

CAPABILITIES = ("runtimes", "normalizations", "training_loop", "deterministic", "map_max_score", "quantizable",
                "paper_taps")


class AnomalyModel(nn.Module):
    """Base of every method's model: `config`, `encoder`, `image_size`, `train_max_score` and
    forward(images [B, 3, H, W] in [0, 1]) -> (anomaly map [B, H, W], score [B]).

    The base declares no capability's value: a subclass that leaves one of CAPABILITIES unset is
    refused when it is defined, so no method gets a capability by omission."""

    runtimes: tuple[str, ...]  # where it scores: "onnx" only if its whole forward traces to an ONNX graph
    normalizations: tuple[str, ...]  # the scoring modes (config.NORMALIZATIONS) its maps differ in; () if none
    # trained by `training.fit` (epochs, resumable, data-parallel under torchrun); else fitted in closed form
    training_loop: bool
    deterministic: bool  # no random part: every seed gives the same model, so one run says everything
    # the image score is the map's maximum, so it is taken again once `keep_aspect` padding is cut off;
    # False where the score comes from the features (SPADE's k nearest images, PatchCore's reweighting)
    map_max_score: bool
    # `export --quantize int8` applies: decoder products with input ranges recorded in training (quantize.py)
    quantizable: bool
    # the taps its paper used, as (pool_layers, last_stride): ResNet layers 1-3 are strides 4/8/16
    # (`experiment compare --paper-taps` runs each method at its own)
    paper_taps: tuple[int, int]
    thresholds: Thresholds | None = None  # decision thresholds, from calibration or the checkpoint
    # the precision its score constants and thresholds were fitted in (`device.PRECISIONS`): they move with it
    precision: str = "fp32"
    # and that of its flows' matrix products (`device.FLOW_PRECISIONS`; fp32 for a method without flows)
    flow_precision: str = "fp32"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in CAPABILITIES if not hasattr(cls, name)]
        if missing:
            raise TypeError(f"{cls.__name__} does not declare {', '.join(missing)}: see cflow_ad.contract")
