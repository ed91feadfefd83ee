"""Defect regions on the development suite: false alarms on good test images, recall of ground-truth defects.

For each model a suite run stored (`cflow-ad experiment suite` or `benchmarks/suite_levers.py`), the
thresholds are set again as `cflow-ad train` sets them, on the same held-out good training images (so a
model trained before the region threshold existed gets one), and the test split is scored as `cflow-ad
test` scores it. Prints, and writes to OUTPUT, one row per set: the held-out count, the image false-positive
rate and recall, the share of good test images with any region (issue 32's bar: at most twice the target
rate), the region recall overall and per defect type.

    python benchmarks/regions.py --runs runs/levers_lw/base --output runs/regions.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cflow_ad import api, experiments
from cflow_ad import data as D
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.source import DataSource

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="a suite run's folder (holds runs/<set>/*/model.safetensors)")
    p.add_argument("--data", type=Path, default=DATA, help="development roots (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="markdown file for the table")
    args = p.parse_args()
    lines = ["| set | held-out good | image FPR / recall | region false alarms on test/good | region recall"
             " (defects found) | per type |", "|---|---|---|---|---|---|"]
    for cat in experiments.categories(args.data):
        found = sorted((args.runs / "runs" / cat.name).glob(f"*-seed{args.seed}-*/model.safetensors"))
        if not found:
            continue
        model = load_checkpoint(found[0]).eval()
        source = DataSource(cat.root, cat.category)
        _, held_out = D.split_train_val(source.open("train", model.config), model.config.calibration_fraction,
                                        model.config.seed)
        model.thresholds = api.calibrate_thresholds(model, held_out, model.config.target_fpr)
        r = api.test(model, None, source, progress=False)["at_threshold"]
        types = ", ".join(f"{t} {pct(v['region_recall'])}" for t, v in r["regions_per_type"].items() if t != "good")
        good = r["regions_per_type"].get("good", {"images": 0, "images_with_regions": 0})
        lines.append(f"| {cat.name} | {len(held_out)} | {pct(r['image_fpr'])} / {pct(r['image_recall'])} |"
                     f" {pct(r['region_false_alarm_rate'])} ({good['images_with_regions']} of {good['images']}) |"
                     f" {pct(r['region_recall'])} ({r['defects_found']} of {r['defects']}) | {types} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
