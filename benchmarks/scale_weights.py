"""Issue 14's lever "how the scales are combined", on trained CFLOW-AD models, without retraining.

Eq. 8 adds the scales' probabilities exp(l_k - ref_k): a pixel scores high only when every scale
finds it unlikely (a soft minimum over scales of the deficit). A defect that only one scale sees,
such as a broad, low-contrast one that only the coarse scale resolves, is outvoted. The variants
below combine the scales' per-dimension log-likelihood maps l_k in other ways, each with constants
fixed on the calibration hold-out of train/good (the images the model was not trained on and that
`cflow-ad train` calibrates its thresholds with; `--stats-from train`: on the images it was trained
on), never on the test set:

- `eq8`: the default, log(offset) - log S (Eq. 8 in log space);
- `scale k`: one scale alone, -l_k;
- `z-sum` / `z-max` / `z-eq8`: each scale first standardised to z_k = (mu_k - l_k) / sd_k with the
  hold-out's mean and spread of l_k, then summed, maximised, or combined as Eq. 8 does
  (-log sum_k exp(-z_k));
- `zloc-sum` / `zloc-max`: the same with mean and spread per location (the hold-out's images at
  each place of each scale's map);
- `raw-sum`: sum_k (ref_k - l_k), Eq. 8's limit at a high temperature.

With `--pair-models` (a second encoder's checkpoints, one per model, same seeds) it also measures
two encoders side by side. Each scale's flow is trained on its own (the loss is a sum over scales),
so two models trained apart are exactly a model with both encoders' taps:

- `pair eq8`: Eq. 8 over the scales of both models (each with its own ref_k);
- `pair mean`: the mean of the two models' Eq. 8 maps (a two-model ensemble);
- `pair only`: the second model alone, for reference.

Maps are upsampled bilinearly as Eq. 8 does and restored to each image's geometry as `cflow-ad test`
does; the image score is the map's maximum. Prints one row per variant per model and the mean over
the models (seeds), with the uneven defects' pixel AUROC, where the default is weakest. The rows
"A map, B score" keep A's map (and its pixel metrics) and score each image by B's maximum.

    python benchmarks/scale_weights.py --models runs/mt_s0/model.safetensors runs/mt_s1/model.safetensors
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from score_levers import model_parser  # benchmarks/ is on the path when a script there runs

from cflow_ad import api
from cflow_ad import data as D
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.device import Compute
from cflow_ad.geometry import restore
from cflow_ad.metrics import image_auroc
from cflow_ad.scoring import log_probability_sum
from cflow_ad.source import DataSource

# (map, image score): the pixel metrics of one variant with the image scores of another
HYBRIDS = [("eq8", "zloc-max"), ("eq8", "zloc-sum"), ("eq8", "scale 1"), ("pair eq8", "zloc-max")]
SD_FLOOR = 1e-3  # of the per-dimension log-likelihood: a place that never varies would divide by 0


def up(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]


@torch.no_grad()
def log_maps(model, dataset, compute: Compute) -> list[tuple[list[torch.Tensor], dict]]:
    """Per-scale log maps [B, h_k, w_k] and the metadata of every batch of `dataset`."""
    out = []
    for batch in D.checked(D.image_loader(dataset, compute, model.config.batch_size)):
        out.append((model.log_density_maps(model.features(batch["image"])), batch))
    return out


def variants(model, held_out: list[list[torch.Tensor]]) -> dict:
    """Each variant as a function of (per-scale log maps, output size) -> anomaly map, its constants
    fixed from the hold-out's log maps."""
    refs = model.ref_log_density
    scales = range(len(refs))
    per_scale = [torch.cat([logs[k] for logs in held_out]) for k in scales]  # [N, h_k, w_k]
    mu = [p.mean() for p in per_scale]
    sd = [p.std().clamp_min(SD_FLOOR) for p in per_scale]
    mu_loc = [p.mean(0) for p in per_scale]
    sd_loc = [p.std(0).clamp_min(SD_FLOOR) for p in per_scale]

    def z(logs, size, loc):
        m, s = (mu_loc, sd_loc) if loc else (mu, sd)
        return [up((m[k] - logs[k]) / s[k], size) for k in scales]

    out = {"eq8": lambda logs, size: -log_probability_sum(logs, refs, size)}
    for k in scales:
        out[f"scale {k}"] = lambda logs, size, k=k: -up(logs[k], size)
    out["z-sum"] = lambda logs, size: sum(z(logs, size, False))
    out["z-max"] = lambda logs, size: torch.stack(z(logs, size, False)).amax(0)
    out["z-eq8"] = lambda logs, size: -log_probability_sum([(lm - m) / s for lm, m, s in zip(logs, mu, sd)],
                                                           torch.zeros(len(refs)), size)
    out["zloc-sum"] = lambda logs, size: sum(z(logs, size, True))
    out["zloc-max"] = lambda logs, size: torch.stack(z(logs, size, True)).amax(0)
    out["raw-sum"] = lambda logs, size: sum(up(refs[k] - logs[k], size) for k in scales)
    return out


def pair_variants(model, second) -> dict:
    """Variants of (log maps of `model`, log maps of `second`, size) -> anomaly map."""
    refs = torch.cat([model.ref_log_density, second.ref_log_density])

    def eq8(logs, size, r):
        return -log_probability_sum(logs, r, size)

    return {"pair eq8": lambda a, b, size: eq8(a + b, size, refs),
            "pair mean": lambda a, b, size: (eq8(a, size, model.ref_log_density)
                                             + eq8(b, size, second.ref_log_density)) / 2,
            "pair only": lambda a, b, size: eq8(b, size, second.ref_log_density)}


def evaluate(path: Path, source: DataSource, pair: Path | None = None, stats_from: str = "held-out") -> list[dict]:
    model = load_checkpoint(path).eval()
    cfg = model.config
    compute = Compute("cpu")
    trained_on, held_out = D.split_train_val(source.open("train", cfg), cfg.calibration_fraction, cfg.seed)
    fit_on = held_out if stats_from == "held-out" else trained_on
    funcs = variants(model, [logs for logs, _ in log_maps(model, fit_on, compute)])
    test = log_maps(model, source.open("test", cfg), compute)
    pairs, seconds = {}, [None] * len(test)
    if pair is not None:
        second = load_checkpoint(pair).eval()
        if second.image_size != model.image_size or second.config.batch_size != cfg.batch_size:
            raise SystemExit(f"{pair} differs from {path} in image size or batch size: they cannot be paired")
        pairs = pair_variants(model, second)
        seconds = [logs for logs, _ in log_maps(second, source.open("test", second.config), compute)]
    evals = {name: api._evaluation(model, "log", memory_mb=8192) for name in [*funcs, *pairs]}
    scores: dict[str, list[float]] = {name: [] for name in evals}
    labels_all: list[int] = []
    for (logs, batch), other in zip(test, seconds):
        masks, has_mask = (batch["mask"][:, 0] > 0.5).numpy(), batch["has_mask"].numpy()
        labels, types = [int(v) for v in batch["label"]], list(batch["defect_type"])
        labels_all += labels
        for name, ev in evals.items():
            m = funcs[name](logs, model.image_size) if name in funcs else pairs[name](logs, other, model.image_size)
            maps, top = restore(m.numpy(), m.flatten(1).amax(1).numpy(), batch["box"].numpy())
            ev.add(labels, top, masks, maps, types, has_mask)
            scores[name] += top.tolist()
    rows = []
    results = {name: e.result() for name, e in evals.items()}
    for name, r in results.items():
        rows.append({"model": str(path), "seed": cfg.seed, "variant": name, "image_auroc": r["image_auroc"],
                     "pixel_auroc": r["pixel_auroc"], "aupro": r["aupro"],
                     "uneven_pixel_auroc": r["per_type"].get("uneven", {}).get("pixel_auroc", float("nan"))})
    for map_name, score_name in HYBRIDS:
        if map_name in results and score_name in results:
            rows.append({**next(r for r in rows if r["variant"] == map_name),
                         "variant": f"{map_name} map, {score_name} score",
                         "image_auroc": image_auroc(labels_all, scores[score_name])})
    return rows


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--pair-models", type=Path, nargs="+", help="a second encoder's checkpoints, one per --models entry")
    p.add_argument("--stats-from", choices=("held-out", "train"), default="held-out",
                   help="fit the variants' constants on the calibration hold-out or on the images the model was trained on")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pairs = args.pair_models or [None] * len(args.models)
    if len(pairs) != len(args.models):
        raise SystemExit("--pair-models needs one checkpoint per --models entry")
    rows = []
    for path, pair in zip(args.models, pairs):
        new = evaluate(path, DataSource(args.data, args.category), pair, args.stats_from)
        for r in new:
            print(json.dumps(r), flush=True)
        rows += new
    order = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"\nMean over {len(args.models)} model(s), seeds {sorted({r['seed'] for r in rows})}:\n")
    print("| combination | image AUROC | pixel AUROC | AUPRO | uneven pixel AUROC |")
    print("|---|---|---|---|---|")
    for name, group in itertools.groupby(sorted(rows, key=lambda r: order.index(r["variant"])), key=lambda r: r["variant"]):
        g = list(group)
        mean = {m: 100 * statistics.mean(r[m] for r in g)
                for m in ("image_auroc", "pixel_auroc", "aupro", "uneven_pixel_auroc")}
        print(f"| {name} | {mean['image_auroc']:.1f} | {mean['pixel_auroc']:.1f} | {mean['aupro']:.1f} "
              f"| {mean['uneven_pixel_auroc']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
