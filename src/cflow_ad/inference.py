"""From images to what a person acts on: score, OK / defect verdict, defect mask, regions, heat map, overlay.

`Inspector` loads a model once (PyTorch or onnxruntime) with its decision thresholds; both
`cflow-ad predict` and `cflow-ad serve` go through it, so a folder run and an HTTP call
give the same answer for the same image. Maps are drawn at the image's own size, so the
defect area is in the image's own pixels; a service draws a large upload at a bounded size, and scales
its regions and areas back to the image's pixels. `Predictions` writes what `predict` leaves behind.

Everything after the model is numpy, and PyTorch is imported only to run a checkpoint: an
exported .onnx model is scored here, in `predict_onnx` and in `serve`, without torch installed.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import BrokenModelError, CflowInputError
from .geometry import InputFrame, resize_bilinear, restore
from .outputs import NAMES, OutputFolder, to_json
from .regions import defect_regions
from .runtime import OnnxModel
from .thresholds import Thresholds, heat_scale
from .visualize import draw_boxes, heat_rgb, outline, overlay_rgb, save_png, with_legend

RUNTIMES = ("torch", "onnx")


def is_onnx_file(model) -> bool:
    return isinstance(model, (str, Path)) and Path(model).suffix.lower() == ".onnx"


def as_model(model):
    """A model object as it is, or the model a checkpoint path holds."""
    from .checkpoint import load_checkpoint

    return load_checkpoint(model) if isinstance(model, (str, Path)) else model


def exportable(model):
    """`model` itself if its class declares the onnx runtime; else a one-line error naming the methods that do."""
    if "onnx" not in model.runtimes:
        from .model import METHOD_CLASSES

        others = [name for name, kind in METHOD_CLASSES.items() if "onnx" in kind.runtimes]
        raise CflowInputError(f"{type(model).__name__} runs in PyTorch only (no ONNX form): use --runtime torch,"
                              f" or a model of another method: {', '.join(others)}")
    return model


def check_precision(model, compute) -> None:
    """Refuse to score `model` on `compute` (a `device.Compute`) in another precision or flow precision than
    its constants and thresholds were fitted in: an fp32 fit scored in bf16 moved good images' whitened
    distances up to 10%, so the thresholds no longer held their false-positive rate (issue 34).
    `calibrate --precision / --flow-precision` fits them again in the new one."""
    compute.flows(model)  # a flow precision for a model without flows: that error, not a mismatch
    for flag, asked, fitted, what in (("precision", compute.precision, model.precision, "in {}"),
                                      ("flow-precision", compute.flow_precision, model.flow_precision, "with {} flows")):
        if asked != fitted:
            raise CflowInputError(f"--{flag} {asked}: this model's constants and thresholds were fitted"
                                  f" {what.format(fitted)}: run it with --{flag} {fitted}, or recalibrate it"
                                  f" with 'cflow-ad calibrate --{flag} {asked}'")


def check_onnx_precision(precision: str, flow_precision: str) -> None:
    """onnxruntime runs the exported model in fp32 throughout: another precision is a one-line error."""
    for flag, value in (("precision", precision), ("flow-precision", flow_precision)):
        if value != "fp32":
            raise CflowInputError(f"--{flag} {value} applies to --runtime torch: onnxruntime runs the exported"
                                  " fp32 model")


def check_quantize(quantize: str | None, runtime: str, onnx_file: bool) -> None:
    """`quantize` applies where a checkpoint is exported on the fly for onnxruntime; a one-line error elsewhere."""
    if quantize and (onnx_file or runtime != "onnx"):
        raise CflowInputError(f"--quantize {quantize} exports a checkpoint for --runtime onnx" + (
            ": an .onnx file is scored as it was exported ('cflow-ad export --quantize')" if onnx_file else ""))


def load_runner(model, runtime: str = "torch", compute=None, threads: int | None = None, device: str = "cpu",
                quantize: str | None = None):
    """A model to score with: an exported .onnx file in onnxruntime (on `compute`'s device, else `device`;
    no PyTorch needed), or a checkpoint in PyTorch or exported to onnxruntime on `compute` (default:
    `Compute()`), with int8 decoders when `quantize="int8"`."""
    if runtime not in RUNTIMES:
        raise CflowInputError(f"unknown runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    onnx_file = is_onnx_file(model)
    check_quantize(quantize, runtime, onnx_file)
    if (onnx_file or runtime == "onnx") and compute is not None:
        check_onnx_precision(compute.precision, compute.flow_precision)
    if onnx_file:
        return OnnxModel(model, threads, device=compute.onnx_device if compute is not None else device)
    from .device import Compute

    compute = compute or Compute()
    model = as_model(model).eval()
    if runtime == "onnx":
        from .export import onnx_runner

        return onnx_runner(exportable(model), threads, device=compute.onnx_device, quantize=quantize)
    check_precision(model, compute)
    return compute.place(model)


def resolve_thresholds(stored: Thresholds | None, target_fpr: float | None = None, image: float | None = None,
                       pixel: float | None = None) -> Thresholds | None:
    """The model's thresholds, moved to another false-positive rate and/or overridden by hand."""
    for flag, value in (("--image-threshold", image), ("--pixel-threshold", pixel)):
        if value is not None and not math.isfinite(value):  # NaN: no score is above it, so every image is ok
            raise CflowInputError(f"{flag} must be a finite number, not {value}: give the score above which an"
                                  " image or pixel is a defect")
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
    """One image's answer. Without thresholds, `label`, `reason`, the mask, its area and regions are None.
    `score` is on the model's image scale (`ScoreScale`: 0 typical good, 1 the threshold; None without the
    good images' scores), `raw_score` as the model computes it. `width` and `height` are the image's as
    stored, and so are the regions' boxes and areas; the arrays are at its own size too, or at the bounded
    size a service decoded it to (`images.read_scaled`)."""

    score: float | None
    raw_score: float
    label: str | None
    reason: str | None
    width: int
    height: int
    amap: np.ndarray  # [H, W] at the image's own size, or its bounded size
    image: np.ndarray  # [3, H, W] in [0, 1]
    mask: np.ndarray | None  # [H, W] bool: the pixels of the defect regions
    regions: list[dict] | None  # `regions.regions` of the mask, highest peak first

    @property
    def defect_area_px(self) -> int | None:
        """The regions' area in the image's pixels (the mask is their union)."""
        return None if self.regions is None else sum(r["area_px"] for r in self.regions)

    def drawn_boxes(self) -> list[dict]:
        """The regions' boxes in the pixels of `amap`, where they are drawn."""
        sy, sx = self.height / self.amap.shape[0], self.width / self.amap.shape[1]
        boxes = []
        for r in self.regions or []:
            x, y = math.floor(r["box"]["x"] / sx), math.floor(r["box"]["y"] / sy)
            boxes.append({"x": x, "y": y, "width": math.ceil((r["box"]["x"] + r["box"]["width"]) / sx) - x,
                          "height": math.ceil((r["box"]["y"] + r["box"]["height"]) / sy) - y})
        return boxes


def _numpy(t) -> np.ndarray:
    """A host array or CPU tensor (any float dtype) as float32 numpy."""
    return np.asarray(t.float() if hasattr(t, "float") and not isinstance(t, np.ndarray) else t, dtype=np.float32)


class Inspector:
    """A model, its runtime and its thresholds, loaded once. `compute` (a `device.Compute`) is where a
    checkpoint runs; an .onnx file runs on `device` with `threads` and needs no PyTorch."""

    def __init__(self, model, runtime: str = "torch", target_fpr: float | None = None,
                 image_threshold: float | None = None, pixel_threshold: float | None = None,
                 compute=None, min_defect_area: int = 0, threads: int | None = None, device: str = "cpu",
                 quantize: str | None = None, all_regions: bool = False):
        if min_defect_area < 0:
            raise CflowInputError(f"--min-defect-area must be >= 0 pixels, not {min_defect_area}")
        self.min_defect_area, self.all_regions = int(min_defect_area), bool(all_regions)
        self.runner = load_runner(model, runtime, compute, threads, device, quantize)
        self.runtime = "onnx" if isinstance(self.runner, OnnxModel) else "torch"
        self.quantize = self.runner.quantize if self.runtime == "onnx" else "none"
        if self.runtime == "torch" and compute is None:
            from .device import Compute

            compute = Compute()
        self.compute = compute
        self.thresholds = resolve_thresholds(self.runner.thresholds, target_fpr, image_threshold, pixel_threshold)
        self.config = self.runner.config
        self.frame = InputFrame.of(self.config)
        # where it computes, in words: the device and precision, or onnxruntime's execution provider
        self.device = self.runner.provider if self.runtime == "onnx" else self.compute.describe()
        self.heat_scale = heat_scale(self.thresholds, self.runner.train_max_score)  # the same colours on every image

    def score(self, inputs, originals: list) -> tuple[np.ndarray, np.ndarray]:
        """(maps [B, H, W], scores [B]) as numpy for a host batch of model inputs [B, 3, H, W] (numpy or a
        tensor) made from `originals`, with any padding of `keep_aspect` left out (`geometry.restore`)."""
        if self.runtime == "onnx":
            return self.restore(*self.runner(inputs), originals)
        import torch

        x = inputs if isinstance(inputs, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(inputs))
        with torch.no_grad():
            maps, scores = self.compute.host(*self.runner(self.compute.put(x)))
        return self.restore(maps, scores, originals)

    def restore(self, maps, scores, originals: list) -> tuple[np.ndarray, np.ndarray]:
        """The host maps and scores (numpy or CPU tensors) of inputs made from `originals`, as numpy
        without their padding."""
        boxes = np.array([self.frame.box(*o.shape[-2:]) for o in originals]) if self.frame.keep_aspect else None
        return restore(_numpy(maps), _numpy(scores), boxes, self.runner.map_max_score)

    def __call__(self, inputs, originals: list, sizes: list | None = None) -> list[Verdict]:
        """Score a batch of model inputs [B, 3, H, W]; `originals` are the same images at their own size, or
        shrunk from their (height, width) in `sizes`."""
        return self.verdicts(*self.score(inputs, originals), originals, self.thresholds, sizes)

    def verdicts(self, maps: np.ndarray, scores: np.ndarray, originals: list,
                 thresholds: Thresholds | None, sizes: list | None = None) -> list[Verdict]:
        """An image is a defect when its score is over the image threshold and, with a minimum defect
        area, at least one defect region is that large. A defect region is a connected part of the map over
        the region threshold, which good images rarely reach anywhere; an `ok` image has none
        (`all_regions`: every part of the map over the pixel threshold on every image, faint ones included).
        `sizes`: the images' (height, width) where `originals` are shrunk copies: the map is drawn at the copy's
        size, and regions and areas are scaled to the image's pixels."""
        sizes = sizes or [np.shape(o)[-2:] for o in originals]
        return [self.verdict(amap, score, image, thresholds, size)
                for amap, score, image, size in zip(maps, np.asarray(scores).tolist(), originals, sizes)]

    def verdict(self, amap: np.ndarray, score: float, image, thresholds: Thresholds | None,
                size: tuple | None = None) -> Verdict:
        """One image's verdict (see `verdicts`; `size`: its (height, width) when `image` is a shrunk copy).
        A score that is not finite is an error for that image, never `ok`: NaN is above no threshold, so a
        broken model would pass everything."""
        if not math.isfinite(score):
            raise BrokenModelError(f"the model produced a non-finite score ({score}) for this image: the model file"
                                  " is broken; train or export it again")
        image = np.asarray(image)
        h, w = image.shape[-2:]
        h0, w0 = size or (h, w)
        big = resize_bilinear(amap, (h, w))
        scale = (h0 / h, w0 / w)
        label = reason = mask = found = normal = None
        if thresholds is not None:
            normal = thresholds.normalized(score)
            label = "defect" if score > thresholds.image else "ok"
            reason = f"score {'above' if label == 'defect' else 'not above'} the image threshold"
            if self.all_regions:
                mask, found = defect_regions(big, thresholds.pixel, self.min_defect_area, scale)
            elif label == "ok":
                mask, found = np.zeros((h, w), dtype=bool), []
            else:
                mask, found = defect_regions(big, thresholds.region_threshold, self.min_defect_area, scale)
            if label == "defect" and not found:
                if self.min_defect_area:
                    label, reason = "ok", reason + f", but no defect region of {self.min_defect_area} px or more"
                else:
                    reason += ", but no part of the map reaches the region threshold"
        return Verdict(normal, float(score), label, reason, int(w0), int(h0), big, image, mask, found)

    def heat(self, v: Verdict) -> np.ndarray:
        return heat_rgb(v.amap, self.heat_scale)

    def legend(self, rgb: np.ndarray) -> np.ndarray:
        """`rgb` with the heat map's colour bar beside it."""
        return with_legend(rgb, self.heat_scale)

    def overlay(self, v: Verdict, heat: np.ndarray | None = None) -> np.ndarray:
        """Heat map (`heat`, when already drawn) blended over the image, with the outline of the defect
        mask in white and the box of each defect region (none without thresholds)."""
        rgb = overlay_rgb(v.image, self.heat(v) if heat is None else heat)
        if v.mask is not None:
            rgb[outline(v.mask)] = 255
            draw_boxes(rgb, v.drawn_boxes())
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
            "score": v.score, "raw_score": v.raw_score, "good_share": t.good_share(v.raw_score) if t else None,
            "label": v.label, "reason": v.reason, "image_threshold": t.image if t else None,
            "pixel_threshold": t.pixel if t else None, "region_threshold": t.region_threshold if t else None,
            "min_defect_area_px": self.min_defect_area,
            "defect_area_px": v.defect_area_px,
            "defect_fraction": None if v.defect_area_px is None else v.defect_area_px / (v.width * v.height),
            "region_count": None if v.regions is None else len(v.regions),
            "largest_region_px": None if v.regions is None else max((r["area_px"] for r in v.regions), default=0),
            "regions": v.regions, "width": v.width, "height": v.height,
        }


PREDICTION_FIELDS = ["path", "score", "label", "raw_score", "good_share", "reason", "image_threshold",
                     "pixel_threshold", "region_threshold", "defect_area_px", "defect_fraction", "region_count",
                     "largest_region_px", "width", "height", "error", "heatmap", "overlay", "mask"]


def _unique_stem(path: Path, used: set[str]) -> str:
    """Output name for an image: its stem, prefixed by its folder when stems repeat (good/000, spot/000)."""
    stem = path.stem if path.stem not in used else f"{path.parent.name}_{path.stem}"
    base, i = stem, 1
    while stem in used:
        i += 1
        stem = f"{base}_{i}"
    used.add(stem)
    return stem


def summarize(rows: Sequence[dict], thresholds: Thresholds | None) -> dict:
    """Counts per folder of a predict run: with MVTec-style folders ('good' beside defect types) the
    flagged share of 'good' is the false-positive rate and that of the others the recall."""
    folders: dict[str, dict] = {}
    for r in rows:
        f = folders.setdefault(Path(r["path"]).parent.name, {"images": 0, "defect": 0, "ok": 0, "errors": 0})
        f["images"] += 1
        key = "errors" if r["error"] else (r.get("label") or "unlabelled")
        f[key] = f.get(key, 0) + 1
    for f in folders.values():
        scored = f["defect"] + f["ok"]
        f["flagged_rate"] = f["defect"] / scored if scored else None
    return {"images": len(rows), "scored": sum(1 for r in rows if not r["error"]),
            "skipped": sum(1 for r in rows if r["error"]), "defect": sum(1 for r in rows if r.get("label") == "defect"),
            "thresholds": thresholds.summary() if thresholds else None, "folders": folders}


def predict_inputs(paths, output: str | Path) -> tuple[OutputFolder, list[Path], list[tuple[Path, CflowInputError]]]:
    """What a predict run knows before it loads a model: its output folder (checked writable: one line,
    before any work), the image files of `paths` without that folder, and the entries named like images
    that are no files (a broken link, a FIFO), each with its error, to report as skipped."""
    from .images import list_images

    folder = OutputFolder(output, "predict")
    unlisted: list[tuple[Path, CflowInputError]] = []
    files = list_images(paths, folder.path, lambda p, exc: unlisted.append((p, exc)))
    return folder, files, unlisted


class Predictions:
    """What `predict` writes into `folder` (cleared first of the files of its last predict run): per image
    a row and, each optional, its heat map, overlay and mask PNGs (each written whole or not at all); for
    the run predictions.csv, a row per image written and flushed as it is scored, so a killed run leaves
    complete rows, and at the end predictions.json, whose absence marks an unfinished run. `unlisted`
    (from `predict_inputs`) are reported as skipped first. `thresholds` None: scores only."""

    def __init__(self, inspector: Inspector, folder: OutputFolder, thresholds: Thresholds | None,
                 overlays: bool = True, masks: bool = True, heatmaps: bool = True, legend: bool = False,
                 csv_summary: bool = True, json_summary: bool = True, warn: Callable[[str], None] = print,
                 unlisted: Sequence[tuple[Path, CflowInputError]] = ()):
        self.inspector, self.thresholds, self.warn = inspector, thresholds, warn
        self.overlays, self.masks, self.heatmaps, self.legend = overlays, masks, heatmaps, legend
        self.folder, self.json_summary = folder, json_summary
        self.rows: list[dict] = []
        self.used: set[str] = set()
        folder.begin()
        self.csv = None
        if csv_summary:
            self.csv = open(folder.file("predictions.csv"), "w", newline="", encoding="utf-8", errors=NAMES)
            self.table = csv.DictWriter(self.csv, fieldnames=PREDICTION_FIELDS, extrasaction="ignore")
            self.table.writeheader()
        for path, exc in unlisted:
            self.skipped(path, exc)

    def _png(self, rgb: np.ndarray, name: str) -> str:
        return str(save_png(rgb, self.folder.file(name)))

    def _row(self, row: dict) -> None:
        self.rows.append(row)
        if self.csv is not None:
            self.table.writerow({k: ("" if row.get(k) is None else row[k]) for k in PREDICTION_FIELDS})
            self.csv.flush()

    def add(self, paths: Sequence[Path], originals: list, maps: np.ndarray, scores: np.ndarray) -> None:
        inspector = self.inspector
        for p, amap, score, image in zip(paths, maps, np.asarray(scores).tolist(), originals):
            try:
                v = inspector.verdict(amap, score, image, self.thresholds)
            except CflowInputError as exc:  # this image's error (a non-finite score); the others go on
                self.skipped(Path(p), exc)
                continue
            stem = _unique_stem(Path(p), self.used)
            row = {"path": str(p), **inspector.describe(v), "error": ""}
            if self.thresholds is None:
                row.update(score=None, image_threshold=None, pixel_threshold=None, region_threshold=None,
                           good_share=None, min_defect_area_px=None)
            heat = inspector.heat(v) if self.heatmaps or self.overlays else None  # drawn once for both
            if self.heatmaps:
                row["heatmap"] = self._png(heat, f"{stem}_heatmap.png")
            if self.overlays:
                overlay = inspector.overlay(v, heat)
                row["overlay"] = self._png(inspector.legend(overlay) if self.legend else overlay, f"{stem}_overlay.png")
            if self.masks and v.mask is not None:
                row["mask"] = self._png(inspector.mask_image(v), f"{stem}_mask.png")
            self._row(row)

    def skipped(self, path: Path, exc: CflowInputError) -> None:
        self.warn(f"skipped: {exc}")
        self._row({"path": str(path), "score": None, "raw_score": None, "label": None, "error": str(exc)})

    def finish(self, model, mode: str) -> list[dict]:
        if self.csv is not None:
            self.csv.close()
        if self.json_summary:
            summary = {"model": str(model) if isinstance(model, (str, Path)) else None,
                       "runtime": self.inspector.runtime, "device": self.inspector.device, "normalization": mode,
                       **summarize(self.rows, self.thresholds), "predictions": self.rows}
            self.folder.write_text("predictions.json", to_json(summary))
        return self.rows


def predict_onnx(model: str | Path, paths, output: str | Path, overlays: bool = True, progress: bool = True,
                 warn: Callable[[str], None] = print, masks: bool = True, heatmaps: bool = True,
                 csv_summary: bool = True, json_summary: bool = True, target_fpr: float | None = None,
                 image_threshold: float | None = None, pixel_threshold: float | None = None, device: str = "cpu",
                 workers: int | None = None, threads: int | None = None, min_defect_area: int = 0,
                 all_regions: bool = False, legend: bool = False) -> list[dict]:
    """`api.predict` for an exported .onnx model, without PyTorch: the same verdicts and files. Images
    are decoded by `workers` threads (default: `device.default_workers()`) while onnxruntime scores."""
    from .device import default_workers
    from .images import read_batches

    folder, files, unlisted = predict_inputs(paths, output)
    inspector = Inspector(model, "onnx", target_fpr, image_threshold, pixel_threshold, None, min_defect_area,
                          threads, device, all_regions=all_regions)
    if inspector.thresholds is None:
        warn("this model has no thresholds, so no labels or masks: run 'cflow-ad calibrate' to set them")
    writer = Predictions(inspector, folder, inspector.thresholds, overlays, masks, heatmaps, legend, csv_summary,
                         json_summary, warn, unlisted)
    batches = read_batches(files, inspector.config, inspector.config.batch_size,
                           default_workers() if workers is None else workers, lambda i, exc: writer.skipped(files[i], exc))
    for index, inputs, originals in _progress(batches, progress, -(-len(files) // inspector.config.batch_size)):
        writer.add([files[i] for i in index], originals, *inspector.score(inputs, originals))
    return writer.finish(model, inspector.config.normalization)


def _progress(items, enabled: bool, total: int):
    """A tqdm bar over `items` where tqdm is installed (the lean runtime may not have it)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc="predict", disable=not enabled)
