"""The Python API behind the CLI: train, test and predict, each one call.

Each function mirrors one `cflow-ad` command, takes the same options and writes the
same files, so anything done on the command line can be scripted.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import data as D
from .checkpoint import read_metadata, save_checkpoint
from .distributed import init_from_env
from .config import CFlowConfig
from .errors import CflowInputError
from .export import export_onnx
from .inference import Inspector, as_model, exportable
from .metrics import evaluate
from .model import CFlowModel, build_model
from .report import write_test_artifacts
from .scoring import anomaly_maps, paper_constants, score_set
from .stc import is_stc_root, stc_dataset, stc_scenes
from .thresholds import PIXEL_SAMPLE, Thresholds
from .training import fit, fit_baseline
from .visualize import save_png

STATE_FILE = "training_state.pt"  # CFLOW-AD's resumable training state, beside model.safetensors


def open_dataset(
    split: str,
    size: int,
    data: str | Path | None = None,
    category: str | None = None,
    normal_dir: str | Path | None = None,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
) -> D.AnomalyDataset:
    """An MVTec-layout split (data + category), an STC video-frame split (data with training/frames/,
    category = scene) or a plain folder layout (normal/abnormal/mask dirs)."""
    if data is not None:
        if is_stc_root(data):
            if not category:
                raise CflowInputError(f"no scene given for '{data}': pass --category, one of {', '.join(stc_scenes(data))}")
            return stc_dataset(data, category, split, size)
        if not category:
            raise CflowInputError(f"no category given for '{data}': pass --category (one of the folders under it)")
        return D.mvtec_dataset(data, category, split, size)
    if normal_dir is None:
        raise CflowInputError("no data given: pass --data ROOT --category NAME, or --normal-dir DIR")
    return D.folder_dataset(normal_dir, size, abnormal_dir if split == "test" else None, mask_dir if split == "test" else None)


def train(
    config: CFlowConfig,
    output: str | Path,
    data: str | Path | None = None,
    category: str | None = None,
    normal_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> Path:
    """Train on defect-free images and write `output/model.safetensors`; returns its path.
    `config.method` picks CFLOW-AD or a baseline (PaDiM, SPADE). CFLOW-AD's training state is kept
    in `output/training_state.pt` after every epoch and on SIGINT/SIGTERM until the model is written;
    `resume=True` continues from it (and returns a finished run's model as it is)."""
    final, state = Path(output) / "model.safetensors", Path(output) / STATE_FILE
    rank, world = init_from_env()  # under torchrun: one rank of data-parallel training
    if rank > 0:
        log = lambda message: None  # noqa: E731  (rank 0 speaks and writes for all)
        progress = False
    if world > 1 and config.method != "cflow":
        raise CflowInputError(f"{config.method} has no training loop to distribute: run it without torchrun")
    if resume and final.is_file() and not state.is_file():
        log(f"nothing to resume: training already finished ({final})")
        return final
    dataset = open_dataset("train", config.image_size, data, category, normal_dir)
    held_out = None
    if config.calibration_fraction > 0:
        dataset, held_out = D.split_train_val(dataset, config.calibration_fraction, config.seed)
    model = build_model(config)
    t0 = time.perf_counter()
    if config.method != "cflow":
        history = fit_baseline(model, dataset, progress=progress)
    else:
        val = None
        if config.val_fraction > 0:
            dataset, val = D.split_train_val(dataset, config.val_fraction, config.seed)
        Path(output).mkdir(parents=True, exist_ok=True)
        history = fit(model, dataset, val, progress=progress, log=log, state_path=state, resume=resume)
    history["train_seconds"] = time.perf_counter() - t0
    history["train_images"] = len(dataset)
    history["processes"] = world
    if rank > 0:
        return final  # rank 0 calibrates the thresholds and writes the checkpoint
    if held_out is not None:
        model.thresholds = calibrate_thresholds(model, held_out, config.target_fpr, progress=progress)
        log(f"thresholds at {config.target_fpr:.2%} false positives on {len(held_out)} held-out good images:"
            f" image {model.thresholds.image:.4g}, pixel {model.thresholds.pixel:.4g}")
    path = save_checkpoint(model, final, extra={"history": history})
    state.unlink(missing_ok=True)
    return path


def calibrate_thresholds(model: torch.nn.Module, dataset, target_fpr: float | None = None, f1: bool = False,
                         progress: bool = False, source: str = "held-out good images") -> Thresholds:
    """Thresholds from a set's stateless scores: at `target_fpr` on its good images, or F1-optimal
    over its labelled images and masks (`f1=True`)."""
    model.eval()
    if f1:
        maps, scores, masks, labels, _, _ = score_dataset(model, dataset, "stateless", progress)
        return Thresholds.f1(labels, scores.numpy(), masks.numpy(), maps.numpy())
    # Streamed, so memory does not grow with the set: the image scores, and per image a fixed-size
    # random sample of its map values (all of them while the set has fewer than PIXEL_SAMPLE pixels).
    per_image = max(1, PIXEL_SAMPLE // max(len(dataset), 1))
    gen = torch.Generator().manual_seed(model.config.seed)
    scores, pixels = [], []
    loader = DataLoader(dataset, batch_size=model.config.batch_size, shuffle=False, num_workers=0)
    with torch.no_grad():
        for batch in tqdm(loader, desc="calibrate", disable=not progress, leave=False):
            good = batch["label"] == 0
            if not good.any():
                continue
            maps, s = model(batch["image"][good])
            flat = maps.flatten(1)
            if flat.shape[1] > per_image:
                flat = flat[:, torch.randint(flat.shape[1], (per_image,), generator=gen)]
            scores.append(s)
            pixels.append(flat)
    n = sum(len(s) for s in scores)
    return Thresholds.from_good(torch.cat(scores).numpy() if n else [], torch.cat(pixels).numpy() if n else [],
                                target_fpr or model.config.target_fpr, f"{n} {source}", model.config.seed)


def calibrate(
    model: torch.nn.Module | str | Path,
    output: str | Path | None = None,
    data: str | Path | None = None,
    category: str | None = None,
    normal_dir: str | Path | None = None,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    target_fpr: float | None = None,
    f1: bool = False,
    progress: bool = True,
) -> Thresholds:
    """Set a checkpoint's thresholds on new images and write it to `output` (default: in place).
    Without `f1` only the set's good images are used, at `target_fpr` (default: the config's);
    with `f1` the set must hold defect images with masks (its test split, or the folders)."""
    path = Path(model) if isinstance(model, (str, Path)) else None
    model = as_model(model).eval()
    dataset = open_dataset("test", model.config.image_size, data, category, normal_dir, abnormal_dir, mask_dir)
    model.thresholds = calibrate_thresholds(model, dataset, target_fpr, f1, progress,
                                            f"good images of {Path(data) / category if data else normal_dir}")
    target = output or path
    if target is not None:
        extra = read_metadata(path)["extra"] if path is not None else {}
        save_checkpoint(model, target, extra=extra)
    return model.thresholds


def _paper_only_for_cflow(model) -> None:
    if not isinstance(model, CFlowModel):
        raise CflowInputError(
            "paper normalisation needs CFLOW's per-scale maps: use a cflow .safetensors checkpoint with --runtime torch")


@torch.no_grad()
def _run_set(model, dataset, outputs: Callable[[torch.Tensor], Sequence[torch.Tensor]], progress: bool, desc: str):
    """`outputs(images)` over a whole dataset, concatenated, plus its masks/labels/types/paths."""
    loader = DataLoader(dataset, batch_size=model.config.batch_size, shuffle=False, num_workers=0)
    parts: list[list[torch.Tensor]] = []
    masks, labels, types, paths = [], [], [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        for k, out in enumerate(outputs(batch["image"])):
            if k == len(parts):
                parts.append([])
            parts[k].append(out)
        masks.append(batch["mask"][:, 0] > 0.5)
        labels += [int(v) for v in batch["label"]]
        types += list(batch["defect_type"])
        paths += list(batch["path"])
    return [torch.cat(p) for p in parts], torch.cat(masks), labels, types, paths


def score_dataset(model: torch.nn.Module, dataset, mode: str, progress: bool = False):
    """(anomaly maps [N, H, W], scores [N], masks [N, H, W], labels, defect types, paths) of a labelled set."""
    if isinstance(model, CFlowModel):
        logs, masks, labels, types, paths = _run_set(
            model, dataset, lambda x: model.log_density_maps(model.features(x)), progress, "test")
        maps, scores = score_set(logs, model.image_size, mode, model.ref_log_density, model.map_offset)
    else:
        if mode == "paper":
            _paper_only_for_cflow(model)
        (maps, scores), masks, labels, types, paths = _run_set(model, dataset, model, progress, "test")
    return maps, scores, masks, labels, types, paths


def test(
    model: torch.nn.Module | str | Path,
    output: str | Path | None = None,
    data: str | Path | None = None,
    category: str | None = None,
    normal_dir: str | Path | None = None,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    normalization: str | None = None,
    progress: bool = True,
) -> dict:
    """Score a labelled test set; writes metrics.json and scores.csv to `output` when given. With
    calibrated thresholds, metrics also give the false-positive rate and recall they reach."""
    model_path = model if isinstance(model, (str, Path)) else None
    model = as_model(model).eval()
    mode = normalization or model.config.normalization
    dataset = open_dataset("test", model.config.image_size, data, category, normal_dir, abnormal_dir, mask_dir)
    t0 = time.perf_counter()
    maps, scores, masks, labels, types, paths = score_dataset(model, dataset, mode, progress)
    seconds = time.perf_counter() - t0
    metrics = evaluate(labels, scores.numpy(), masks.numpy(), maps.numpy(), types)
    metrics.update(normalization=mode, images=len(labels), seconds=round(seconds, 2),
                   model=str(model_path) if model_path else None)
    thresholds = getattr(model, "thresholds", None) if mode == "stateless" else None
    if thresholds is not None:
        metrics.update(thresholds=thresholds.summary(), at_threshold=rates_at(thresholds, labels, scores, masks, maps))
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(out / "scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "defect_type", "label", "score", "verdict"])
            w.writerows([p, t, lab, f"{s:.6f}", "" if thresholds is None else ("defect" if s > thresholds.image else "ok")]
                        for p, t, lab, s in zip(paths, types, labels, scores.tolist()))
        write_test_artifacts(out, maps, scores, masks, labels, types, paths, model.config.image_size,
                             2 * float(model.train_max_score), metrics.get("thresholds", {}).get("image"))
    return metrics


def rates_at(thresholds: Thresholds, labels, scores: torch.Tensor, masks: torch.Tensor, maps: torch.Tensor) -> dict:
    """What the thresholds do on a labelled set, in the terms they were calibrated in: the share of good
    images (of their pixels) flagged, and the share of defective images (of defect pixels) found."""
    bad = torch.tensor(labels, dtype=torch.bool)
    flagged = scores > thresholds.image
    rates = {"good_images": int((~bad).sum()), "defect_images": int(bad.sum()),
             "image_fpr": float(flagged[~bad].float().mean()) if (~bad).any() else None,
             "image_recall": float(flagged[bad].float().mean()) if bad.any() else None}
    hot_good = hot_defect = n_defect = 0
    for i in range(0, len(maps), 64):  # chunks: a whole set's boolean maps can be large
        hot, m = maps[i : i + 64] > thresholds.pixel, masks[i : i + 64]
        hot_good += int(hot[~bad[i : i + 64]].sum())
        hot_defect += int((hot & m).sum())
        n_defect += int(m.sum())
    n_good = int((~bad).sum()) * maps[0].numel()
    rates.update(pixel_fpr=hot_good / n_good if n_good else None, pixel_recall=hot_defect / n_defect if n_defect else None)
    return rates


def _unique_stem(path: Path, used: set[str]) -> str:
    """Output name for an image: its stem, prefixed by its folder when stems repeat (good/000, spot/000)."""
    stem = path.stem if path.stem not in used else f"{path.parent.name}_{path.stem}"
    base, i = stem, 1
    while stem in used:
        i += 1
        stem = f"{base}_{i}"
    used.add(stem)
    return stem


PREDICTION_FIELDS = ["path", "score", "label", "image_threshold", "pixel_threshold", "defect_area_px",
                     "defect_fraction", "width", "height", "error", "heatmap", "overlay", "mask"]


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
) -> list[dict]:
    """Score images/folders: per image a score, an OK / defect label at the model's thresholds (or
    `target_fpr`, or the given thresholds) and the defect area in its own pixels; optionally a heat
    map, an overlay and a mask PNG each, and predictions.csv / predictions.json for the run.

    Images stream through in batches, so memory does not grow with the folder size.
    Unreadable files are skipped, reported through `warn` and listed with their error, so
    nothing is lost silently. `paper` normalisation needs the whole set, so it scores in a
    second pass over the readable images, in PyTorch only, and gives no labels: its scores
    are relative to the set, the thresholds are not. A `.onnx` model, or
    `runtime="onnx"`, scores in onnxruntime.
    """
    inspector = Inspector(model, runtime, target_fpr, image_threshold, pixel_threshold)
    runner = inspector.runner
    mode = normalization or runner.config.normalization
    thresholds = inspector.thresholds
    if mode == "paper":
        _paper_only_for_cflow(runner)
        if thresholds is not None:
            warn("paper normalisation rescales scores per set, so the thresholds do not apply: no labels or masks")
        thresholds = None
    elif thresholds is None:
        warn("this model has no thresholds, so no labels or masks: run 'cflow-ad calibrate' to set them")
    size, bs = runner.config.image_size, runner.config.batch_size
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = D.list_images(paths)
    rows: list[dict] = []
    used: set[str] = set()

    def write(batch_paths, originals, maps, scores):
        for p, v in zip(batch_paths, inspector.verdicts(maps, scores, originals, thresholds)):
            stem = _unique_stem(p, used)
            row = {"path": str(p), **inspector.describe(v), "error": ""}
            if thresholds is None:
                row.update(image_threshold=None, pixel_threshold=None)
            heat = inspector.heat(v) if heatmaps or overlays else None  # drawn once for both
            if heatmaps:
                row["heatmap"] = str(save_png(heat, out / f"{stem}_heatmap.png"))
            if overlays:
                row["overlay"] = str(save_png(inspector.overlay(v, thresholds, heat), out / f"{stem}_overlay.png"))
            if masks and thresholds is not None:
                row["mask"] = str(save_png(v.mask(thresholds).astype(np.uint8) * 255, out / f"{stem}_mask.png"))
            rows.append(row)

    readable: list[Path] = []
    kept_logs: list[list[torch.Tensor]] = []
    for i in tqdm(range(0, len(files), bs), desc="predict", disable=not progress):
        batch_paths, inputs, originals = [], [], []
        for p in files[i : i + bs]:
            try:
                x, original = D.load_image_and_original(p, size)
            except CflowInputError as exc:
                warn(f"skipped: {exc}")
                rows.append({"path": str(p), "score": None, "label": None, "error": str(exc)})
                continue
            batch_paths.append(p)
            inputs.append(x)
            originals.append(original)
        if not inputs:
            continue
        if mode == "paper":
            readable += batch_paths
            kept_logs.append(runner.log_density_maps(runner.features(torch.stack(inputs))))
        else:
            write(batch_paths, originals, *runner(torch.stack(inputs)))
    if kept_logs:
        all_logs = [torch.cat(parts) for parts in zip(*kept_logs)]
        refs, offset = paper_constants(all_logs, runner.image_size)
        for i in range(0, len(readable), bs):
            originals = [D.load_image_and_original(p, size)[1] for p in readable[i : i + bs]]
            write(readable[i : i + bs], originals,
                  *anomaly_maps([lm[i : i + bs] for lm in all_logs], refs, offset, runner.image_size))
    if csv_summary:
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=PREDICTION_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows({k: ("" if r.get(k) is None else r[k]) for k in PREDICTION_FIELDS} for r in rows)
    if json_summary:
        summary = {"model": str(model) if isinstance(model, (str, Path)) else None, "runtime": inspector.runtime,
                   "normalization": mode, **summarize(rows, thresholds), "predictions": rows}
        (out / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n")
    return rows


def export(model: torch.nn.Module | str | Path, output: str | Path, format: str = "onnx") -> Path:
    """Write the whole model (image -> anomaly map and score) as ONNX; returns the file."""
    if format != "onnx":
        raise CflowInputError(f"unknown export format '{format}': the supported format is onnx")
    return export_onnx(exportable(as_model(model)), output)
