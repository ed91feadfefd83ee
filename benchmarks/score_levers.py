"""Issue 14's score-time levers on trained models: test-time flips, a blur of the map, top-k image scores.

None of these needs retraining, so each trained model is scored once per flip and every
combination is evaluated from the same maps, exactly as `cflow-ad test` computes its metrics
(restored maps, the model's own normalisation). Flips average the anomaly maps of the image and
its mirror images, each flipped back. Blur is a Gaussian of sigma pixels on the final map, as
the baselines use. Top-k scores the image by the mean of its k highest pixels instead of the
maximum. Prints one row per lever per model and the mean over the models (seeds).

    python benchmarks/score_levers.py --models runs/compare/runs/magnetic_tile/cflow-seed*/model.safetensors
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from cflow_ad import api
from cflow_ad import data as D
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.device import Compute
from cflow_ad.geometry import restore
from cflow_ad.metrics import image_auroc
from cflow_ad.scoring import gaussian_blur
from cflow_ad.source import DataSource

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
FLIPS = {"none": [()], "h": [(), (-1,)], "hv": [(), (-1,), (-2,), (-2, -1)]}
BLURS = [0.0, 4.0]  # --blurs
TOPK = (None, 0.001, 0.01)  # None: the map's maximum; else the mean of that fraction of the pixels


def image_scores(maps: torch.Tensor, fraction: float | None) -> torch.Tensor:
    flat = maps.flatten(1)
    if fraction is None:
        return flat.amax(1)
    k = max(1, round(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


@torch.no_grad()
def evaluate(path: Path, source: DataSource, mode: str | None, flips: list[str]) -> list[dict]:
    model = load_checkpoint(path).eval()
    mode = mode or model.config.normalization
    if mode == "paper":
        raise SystemExit("paper normalisation scores a whole set at once: pass --normalization log or stateless")
    compute = Compute("cpu")
    loader = D.image_loader(source.open("test", model.config), compute, model.config.batch_size)
    combos = list(itertools.product(flips, BLURS))
    passes = sorted({d for name in flips for d in FLIPS[name]}, key=len)
    evals = {c: api._evaluation(model, mode, memory_mb=8192) for c in combos}
    scores = {(f, b, k): [] for f, b in combos for k in TOPK}
    labels: list[int] = []
    seconds = dict.fromkeys(flips, 0.0)
    for batch in D.checked(loader):
        x, boxes = batch["image"], batch["box"]
        masks, has_mask = batch["mask"][:, 0] > 0.5, batch["has_mask"].numpy()
        batch_labels, types = [int(v) for v in batch["label"]], list(batch["defect_type"])
        labels += batch_labels
        one = {}
        for dims in passes:
            t0 = time.perf_counter()
            m, _ = model(x.flip(dims) if dims else x, mode)
            one[dims] = (m.flip(dims) if dims else m, time.perf_counter() - t0)
        for name in flips:
            members = FLIPS[name]
            seconds[name] += sum(one[d][1] for d in members)
            mean = torch.stack([one[d][0] for d in members]).mean(0)
            for blur in BLURS:
                maps = gaussian_blur(mean[:, None], blur)[:, 0] if blur else mean
                maps, top = map(torch.from_numpy, restore(maps.numpy(), maps.flatten(1).amax(1).numpy(), boxes.numpy()))
                evals[name, blur].add(batch_labels, top.numpy(), masks.numpy(), maps.numpy(), types, has_mask)
                for k in TOPK:
                    scores[name, blur, k] += image_scores(maps, k).tolist()
    rows = []
    for name, blur in combos:
        r = evals[name, blur].result()
        for k in TOPK:
            rows.append({"model": str(path), "seed": model.config.seed, "flips": name, "blur": blur,
                         "score": "max" if k is None else f"top {100 * k:g}%",
                         "image_auroc": image_auroc(labels, scores[name, blur, k]),
                         "pixel_auroc": r["pixel_auroc"], "aupro": r["aupro"],
                         "s_per_image": seconds[name] / len(labels)})
    return rows


def model_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark that rescores trained models: --models, --data, --category, --threads, --json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, nargs="+", required=True, help="trained CFLOW checkpoints (one per seed)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--normalization", help="default: each checkpoint's own")
    p.add_argument("--flips", nargs="+", choices=list(FLIPS), default=list(FLIPS),
                   help="test-time flip sets to measure (each flip is one more pass of the model)")
    p.add_argument("--blurs", nargs="+", type=float, default=BLURS, help="Gaussian sigmas (px) of the map to measure")
    args = p.parse_args()
    BLURS[:] = args.blurs
    torch.set_num_threads(args.threads)
    rows = []
    for path in args.models:
        rows += evaluate(path, DataSource(args.data, args.category), args.normalization, args.flips)
        for r in rows[-len(args.flips) * len(BLURS) * len(TOPK):]:
            print(json.dumps(r), flush=True)
    print(f"\nMean over {len(args.models)} model(s), seeds {sorted({r['seed'] for r in rows})}:\n")
    print("| flips | blur | image score | image AUROC | pixel AUROC | AUPRO | model s/image |")
    print("|---|---|---|---|---|---|---|")
    for key, group in itertools.groupby(sorted(rows, key=lambda r: (list(FLIPS).index(r["flips"]), r["blur"], r["score"])),
                                        key=lambda r: (r["flips"], r["blur"], r["score"])):
        g = list(group)
        mean = {m: 100 * statistics.mean(r[m] for r in g) for m in ("image_auroc", "pixel_auroc", "aupro")}
        print(f"| {key[0]} | {key[1]:g} | {key[2]} | {mean['image_auroc']:.1f} | {mean['pixel_auroc']:.1f} "
              f"| {mean['aupro']:.1f} | {statistics.median(r['s_per_image'] for r in g):.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
