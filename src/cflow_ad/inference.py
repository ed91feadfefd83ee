"""From images to what a person acts on: score, OK / defect verdict, defect mask, heat map, overlay.

`Inspector` loads a model once (PyTorch or onnxruntime) with its decision thresholds; both
`cflow-ad predict` and `cflow-ad serve` go through it, so a folder run and an HTTP call
give the same answer for the same image. Maps are drawn at the image's own size, so the
defect area is in the image's own pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import load_checkpoint
from .device import Compute
from .errors import CflowInputError
from .export import OnnxModel
from .model import METHOD_CLASSES
from .geometry import InputFrame, restore
from .regions import regions
from .thresholds import Thresholds
from .visualize import draw_boxes, heat_rgb, outline, overlay_rgb

RUNTIMES = ("torch", "onnx")


def as_model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    """A model object as it is, or the model a checkpoint path holds."""
    return model if isinstance(model, torch.nn.Module) else load_checkpoint(model)


def exportable(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself if its class declares the onnx runtime; else a one-line error naming the methods that do."""
    if "onnx" not in model.runtimes:
        others = [name for name, kind in METHOD_CLASSES.items() if "onnx" in kind.runtimes]
        raise CflowInputError(f"{type(model).__name__} runs in PyTorch only (no ONNX form): use --runtime torch,"
                              f" or a model of another method: {', '.join(others)}")
    return model


def load_runner(model: torch.nn.Module | str | Path, runtime: str = "torch",
                compute: Compute | None = None) -> torch.nn.Module | OnnxModel:
    """A model to score with on `compute` (default: `Compute()`): a checkpoint in PyTorch or exported
    to onnxruntime, or an exported .onnx file. onnxruntime computes in fp32 only."""
    if runtime not in RUNTIMES:
        raise CflowInputError(f"unknown runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    compute = compute or Compute()
    onnx_file = isinstance(model, (str, Path)) and Path(model).suffix.lower() == ".onnx"
    if (onnx_file or runtime == "onnx") and compute.precision != "fp32":
        raise CflowInputError(f"--precision {compute.precision} applies to --runtime torch: onnxruntime runs the"
                              " exported fp32 model")
    if onnx_file:
        return OnnxModel(model, device=compute.torch_device)
    model = as_model(model).eval()
    if runtime == "onnx":
        return OnnxModel.from_model(exportable(model), device=compute.torch_device)
    return compute.place(model)


def resolve_thresholds(stored: Thresholds | None, target_fpr: float | None = None, image: float | None = None,
                       pixel: float | None = None) -> Thresholds | None:
    """The model's thresholds, moved to another false-positive rate and/or overridden by hand."""
    if stored is None:
        if image is None or pixel is None:
            if target_fpr is not None or image is not None or pixel is not None:
                raise CflowInputError(
                    "this model has no calibrated thresholds: run 'cflow-ad calibrate', or pass both "
                    "--image-threshold and --pixel-threshold")
            return None
        return Thresholds(float(image), float(pixel), "manual")
    t = stored.at_fpr(target_fpr) if target_fpr is not None else stored
    return t.with_overrides(image, pixel)


@dataclass
class Verdict:
    """One image's answer. Without thresholds, `label`, `reason`, the mask, its area and regions are None."""

    score: float
    label: str | None
    reason: str | None
    width: int
    height: int
    amap: torch.Tensor  # [H0, W0] at the image's own size
    image: torch.Tensor  # [3, H0, W0] in [0, 1]
    mask: np.ndarray | None  # [H0, W0] bool: pixels over the pixel threshold, in regions of the minimum area
    regions: list[dict] | None  # `regions.regions` of the mask, highest peak first

    @property
    def defect_area_px(self) -> int | None:
        return None if self.mask is None else int(self.mask.sum())


class Inspector:
    """A model, its runtime and its thresholds, loaded once."""

    def __init__(self, model: torch.nn.Module | str | Path, runtime: str = "torch", target_fpr: float | None = None,
                 image_threshold: float | None = None, pixel_threshold: float | None = None,
                 compute: Compute | None = None, min_defect_area: int = 0):
        if min_defect_area < 0:
            raise CflowInputError(f"--min-defect-area must be >= 0 pixels, not {min_defect_area}")
        self.min_defect_area = int(min_defect_area)
        self.compute = compute or Compute()
        self.runner = load_runner(model, runtime, self.compute)
        self.thresholds = resolve_thresholds(self.runner.thresholds, target_fpr, image_threshold, pixel_threshold)
        self.config = self.runner.config
        self.frame = InputFrame.of(self.config)
        self.runtime = "onnx" if isinstance(self.runner, OnnxModel) else "torch"
        # where it computes, in words: the device and precision, or onnxruntime's execution provider
        self.device = self.runner.provider if self.runtime == "onnx" else self.compute.describe()
        self.heat_scale = 2 * float(self.runner.train_max_score)  # colours mean the same on every image

    @torch.no_grad()
    def score(self, inputs: torch.Tensor, originals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps [B, H, W], scores [B]) on the host for a host batch of model inputs [B, 3, H, W] made from
        `originals`, with any padding of `keep_aspect` left out (`geometry.restore`)."""
        if self.runtime == "onnx":
            return self.restore(*self.runner(inputs), originals)
        return self.restore(*self.compute.host(*self.runner(self.compute.put(inputs))), originals)

    def restore(self, maps: torch.Tensor, scores: torch.Tensor,
                originals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The host maps and scores of inputs made from `originals` without their padding."""
        boxes = torch.tensor([self.frame.box(*o.shape[-2:]) for o in originals]) if self.frame.keep_aspect else None
        return restore(maps, scores, boxes, self.runner.map_max_score)

    def __call__(self, inputs: torch.Tensor, originals: list[torch.Tensor]) -> list[Verdict]:
        """Score a batch of model inputs [B, 3, H, W]; `originals` are the same images at their own size."""
        return self.verdicts(*self.score(inputs, originals), originals, self.thresholds)

    def verdicts(self, maps: torch.Tensor, scores: torch.Tensor, originals: list[torch.Tensor],
                 thresholds: Thresholds | None) -> list[Verdict]:
        """An image is a defect when its score is over the image threshold and, with a minimum defect
        area, at least one region of the pixel mask is that large."""
        out = []
        for amap, score, image in zip(maps, scores.tolist(), originals):
            h, w = image.shape[-2:]
            big = F.interpolate(amap[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            label = reason = mask = found = None
            if thresholds is not None:
                mask, found = regions((big > thresholds.pixel).numpy(), big.numpy(), self.min_defect_area)
                label = "defect" if score > thresholds.image else "ok"
                reason = f"score {'above' if label == 'defect' else 'not above'} the image threshold"
                if label == "defect" and self.min_defect_area and not found:
                    label = "ok"
                    reason += f", but no defect region of {self.min_defect_area} px or more"
            out.append(Verdict(float(score), label, reason, int(w), int(h), big, image, mask, found))
        return out

    def heat(self, v: Verdict) -> np.ndarray:
        return heat_rgb(v.amap, self.heat_scale)

    def overlay(self, v: Verdict, heat: np.ndarray | None = None) -> np.ndarray:
        """Heat map (`heat`, when already drawn) blended over the image, with the outline of the defect
        mask in white and the box of each defect region (none without thresholds)."""
        rgb = overlay_rgb(v.image, self.heat(v) if heat is None else heat)
        if v.mask is not None:
            rgb[outline(v.mask)] = 255
            draw_boxes(rgb, [r["box"] for r in v.regions])
        return rgb

    @staticmethod
    def mask_image(v: Verdict) -> np.ndarray:
        if v.mask is None:
            raise CflowInputError("no thresholds, so no mask: run 'cflow-ad calibrate' or pass both thresholds")
        return v.mask.astype(np.uint8) * 255

    def describe(self, v: Verdict) -> dict:
        """The JSON-ready facts of a verdict, with the thresholds that made it."""
        t = self.thresholds
        return {
            "score": v.score, "good_share": t.good_share(v.score) if t else None, "label": v.label,
            "reason": v.reason, "image_threshold": t.image if t else None, "pixel_threshold": t.pixel if t else None,
            "min_defect_area_px": self.min_defect_area,
            "defect_area_px": v.defect_area_px,
            "defect_fraction": None if v.defect_area_px is None else v.defect_area_px / (v.width * v.height),
            "region_count": None if v.regions is None else len(v.regions),
            "largest_region_px": None if v.regions is None else max((r["area_px"] for r in v.regions), default=0),
            "regions": v.regions, "width": v.width, "height": v.height,
        }


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
