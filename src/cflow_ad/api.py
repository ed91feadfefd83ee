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

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import data as D
from .checkpoint import load_checkpoint, save_checkpoint
from .config import CFlowConfig
from .errors import CflowInputError
from .export import OnnxModel, export_onnx
from .metrics import evaluate
from .model import CFlowModel, build_model
from .scoring import anomaly_maps, paper_constants, score_set
from .training import fit, fit_baseline
from .visualize import heat_rgb, overlay_rgb, save_png


def open_dataset(
    split: str,
    size: int,
    data: str | Path | None = None,
    category: str | None = None,
    normal_dir: str | Path | None = None,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
) -> D.AnomalyDataset:
    """An MVTec-layout split (data + category) or a plain folder layout (normal/abnormal/mask dirs)."""
    if data is not None:
        if not category:
            raise CflowInputError(f"no category given for '{data}': pass --category (one of the folders under it)")
        return D.mvtec_dataset(data, category, split, size)
    if normal_dir is None:
        raise CflowInputError("no data given: pass --data ROOT --category NAME, or --normal-dir DIR")
    return D.folder_dataset(normal_dir, size, abnormal_dir if split == "test" else None, mask_dir if split == "test" else None)


def _model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    return model if isinstance(model, torch.nn.Module) else load_checkpoint(model)


def train(
    config: CFlowConfig,
    output: str | Path,
    data: str | Path | None = None,
    category: str | None = None,
    normal_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train on defect-free images and write `output/model.safetensors`; returns its path.
    `config.method` picks CFLOW-AD or a baseline (PaDiM, SPADE)."""
    dataset = open_dataset("train", config.image_size, data, category, normal_dir)
    model = build_model(config)
    t0 = time.perf_counter()
    if config.method != "cflow":
        history = fit_baseline(model, dataset, progress=progress)
    else:
        val = None
        if config.val_fraction > 0:
            dataset, val = D.split_train_val(dataset, config.val_fraction, config.seed)
        history = fit(model, dataset, val, progress=progress, log=log)
    history["train_seconds"] = time.perf_counter() - t0
    history["train_images"] = len(dataset)
    path = save_checkpoint(model, Path(output) / "model.safetensors", extra={"history": history})
    return path


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
    """Score a labelled test set; writes metrics.json and scores.csv to `output` when given."""
    model = _model(model).eval()
    mode = normalization or model.config.normalization
    dataset = open_dataset("test", model.config.image_size, data, category, normal_dir, abnormal_dir, mask_dir)
    t0 = time.perf_counter()
    maps, scores, masks, labels, types, paths = score_dataset(model, dataset, mode, progress)
    seconds = time.perf_counter() - t0
    metrics = evaluate(labels, scores.numpy(), masks.numpy(), maps.numpy(), types)
    metrics.update(normalization=mode, images=len(labels), seconds=round(seconds, 2))
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(out / "scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "defect_type", "label", "score"])
            w.writerows([p, t, lab, f"{s:.6f}"] for p, t, lab, s in zip(paths, types, labels, scores.tolist()))
    return metrics


def _unique_stem(path: Path, used: set[str]) -> str:
    """Output name for an image: its stem, prefixed by its folder when stems repeat (good/000, spot/000)."""
    stem = path.stem if path.stem not in used else f"{path.parent.name}_{path.stem}"
    base, i = stem, 1
    while stem in used:
        i += 1
        stem = f"{base}_{i}"
    used.add(stem)
    return stem


RUNTIMES = ("torch", "onnx")


def load_runner(model: torch.nn.Module | str | Path, runtime: str = "torch") -> torch.nn.Module | OnnxModel:
    """A model to score with: a checkpoint in PyTorch or exported to onnxruntime, or an exported .onnx file."""
    if runtime not in RUNTIMES:
        raise CflowInputError(f"unknown runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    if isinstance(model, (str, Path)) and Path(model).suffix.lower() == ".onnx":
        return OnnxModel(model)
    model = _model(model).eval()
    return OnnxModel.from_model(_exportable(model)) if runtime == "onnx" else model


def _exportable(model: torch.nn.Module) -> torch.nn.Module:
    if model.config.method == "spade":
        raise CflowInputError("SPADE's gallery search runs in PyTorch only: use --runtime torch, or a cflow or padim model")
    return model


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
) -> list[dict]:
    """Score images/folders; writes scores.csv and a heat map (and overlay) PNG per image.

    Images stream through in batches, so memory does not grow with the folder size.
    Unreadable files are skipped, reported through `warn` and listed in scores.csv with
    their error, so nothing is lost silently. `paper` normalisation needs the whole set,
    so it scores in a second pass over the readable images, in PyTorch only. A `.onnx`
    model, or `runtime="onnx"`, scores in onnxruntime.
    """
    runner = load_runner(model, runtime)
    mode = normalization or runner.config.normalization
    if mode == "paper":
        _paper_only_for_cflow(runner)
    size, bs = runner.config.image_size, runner.config.batch_size
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = D.list_images(paths)
    rows: list[dict] = []
    used: set[str] = set()
    scale = 2 * float(runner.train_max_score)

    def write(batch_paths, images, maps, scores):
        for p, img, amap, score in zip(batch_paths, images, maps, scores.tolist()):
            stem = _unique_stem(p, used)
            heat = heat_rgb(amap, scale)
            row = {"path": str(p), "score": score, "error": "", "map": str(save_png(heat, out / f"{stem}_map.png"))}
            if overlays:
                row["overlay"] = str(save_png(overlay_rgb(img, heat), out / f"{stem}_overlay.png"))
            rows.append(row)

    readable: list[Path] = []
    kept_logs: list[list[torch.Tensor]] = []
    for i in tqdm(range(0, len(files), bs), desc="predict", disable=not progress, leave=False):
        batch_paths, images = [], []
        for p in files[i : i + bs]:
            try:
                images.append(D.load_image(p, size))
                batch_paths.append(p)
            except CflowInputError as exc:
                warn(f"skipped: {exc}")
                rows.append({"path": str(p), "score": None, "error": str(exc)})
        if not images:
            continue
        if mode == "paper":
            readable += batch_paths
            kept_logs.append(runner.log_density_maps(runner.features(torch.stack(images))))
        else:
            write(batch_paths, images, *runner(torch.stack(images)))
    if kept_logs:
        all_logs = [torch.cat(parts) for parts in zip(*kept_logs)]
        refs, offset = paper_constants(all_logs, runner.image_size)
        for i in range(0, len(readable), bs):
            images = [D.load_image(p, size) for p in readable[i : i + bs]]
            write(readable[i : i + bs], images, *anomaly_maps([lm[i : i + bs] for lm in all_logs], refs, offset, runner.image_size))
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "score", "error", "map", "overlay"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": "" if r["score"] is None else f"{r['score']:.6f}"})
    return rows


def export(model: torch.nn.Module | str | Path, output: str | Path, format: str = "onnx") -> Path:
    """Write the whole model (image -> anomaly map and score) as ONNX; returns the file."""
    if format != "onnx":
        raise CflowInputError(f"unknown export format '{format}': the supported format is onnx")
    return export_onnx(_exportable(_model(model)), output)
