"""The Python API behind the CLI: train, test and predict, each one call.

Each function mirrors one `cflow-ad` command, takes the same options and writes the
same files, so anything done on the command line can be scripted.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data as D
from .checkpoint import read_metadata, save_checkpoint
from .config import CFlowConfig
from .device import Compute
from .distributed import process_group
from .errors import CflowInputError
from .export import export_onnx
from .geometry import full_boxes, restore
from .images import read
from .inference import (Inspector, Predictions, as_model, check_precision, exportable, is_onnx_file, load_runner,
                        predict_inputs)
from .metrics import FPR_LIMIT, Evaluation
from .model import METHOD_CLASSES, build_model
from .outputs import NAMES, OutputFolder, check_writable, check_writable_file, replacing, to_json
from .report import WorstCases, write_test_artifacts
from .scoring import fixed_mode, paper_stream
from .source import DataSource
from .thresholds import PIXEL_SAMPLE, Thresholds, heat_scale
from .training import fit, fit_baseline

STATE_FILE = "training_state.pt"  # CFLOW-AD's resumable training state, beside model.safetensors
# CFLOW-AD's location whitening and PaDiM's Gaussian need a covariance, so two images at least
MIN_TRAIN_IMAGES = 2


def _check_count(n: int, config: CFlowConfig, source: DataSource) -> None:
    """At least MIN_TRAIN_IMAGES left to train on after the images held out for the thresholds and for
    validation, or one line naming the folder and the options that hold images out."""
    held = D.held_out_count(n, config.calibration_fraction) if config.calibration_fraction > 0 else 0
    loop = METHOD_CLASSES[config.method].training_loop
    val = D.held_out_count(n - held, config.val_fraction) if loop and config.val_fraction > 0 else 0
    if n - held - val >= MIN_TRAIN_IMAGES:
        return
    parts = [(k, flag, f, why) for k, flag, f, why in (
        (held, "--calibration-fraction", config.calibration_fraction, "to set the thresholds"),
        (val, "--val-fraction", config.val_fraction, "for validation")) if k]
    besides = " and ".join(f"the {k} that {flag} {f:g} holds out {why}" for k, flag, f, why in parts)
    fix = " and ".join(f"{flag} 0" for _, flag, _, _ in parts)
    raise CflowInputError(f"'{source}' has {n} training image(s): training needs {MIN_TRAIN_IMAGES} to train on"
                          + (f" besides {besides}" if parts else "") + ": add defect-free images"
                          + (f" (or pass {fix})" if parts and n >= MIN_TRAIN_IMAGES else ""))


def train(
    config: CFlowConfig,
    output: str | Path,
    source: DataSource = DataSource(),
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: bool = False,
    device: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    flow_precision: str = "fp32",
) -> Path:
    """Train on the defect-free images of `source` and write `output/model.safetensors`; returns its path.
    `config.method` picks CFLOW-AD or a baseline (PaDiM, SPADE, PatchCore). CFLOW-AD's training state is kept
    in `output/training_state.pt` after every epoch and on SIGINT/SIGTERM until the model is written;
    `resume=True` continues from it (and returns a finished run's model as it is). `device`,
    `precision`, `workers` and `flow_precision` say where and how it computes (`device.Compute`); the
    checkpoint is the same file whatever the device, and records the two precisions."""
    final, state = check_writable(output) / "model.safetensors", Path(output) / STATE_FILE
    compute = Compute(device, precision, workers, flow_precision)
    with process_group(compute.torch_device) as (rank, world):  # under torchrun: one rank of data-parallel training
        if rank > 0:
            log = lambda message: None  # noqa: E731  (rank 0 speaks and writes for all)
            progress = False
        if world > 1 and not METHOD_CLASSES[config.method].training_loop:
            raise CflowInputError(f"{config.method} has no training loop to distribute: run it without torchrun")
        if resume and final.is_file() and not state.is_file():
            log(f"nothing to resume: training already finished ({final})")
            return final
        dataset = source.open("train", config)
        _check_count(len(dataset), config, source)
        held_out = None
        if config.calibration_fraction > 0:
            dataset, held_out = D.split_train_val(dataset, config.calibration_fraction, config.seed)
        model = build_model(config)
        model.precision, model.flow_precision = compute.precision, compute.flow_precision  # the fit's precisions
        compute.flows(model)  # a flow precision for a baseline: refused before any work
        t0 = time.perf_counter()
        if not model.training_loop:
            history = fit_baseline(model, dataset, progress=progress, compute=compute)
        else:
            val = None
            if config.val_fraction > 0:
                dataset, val = D.split_train_val(dataset, config.val_fraction, config.seed)
            Path(output).mkdir(parents=True, exist_ok=True)
            history = fit(model, dataset, val, progress=progress, log=log, state_path=state, resume=resume,
                          compute=compute)
        history["train_seconds"] = time.perf_counter() - t0
        history["train_images"] = len(dataset)
        history["processes"] = world
        if rank > 0:
            return final  # rank 0 calibrates the thresholds and writes the checkpoint
        if held_out is not None:
            model.thresholds = calibrate_thresholds(model, held_out, config.target_fpr, progress=progress,
                                                    compute=compute)
            t = model.thresholds
            log(f"thresholds at {config.target_fpr:.2%} false positives on {len(held_out)} held-out good images:"
                f" image {t.image:.4g}, pixel {t.pixel:.4g}, region {t.region_threshold:.4g}")
            if len(held_out) * config.target_fpr < 1:
                log(f"note: {len(held_out)} held-out images cannot show a {config.target_fpr:.2%} tail: expect more"
                    " good images flagged than that; the region threshold allows for so few images by sitting"
                    " higher, which finds fewer defects; 'cflow-ad calibrate --normal-dir MORE_GOOD_IMAGES' sets"
                    " them on more")
        path = save_checkpoint(model, final, extra={"history": history})
        state.unlink(missing_ok=True)
        return path


def _restored(maps: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor | None,
              rescore: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`geometry.restore` of host tensors, as tensors."""
    if boxes is None or full_boxes(boxes, tuple(maps.shape[-2:])):
        return maps, scores
    m, s = restore(maps.float().numpy(), scores.float().numpy(), boxes.numpy(), rescore)
    return torch.from_numpy(m), torch.from_numpy(s)


def calibrate_thresholds(model: torch.nn.Module, dataset, target_fpr: float | None = None, f1: bool = False,
                         progress: bool = False, source: str = "held-out good images",
                         compute: Compute | None = None) -> Thresholds:
    """Thresholds from a set's scores in the model's fixed mode: at `target_fpr` on its good images, or F1-optimal
    over its labelled images and masks (`f1=True`). Scored on `compute` (default: `Compute()`)."""
    compute = compute or Compute()
    compute.place(model).eval()
    if f1:  # streamed as `test` is: exact within the memory budget, binned past it
        mode = fixed_mode(model.config)
        evaluation = _evaluation(model, mode)
        for maps, scores, masks, has_mask, labels, types, _ in scored_batches(model, dataset, mode, progress, compute):
            evaluation.add(labels, scores.numpy(), masks.numpy(), maps.numpy(), types, has_mask)
        return Thresholds.f1_with_pixel(evaluation.labels, evaluation.scores, evaluation.f1_optimal_threshold()[0])
    # Streamed, so memory does not grow with the set: the image scores, and per image a fixed-size
    # random sample of its map values (all of them while the set has fewer than PIXEL_SAMPLE pixels)
    # and its map maximum, drawn on the device and copied back once per batch.
    per_image = max(1, PIXEL_SAMPLE // max(len(dataset), 1))
    gen = torch.Generator().manual_seed(model.config.seed)
    scores, pixels, maxima = [], [], []
    loader = D.image_loader(dataset, compute, model.config.batch_size)
    with torch.no_grad():
        for batch in tqdm(D.checked(loader), total=len(loader), desc="calibrate", disable=not progress, leave=False):
            good = batch["label"] == 0
            if not good.any():
                continue
            maps, s = _restored(*compute.host(*model(compute.put(batch["image"][good]))), batch["box"][good],
                                model.map_max_score)
            flat = maps.flatten(1)
            maxima.append(flat.amax(1))
            if flat.shape[1] > per_image:
                flat = flat[:, torch.randint(flat.shape[1], (per_image,), generator=gen)]
            scores.append(s)
            pixels.append(flat)
    n = sum(len(s) for s in scores)
    pixels = torch.cat(pixels).numpy() if n else []  # the parts are freed: at most twice the sample in memory
    return Thresholds.from_good(torch.cat(scores).numpy() if n else [], pixels,
                                target_fpr or model.config.target_fpr, f"{n} {source}", model.config.seed,
                                torch.cat(maxima).numpy() if n else [])


def calibrate(
    model: torch.nn.Module | str | Path,
    output: str | Path | None = None,
    source: DataSource = DataSource(),
    target_fpr: float | None = None,
    f1: bool = False,
    progress: bool = True,
    device: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    flow_precision: str = "fp32",
) -> Thresholds:
    """Set a checkpoint's thresholds on the test split of `source` and write it to `output` (default: in
    place). Without `f1` only the set's good images are used, at `target_fpr` (default: the config's);
    with `f1` the set must hold defect images with masks (the pixel threshold uses those with one).
    They are fitted in `precision` and `flow_precision`, which the checkpoint records and then runs in
    (`inference.check_precision`)."""
    path = Path(model) if isinstance(model, (str, Path)) else None
    target = output or path
    if target is not None:  # before any scoring: an unwritable target is a one-line error, not a lost run
        check_writable_file(target, "--output" if output else "--model")
    compute = Compute(device, precision, workers, flow_precision)
    model = as_model(model).eval()
    dataset = source.open("test", model.config)
    model.thresholds = calibrate_thresholds(model, dataset, target_fpr, f1, progress, f"good images of {source}",
                                            compute)
    # the model now runs in these precisions (`inference.check_precision`)
    model.precision, model.flow_precision = compute.precision, compute.flow_precision
    if target is not None:
        extra = read_metadata(path)["extra"] if path is not None else {}
        save_checkpoint(model, target, extra=extra)
    return model.thresholds


def _check_mode(model, mode: str) -> None:
    """Paper mode needs per-scale log-density maps, which only a model declaring it in `normalizations` has:
    CFLOW in PyTorch (a baseline's maps are the same in every other mode; an export's graph ends at the map)."""
    if mode == "paper" and mode not in model.normalizations:
        raise CflowInputError(
            "paper normalisation needs CFLOW's per-scale maps: use a cflow .safetensors checkpoint with --runtime torch")


def _evaluation(model: torch.nn.Module, mode: str, memory_mb: int | None = None,
                thresholds: Thresholds | None = None) -> Evaluation:
    """An `Evaluation` of a labelled set within an eighth of the memory budget (default: the config's).
    Its histograms are centred where CFLOW's Eq. 8 maps pile up: their upper bound, the map offset,
    just under which strong anomalies sit (log maps have no bound, and no such pile)."""
    budget = (model.config.memory_mb if memory_mb is None else memory_mb) * 2**20 // 8
    centre = float(model.map_offset) if mode == "stateless" and mode in model.normalizations else None
    limits = None if thresholds is None else (thresholds.image, thresholds.pixel, thresholds.region_threshold)
    return Evaluation(budget, limits, FPR_LIMIT, centre)


def scored_batches(model: torch.nn.Module, dataset, mode: str, progress: bool = False, compute: Compute | None = None,
                   runner=None):
    """(anomaly maps [B, H, W], scores [B], the batch's masks [B, H, W] as bool, whether each image has a
    mask [B] as bool, labels, defect types, paths) per batch of a labelled set, scored on `compute`
    (default: `Compute()`); maps and scores come back to the host once per batch. A file that cannot be
    read stops it with its one-line error. `log` and `stateless` scoring keep nothing between batches;
    `paper` keeps the per-scale log maps and the masks (5 + 64 KB an image at 256 px; `scoring.paper_stream`).
    A `runner` (`runtime.OnnxModel`, the model exported) scores instead of `model`, in the model's own mode;
    `model` may then be the runner itself (an .onnx file, no PyTorch model)."""
    _check_mode(model, mode)
    compute = compute or Compute()
    if runner is None:
        compute.place(model).eval()
    loader = D.image_loader(dataset, compute, model.config.batch_size)

    def meta(batch):
        labels = [int(v) for v in batch["label"]]
        return (batch["box"], batch["mask"][:, 0] > 0.5, batch["has_mask"].numpy(), labels, list(batch["defect_type"]),
                list(batch["path"]))

    batches = tqdm(D.checked(loader), total=len(loader), desc="test", disable=not progress, leave=False)
    with torch.no_grad():
        if mode == "paper":
            logs = ((model.log_density_maps(model.features(compute.put(b["image"]))), meta(b)) for b in batches)
            for maps, scores, (boxes, *m) in paper_stream(logs, model.image_size, compute.host, model.config.blur_sigma):
                yield *_restored(maps, scores, boxes, model.map_max_score), *m
            return
        own = mode == fixed_mode(model.config) or mode not in model.normalizations
        for batch in batches:
            boxes, *m = meta(batch)
            if runner is not None:
                maps, scores = map(torch.from_numpy, runner(batch["image"].numpy()))
            else:
                x = compute.put(batch["image"])
                maps, scores = compute.host(*(model(x) if own else model(x, mode)))
            yield *_restored(maps, scores, boxes, model.map_max_score), *m


def score_dataset(model: torch.nn.Module, dataset, mode: str, progress: bool = False, compute: Compute | None = None):
    """(anomaly maps [N, H, W], scores [N], masks [N, H, W], has-mask flags [N], labels, defect types, paths)
    of a whole labelled set, held in memory: for the experiments' figures of MVTec-size sets."""
    parts = list(zip(*scored_batches(model, dataset, mode, progress, compute)))
    if not parts:
        raise CflowInputError("the test set is empty")
    return (torch.cat(parts[0]), torch.cat(parts[1]), torch.cat(parts[2]), np.concatenate(parts[3]),
            *([v for b in p for v in b] for p in parts[4:]))


def test(
    model: torch.nn.Module | str | Path,
    output: str | Path | None = None,
    source: DataSource = DataSource(),
    normalization: str | None = None,
    progress: bool = True,
    memory_mb: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    runtime: str = "torch",
    quantize: str | None = None,
    flow_precision: str = "fp32",
) -> dict:
    """Score the labelled test split of `source` in `runtime` (`onnx`: the model exported, with int8
    decoders under `quantize="int8"`), or an .onnx file as it was exported (what the line runs); writes
    metrics.json and scores.csv to `output` when given. Image metrics use every image, pixel metrics the
    images with masks (metrics.json counts both); a metric that cannot be computed is None. With
    calibrated thresholds, metrics also give the false-positive rate and recall they reach. Memory is
    bounded: pixel metrics are exact while the set's maps and masks fit in an eighth of `memory_mb`
    (default: the config's), else binned."""
    model_path = model if isinstance(model, (str, Path)) else None
    folder = None if output is None else OutputFolder(output, "test")  # unwritable: one line, before any work
    compute = Compute(device, precision, workers, flow_precision)
    onnx_file = is_onnx_file(model)  # an .onnx file's config, thresholds and heat-map scale are in its metadata
    model = load_runner(model, "onnx", compute, quantize=quantize) if onnx_file else as_model(model).eval()
    mode = normalization or model.config.normalization
    exported = onnx_file or runtime != "torch" or bool(quantize)
    if exported and mode != fixed_mode(model.config):
        raise CflowInputError(f"--runtime onnx scores in the export's fixed mode, {fixed_mode(model.config)}:"
                              f" --normalization {mode} needs a checkpoint with --runtime torch")
    if onnx_file:
        runner, runtime, quantize = model, "onnx", model.quantize
    else:
        runner = load_runner(model, runtime, compute, quantize=quantize) if exported else None
        check_precision(model, compute)
    dataset = source.open("test", model.config)
    thresholds = model.thresholds if mode == fixed_mode(model.config) else None
    evaluation = _evaluation(model, mode, memory_mb, thresholds)
    cases = WorstCases()
    paths = []
    t0 = time.perf_counter()
    for maps, scores, masks, has_mask, labels, types, batch_paths in scored_batches(model, dataset, mode, progress,
                                                                                   compute, runner):
        evaluation.add(labels, scores.numpy(), masks.numpy(), maps.numpy(), types, has_mask)
        if output is not None:
            cases.add(maps, scores, masks, labels, types, batch_paths)
        paths += batch_paths
    seconds = time.perf_counter() - t0
    metrics = evaluation.result()
    metrics.update(normalization=mode, images=len(paths), seconds=round(seconds, 2),
                   model=str(model_path) if model_path else None, runtime=runtime,
                   device=runner.provider if runner is not None else compute.describe(),  # the provider that ran
                   quantize=quantize or "none")
    if thresholds is not None:
        metrics["thresholds"] = thresholds.summary()
    if folder is not None:  # the last run's files go first; metrics.json last, so it marks a finished set
        folder.begin()
        with replacing(folder.file("scores.csv")) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                               errors=NAMES) as f:
            w = csv.writer(f)
            w.writerow(["path", "defect_type", "label", "score", "raw_score", "verdict"])
            normal = [None] * len(paths) if thresholds is None else [thresholds.normalized(v) for v in evaluation.scores]
            w.writerows([p, t, lab, "" if n is None else f"{n:.6f}", f"{s:.6f}",
                         "" if thresholds is None else ("defect" if s > thresholds.image else "ok")]
                        for p, t, lab, n, s in zip(paths, evaluation.types, evaluation.labels, normal, evaluation.scores))
        write_test_artifacts(folder, evaluation.curves(), cases, model.config.image_size, thresholds,
                             heat_scale(thresholds, model.train_max_score))
        folder.write_text("metrics.json", to_json(metrics))
    return metrics


@torch.no_grad()
def predict(
    model: torch.nn.Module | str | Path,
    paths: Sequence[str | Path],
    output: str | Path,
    normalization: str | None = None,
    overlays: bool = True,
    progress: bool = True,
    warn: Callable[[str], None] = print,
    runtime: str = "torch",
    masks: bool = True,
    heatmaps: bool = True,
    csv_summary: bool = True,
    json_summary: bool = True,
    target_fpr: float | None = None,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    device: str = "auto",
    precision: str = "fp32",
    workers: int | None = None,
    flow_precision: str = "fp32",
    min_defect_area: int = 0,
    quantize: str | None = None,
    all_regions: bool = False,
    legend: bool = False,
) -> list[dict]:
    """Score images/folders: per image a score, an OK / defect label at the model's thresholds (or
    `target_fpr`, or the given thresholds), the defect area in its own pixels and the defect regions
    (those of at least `min_defect_area` pixels; every part of the mask with `all_regions`; see
    `Inspector.verdicts`); optionally a heat map, an overlay (with a colour bar under `legend`) and a mask
    PNG each, and predictions.csv / predictions.json for the run.

    Images stream through in batches, so memory does not grow with the folder size.
    Unreadable files are skipped, reported through `warn` and listed with their error, so
    nothing is lost silently. `paper` normalisation needs the whole set, so it scores in a
    second pass over the readable images, in PyTorch only, and gives no labels: its scores
    are relative to the set, the thresholds are not. A `.onnx` model, or
    `runtime="onnx"`, scores in onnxruntime (on the GPU with onnxruntime-gpu and a CUDA device), with
    int8 decoders under `quantize="int8"`. Images are decoded by `workers` processes and scored on `device` (see `device.Compute`).
    """
    compute = Compute(device, precision, workers, flow_precision)
    folder, files, unlisted = predict_inputs(paths, output)
    inspector = Inspector(model, runtime, target_fpr, image_threshold, pixel_threshold, compute, min_defect_area,
                          quantize=quantize, all_regions=all_regions)
    runner = inspector.runner
    mode = normalization or runner.config.normalization
    thresholds = inspector.thresholds
    if mode not in ("paper", fixed_mode(runner.config)):
        raise CflowInputError(f"predict scores in the model's own mode, {fixed_mode(runner.config)}, or in paper mode:"
                              f" --normalization {mode} needs 'cflow-ad test'")
    if mode == "paper":
        _check_mode(runner, mode)
        if thresholds is not None:
            warn("paper normalisation rescales scores per set, so the thresholds do not apply: no labels or masks")
        thresholds = None
    elif thresholds is None:
        warn("this model has no thresholds, so no labels or masks: run 'cflow-ad calibrate' to set them")
    size, bs = runner.config, runner.config.batch_size  # the config: its input size and aspect handling
    writer = Predictions(inspector, folder, thresholds, overlays, masks, heatmaps, legend, csv_summary, json_summary,
                         warn, unlisted)
    loader = D.image_loader(D.ImageFiles(files, size), compute, bs, collate=D.collate_files)
    batches = tqdm(D.checked(loader, lambda i, exc: writer.skipped(files[i], exc)), total=len(loader), desc="predict",
                   disable=not progress)
    if mode == "paper":  # the originals are read again in the second pass, not kept
        logs = ((runner.log_density_maps(runner.features(compute.put(inputs))), [files[i] for i in index])
                for index, inputs, _ in batches)
        for maps, scores, batch_paths in paper_stream(logs, runner.image_size, compute.host, runner.config.blur_sigma):
            originals = [read(p, size)[1] for p in batch_paths]
            writer.add(batch_paths, originals, *inspector.restore(maps, scores, originals))
    else:
        for index, inputs, originals in batches:
            writer.add([files[i] for i in index], originals, *inspector.score(inputs, originals))
    return writer.finish(model, mode)


def export(model: torch.nn.Module | str | Path, output: str | Path, format: str = "onnx",
           quantize: str | None = None) -> Path:
    """Write the whole model (image -> anomaly map and score) as ONNX, with int8 decoders under
    `quantize="int8"`; returns the file."""
    if format != "onnx":
        raise CflowInputError(f"unknown export format '{format}': the supported format is onnx")
    check_writable_file(output)
    return export_onnx(exportable(as_model(model)), output, quantize)
