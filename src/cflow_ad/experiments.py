"""The paper's experiments, one command each, on any MVTec-layout root.

- `ablation` (Table 2): variants of one base CFLOW-AD config, one seed each.
- `compare` (Tables 3-4): CFLOW-AD, PaDiM, SPADE and PatchCore per category, mean +/- std over seeds.
- `figures` (Figures 3-4): image / ground truth / anomaly map / predicted mask, and the pixel
  score histograms, at the pixel threshold that maximises F1.
- `suite`: one config, trained as `cflow-ad train` does, on every category under several roots (the
  development sets), beside the reference figures of each set's README. Defaults are judged on it.
Table 6 (speed and size per method) is `benchmarks/speed.py`.

`--data` takes one root or several: a root that holds categories, or a folder of such roots
(`../shared/data`), whose categories are then named `root/category`. Every run (method, config,
seed, category) is stored under OUTPUT/runs/ with its checkpoint and
metrics, named by a hash of its config: a rerun, or another experiment needing the same run,
reuses it, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import api
from .checkpoint import load_checkpoint, read_metadata
from .config import METHODS, CFlowConfig
from .device import Compute
from .encoder import PACKAGED_WEIGHTS, packaged_weights_path
from .errors import CflowInputError
from .metrics import f1_optimal_threshold, to_json
from .outputs import percent
from .model import METHOD_CLASSES
from .source import DataSource, layout

METRICS = ("image_auroc", "pixel_auroc", "aupro")
DETERMINISTIC = tuple(name for name, kind in METHOD_CLASSES.items() if kind.deterministic)  # one seed says everything


def offline_encoders() -> list[str]:
    """Encoders whose ImageNet weights are installed here (no download needed)."""
    return [name for name in PACKAGED_WEIGHTS if packaged_weights_path(name) is not None]


def ablation_variants(base: CFlowConfig) -> dict[str, dict]:
    """Table 2's rows as config changes to `base`: couplings, pooled scales, input size, CFLOW vs
    UFLOW, and every other encoder available offline."""
    variants = {
        "base": {},
        "4 couplings": {"coupling_layers": 4},
        "8 couplings": {"coupling_layers": 8},
        "2 scales": {"pool_layers": 2},
        "3 scales": {"pool_layers": 3},
        base.replace(image_size=tuple(2 * v for v in base.image_size)).size_text: {
            "image_size": tuple(2 * v for v in base.image_size)},
        "UFLOW (no condition)": {"conditional": False},
    }
    variants.update({name: {"encoder": name} for name in offline_encoders() if name != base.encoder})
    # drop the rows that equal the base
    return {k: v for k, v in variants.items() if k == "base" or base.replace(**v) != base}


# Fields a method never reads, or that never change the metrics: runs differing only in them
# are the same run. The calibration hold-out is not one of them: it takes images from training.
_BASELINE = {"coupling_layers", "condition_dim", "conditional", "clamp_alpha", "permutation", "whitening",
             "whitening_eps", "whitening_shrinkage", "epochs", "sub_epochs", "min_steps", "fiber_batch", "lr", "warmup_epochs", "loss", "rotation",
             "val_fraction", "normalization", "target_fpr", "memory_mb"}
_UNUSED = {
    "cflow": {"padim_channels", "knn_images", "coreset_ratio", "target_fpr", "memory_mb"},
    "padim": _BASELINE | {"coreset_ratio"},
    "spade": _BASELINE | {"coreset_ratio"},
    "patchcore": _BASELINE | {"padim_channels", "knn_images"},
}


def run_key(config: CFlowConfig) -> str:
    """Folder name of a run: method, seed and a hash of the config fields the method reads."""
    used = {k: v for k, v in json.loads(config.to_json()).items() if k not in _UNUSED[config.method]}
    digest = hashlib.sha1(json.dumps(used, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.method}-seed{config.seed}-{digest}"


def run_once(config: CFlowConfig, data: Path, category: str, output: Path, progress: bool = False,
             log: Callable[[str], None] = print, compute: dict | None = None, paper: bool = True,
             name: str | None = None) -> dict:
    """Train and test one config on one category (stored as `name`, default the category), or read
    the stored result of an identical run. With `paper` it trains on every training image, as the
    paper does (thresholds play no part in its metrics); without, as `cflow-ad train` does, holding
    out the calibration images. `compute` (device, precision, workers for the api) is a run setting:
    it is not in the run's key."""
    compute = compute or {}
    if paper:
        config = config.replace(calibration_fraction=0.0)
    name = name or category
    folder = output / "runs" / name / run_key(config)
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    log(f"[{name}] training {config.method} seed {config.seed} -> {folder}")
    source = DataSource(data, category)
    path = api.train(config, folder, source, progress=progress, log=lambda m: None, **compute)
    metrics = api.test(path, folder / "test", source, progress=progress, **compute)
    history = read_metadata(path)["extra"]["history"]
    result = {
        "category": name, "method": config.method, "seed": config.seed, "config": json.loads(config.to_json()),
        **{k: metrics[k] for k in METRICS}, "per_type": metrics["per_type"], "at_threshold": metrics.get("at_threshold"),
        "train_seconds": round(history["train_seconds"], 1), "test_seconds": metrics["seconds"],
        "test_images": metrics["images"], "checkpoint": str(path),
    }
    result_file.write_text(to_json(result))
    log(f"[{name}] {config.method} seed {config.seed}: " + " / ".join(_pct([result[k]]) for k in METRICS))
    return result


class Category(NamedTuple):
    """One category of an experiment: its name in tables and run folders, its root, its folder name."""

    name: str
    root: Path
    category: str


def categories(roots: Path | Sequence[Path], chosen: Sequence[str] | None = None) -> list[Category]:
    """The categories under `roots`: a root's own categories (named by the category), or those of the
    roots one level down (named `root/category`, e.g. `piped/flr01_tl` under ../shared/data). `chosen`
    keeps those named, by name or category."""
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    found: list[Category] = []
    for top in roots:
        if not top.is_dir():
            raise CflowInputError(f"'{top}' is not a folder: pass an MVTec-layout root, an STC root or a folder of"
                                  " MVTec-layout roots")
        own = DataSource(top).categories()
        if own:
            found += [Category(c, top, c) for c in own]
            continue
        for root in sorted(p for p in top.iterdir() if p.is_dir() and layout(p) == "mvtec"):
            found += [Category(f"{root.name}/{c}", root, c) for c in DataSource(root).categories()]
    if not found:
        raise CflowInputError(f"no categories under {', '.join(map(str, roots))}: pass an MVTec-layout root"
                              " (ROOT/CATEGORY/train/good), an STC root (training/frames/) or a folder of such roots")
    if not chosen:
        return found
    missing = [c for c in chosen if not any(c in (f.name, f.category) for f in found)]
    if missing:
        raise CflowInputError(f"categories {', '.join(missing)} not under {', '.join(map(str, roots))}: choose from"
                              f" {', '.join(f.name for f in found)}")
    return [f for f in found if f.name in chosen or f.category in chosen]


def _known(values: Sequence[float | None]) -> list[float]:
    """The values that were computed: a metric without masks is None (or nan from older runs)."""
    return [v for v in values if v is not None and not math.isnan(v)]


def _pct(values: Sequence[float | None]) -> str:
    """One run's metric in percent, or the mean ± standard deviation of several seeds'."""
    known = _known(values)
    if len(known) < 2:
        return percent(known[0] if known else None, 1, "")
    vals = [100 * v for v in known]
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the computed values, None if there is none: categories without masks have no pixel metrics."""
    vals = _known(values)
    return statistics.mean(vals) if vals else None


def _write(output: Path, name: str, markdown: str, payload: dict) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.md").write_text(markdown)
    (output / f"{name}.json").write_text(to_json(payload))
    return payload


def ablation(base: CFlowConfig, data: Path | Sequence[Path], chosen_categories: Sequence[str] | None, output: Path,
             variants: Sequence[str] | None = None, progress: bool = False, log: Callable[[str], None] = print,
             compute: dict | None = None) -> dict:
    """Table 2: each variant of `base` on each category, one seed (base.seed)."""
    table = ablation_variants(base)
    chosen = list(table) if not variants else ["base", *[v for v in variants if v != "base"]]
    unknown = [v for v in chosen if v not in table]
    if unknown:
        raise CflowInputError(f"unknown ablation variants {', '.join(unknown)}: choose from {', '.join(table)}")
    cats = categories(data, chosen_categories)
    rows = []
    for name in chosen:
        config = base.replace(method="cflow", **table[name])
        results = [run_once(config, c.root, c.category, output, progress, log, compute, name=c.name) for c in cats]
        rows.append({"variant": name, "changes": table[name], "results": results})
    lines = [f"Base: {_describe(base)}; seed {base.seed}; categories: {', '.join(c.name for c in cats)} (mean over them; pixel"
             " metrics over those with masks).", "",
             "| variant | image AUROC | pixel AUROC | AUPRO | training s | test s |", "|---|---|---|---|---|---|"]
    for row in rows:
        rs = row["results"]
        cells = [_pct([_mean([r[k] for r in rs])]) for k in METRICS]
        lines.append(f"| {row['variant']} | {' | '.join(cells)} | {sum(r['train_seconds'] for r in rs):.0f}"
                     f" | {sum(r['test_seconds'] for r in rs):.0f} |")
    return _write(output, "ablation", "\n".join(lines) + "\n", {"base": json.loads(base.to_json()), "rows": rows})


def _describe(config: CFlowConfig) -> str:
    return (f"{config.encoder}, {config.pool_layers} scales, {config.coupling_layers} couplings, C = {config.condition_dim},"
            f" {config.size_text}")


def compare(base: CFlowConfig, data: Path | Sequence[Path], chosen_categories: Sequence[str] | None, output: Path,
            methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1, 2, 3), progress: bool = False,
            log: Callable[[str], None] = print, compute: dict | None = None, paper_taps: bool = False) -> dict:
    """Tables 3-4: every method on every category and seed (one seed for deterministic methods), on the
    taps of `base`, or with `paper_taps` each on the taps of its own paper."""
    found = categories(data, chosen_categories)
    cats = [c.name for c in found]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise CflowInputError(f"unknown methods {', '.join(bad)}: choose from {', '.join(METHODS)}")
    results: dict[str, dict[str, list[dict]]] = {m: {} for m in methods}
    configs = {m: base.replace(method=m) for m in methods}
    if paper_taps:
        configs = {m: c.replace(**dict(zip(("pool_layers", "last_stride"), METHOD_CLASSES[m].paper_taps)))
                   for m, c in configs.items()}
    for m in methods:
        for c in found:
            runs = seeds[:1] if m in DETERMINISTIC else seeds
            results[m][c.name] = [run_once(configs[m].replace(seed=s), c.root, c.category, output, progress, log,
                                           compute, name=c.name) for s in runs]
    taps = "; ".join(f"{m} strides {'/'.join(map(str, c.strides))}" for m, c in configs.items())
    lines = [f"Encoder for every method: {_describe(base)}; taps: {taps}. Seeds {', '.join(map(str, seeds))}"
             f" (mean ± std); {', '.join(DETERMINISTIC)}: deterministic, one run.", ""]
    for metric, title in zip(METRICS, ("Image AUROC (%)", "Pixel AUROC (%)", "AUPRO (%)")):
        lines += [f"### {title}", "", "| category | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for c in cats:
            lines.append(f"| {c} | " + " | ".join(_pct([r[metric] for r in results[m][c]]) for m in methods) + " |")
        if len(cats) > 1:  # the average over categories, per seed, then mean +/- std over seeds
            avg = {m: [_mean([results[m][c][i][metric] for c in cats]) for i in range(len(results[m][cats[0]]))]
                   for m in methods}
            lines.append("| **average** | " + " | ".join(_pct(avg[m]) for m in methods) + " |")
        lines.append("")
    lines += ["| method | training s (per run, mean) | test s (per run, mean) |", "|---|---|---|"]
    for m in methods:
        rs = [r for c in cats for r in results[m][c]]
        lines.append(f"| {m} | {statistics.mean(r['train_seconds'] for r in rs):.0f} | {statistics.mean(r['test_seconds'] for r in rs):.0f} |")
    return _write(output, "compare", "\n".join(lines) + "\n", {"base": json.loads(base.to_json()), "seeds": list(seeds),
                                                              "results": results})


def figures(base: CFlowConfig, data: Path | Sequence[Path], chosen_categories: Sequence[str] | None, output: Path,
            rows: int = 6,
            progress: bool = False, log: Callable[[str], None] = print, compute: dict | None = None) -> dict:
    """Figures 3-4 for `base` (its method and seed) per category: an example grid and the pixel
    score histograms, both at the F1-optimal pixel threshold, from the test images with masks; a
    category whose defect images have no masks gets a note instead. figures.md lists every method
    run so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    previous = output / "figures.json"  # other methods' figures stay listed
    payload = json.loads(previous.read_text()) if previous.is_file() else {}
    for cat in categories(data, chosen_categories):
        c = cat.name
        result = run_once(base, cat.root, cat.category, output, progress, log, compute, name=c)
        model = load_checkpoint(result["checkpoint"])
        dataset = DataSource(cat.root, cat.category).open("test", base)
        maps, scores, masks, has_mask, labels, types, paths = api.score_dataset(
            model, dataset, model.config.normalization, progress, Compute(**(compute or {})))
        metrics = {k: result[k] for k in METRICS}
        if not has_mask[np.asarray(labels) == 1].any():
            log(f"[{c}] no defect image has a mask: pixel figures skipped")
            payload[f"{c}/{base.method}"] = {"category": c, "method": base.method, "threshold": None, "f1": None,
                                             "grid": None, "histogram": None, "examples": [], **metrics,
                                             "note": "no defect image has a mask: pixel figures skipped"}
            continue
        chosen = np.flatnonzero(has_mask)  # the figures need ground truth: the images with masks
        maps, masks, scores = maps.numpy()[chosen], masks.numpy()[chosen], scores.numpy()[chosen]
        types = [types[i] for i in chosen]
        threshold, f1 = f1_optimal_threshold(masks, maps)
        picks = _examples(types, scores, rows)
        fig, axes = plt.subplots(len(picks), 4, figsize=(8, 2 * len(picks)), squeeze=False)
        top = float(np.quantile(maps, 0.999))
        for r, i in enumerate(picks):
            image = dataset[int(chosen[i])]["image"].permute(1, 2, 0).numpy()
            panels = [(image, None, f"{types[i]}"), (masks[i], "gray", "ground truth"),
                      (maps[i], "jet", f"map (score {float(scores[i]):.3g})"), (maps[i] >= threshold, "gray", "predicted mask")]
            for ax, (img, cmap, title) in zip(axes[r], panels):
                ax.imshow(img, cmap=cmap, vmin=0 if cmap else None, vmax=(top if cmap == "jet" else 1) if cmap else None)
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        fig.suptitle(f"{c}: {base.method}, pixel threshold {threshold:.3g} (max F1 {f1:.3f})", fontsize=9)
        fig.tight_layout()
        grid = output / f"figure3_{c.replace('/', '_')}_{base.method}.png"
        output.mkdir(parents=True, exist_ok=True)
        fig.savefig(grid, dpi=80)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 3.2))
        bins = np.linspace(float(maps.min()), float(maps.max()), 101)
        ax.hist(maps[~masks].ravel(), bins=bins, density=True, alpha=0.6, label="normal pixels")
        ax.hist(maps[masks].ravel(), bins=bins, density=True, alpha=0.6, label="anomalous pixels")
        ax.axvline(threshold, color="k", linestyle="--", label=f"max-F1 threshold {threshold:.3g}")
        ax.set_yscale("log")
        ax.set_xlabel("anomaly score")
        ax.set_ylabel("density")
        ax.set_title(f"{c}: {base.method} pixel scores", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        hist = output / f"figure4_{c.replace('/', '_')}_{base.method}.png"
        fig.savefig(hist, dpi=80)
        plt.close(fig)
        payload[f"{c}/{base.method}"] = {"category": c, "method": base.method, "threshold": threshold, "f1": f1,
                                         "grid": str(grid), "histogram": str(hist),
                                         "examples": [paths[int(chosen[i])] for i in picks], **metrics}
    lines = ["| category | method | pixel threshold (max F1) | F1 | grid | histogram |", "|---|---|---|---|---|---|"]
    for p in payload.values():
        if p["grid"] is None:
            lines.append(f"| {p['category']} | {p['method']} | n/a | n/a | {p['note']} | |")
        else:
            lines.append(f"| {p['category']} | {p['method']} | {p['threshold']:.4g} | {p['f1']:.3f}"
                         f" | {Path(p['grid']).name} | {Path(p['histogram']).name} |")
    return _write(output, "figures", "\n".join(lines) + "\n", payload)


def _examples(types: Sequence[str], scores: np.ndarray, rows: int) -> list[int]:
    """One image per defect type (its median-scored one, not the easiest), then a good image."""
    picks = []
    for t in sorted(set(types) - {"good"}):
        idx = [i for i, ty in enumerate(types) if ty == t]
        picks.append(sorted(idx, key=lambda i: scores[i])[len(idx) // 2])
    picks = picks[: max(rows - 1, 1)]
    good = [i for i, ty in enumerate(types) if ty == "good"]
    if good:
        picks.append(sorted(good, key=lambda i: scores[i])[len(good) // 2])
    return picks


# Reference figures in a data set's README: a row or line names its method, then gives image AUROC /
# pixel AUROC / AUPRO in percent (or an image AUROC alone, for sets without masks).
_TRIPLE = re.compile(r"(\d+\.\d+) / (\d+\.\d+) / (\d+\.\d+)|image AUROC (\d+\.\d+)")
REFERENCES = {"anomalib PaDiM": ("anomalib", "padim"), "cflow-ad before": ("cflow-ad defaults",)}


def _figures(match: re.Match) -> dict[str, float | None]:
    if match.group(4) is not None:
        return {"image_auroc": float(match.group(4)) / 100, "pixel_auroc": None, "aupro": None}
    return {k: float(match.group(i)) / 100 for i, k in enumerate(METRICS, 1)}


def _reference_name(label: str) -> str | None:
    label = label.lower()
    return next((name for name, words in REFERENCES.items() if all(w in label for w in words)), None)


def readme_references(text: str, category: str) -> dict[str, dict[str, float | None]]:
    """The reference figures of `category` in a README (as fractions), by `REFERENCES` name: from a
    markdown table with a column named after the category, else from prose, where each figure is
    labelled by the words before it back to the previous ';', ':' or list item."""
    found: dict[str, dict] = {}
    lines, prose = text.splitlines(), []
    header = None
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            header = None
            prose.append(line)
        elif header is None:
            header = cells
        elif category in header and len(cells) == len(header):
            match, name = _TRIPLE.search(cells[header.index(category)]), _reference_name(cells[0])
            if match and name:
                found.setdefault(name, _figures(match))
    flat = re.sub(r"\s+", " ", re.sub(r"\n\s*[-*] ", " ; ", "\n".join(prose)))
    start = 0
    for match in _TRIPLE.finditer(flat):
        label = re.split(r"[;:]", flat[start:match.start()].rstrip(" :"))[-1]
        start = match.end()
        name = _reference_name(label)
        if name:
            found.setdefault(name, _figures(match))
    return found


def references(cat: Category) -> dict[str, dict[str, float | None]]:
    """The reference figures in the README beside a category (its own folder's, else its root's)."""
    for readme in (cat.root / cat.category / "README.md", cat.root / "README.md"):
        if readme.is_file():
            return readme_references(readme.read_text(errors="replace"), cat.category)
    return {}


def suite(base: CFlowConfig, data: Path | Sequence[Path], chosen_categories: Sequence[str] | None, output: Path,
          seeds: Sequence[int] = (0,), progress: bool = False, log: Callable[[str], None] = print,
          compute: dict | None = None) -> dict:
    """One config (its method) on every category under `data`, trained as `cflow-ad train` trains it
    (calibration images held out), per seed; beside each, the reference figures of its README. The mean
    over the categories is what a default is judged on (pixel metrics: over those with masks)."""
    rows = []
    for cat in categories(data, chosen_categories):
        runs = [run_once(base.replace(seed=s), cat.root, cat.category, output, progress, log, compute, paper=False,
                         name=cat.name) for s in seeds]
        rows.append({"category": cat.name, "runs": runs, "references": references(cat),
                     **{k: _mean([r[k] for r in runs]) for k in METRICS},
                     "train_seconds": statistics.mean(r["train_seconds"] for r in runs)})
    mean = {k: _mean([r[k] for r in rows]) for k in METRICS}
    ref_names = list(REFERENCES)
    ref_mean = {n: {k: _mean([r["references"].get(n, {}).get(k) for r in rows]) for k in METRICS} for n in ref_names}

    def cell(values: dict) -> str:
        return " / ".join(_pct([values.get(k)]) for k in METRICS)

    def delta(row: dict, ref: dict) -> str:
        return " / ".join("n/a" if row[k] is None or ref.get(k) is None else f"{100 * (row[k] - ref[k]):+.1f}"
                          for k in METRICS)

    bar = ref_names[0]
    lines = [f"Config: {_describe(base)}, {base.method}; trained as `cflow-ad train` (calibration hold-out"
             f" {base.calibration_fraction:g}); seeds {', '.join(map(str, seeds))} (mean). Figures: image AUROC /"
             " pixel AUROC / AUPRO (%); references from each set's README.", "",
             f"| set | this config | training s | {' | '.join(f'{n} (README)' for n in ref_names)} | vs {bar} |",
             "|---" * (4 + len(ref_names)) + "|"]
    for r in rows:
        refs = [cell(r["references"][n]) if n in r["references"] else "n/a" for n in ref_names]
        lines.append(f"| {r['category']} | {cell(r)} | {r['train_seconds']:.0f} | {' | '.join(refs)}"
                     f" | {delta(r, r['references'].get(bar, {}))} |")
    lines.append(f"| **mean** | **{cell(mean)}** | {sum(r['train_seconds'] for r in rows):.0f} (sum) | "
                 + " | ".join(cell(ref_mean[n]) for n in ref_names) + " | |")
    lines += ["", "Means over the sets that have each figure: a reference's mean can cover fewer sets than the"
              " config's."]
    return _write(output, "suite", "\n".join(lines) + "\n",
                  {"base": json.loads(base.to_json()), "seeds": list(seeds), "rows": rows, "mean": mean,
                   "reference_means": ref_mean})
