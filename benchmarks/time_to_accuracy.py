"""Seconds per epoch and time to accuracy of the default training on an MVTec-layout category.

Trains the default CFlowConfig once and, after every epoch (outside the timed training),
tests the model on the test split with `paper` normalisation (self-contained, so no
calibration is needed mid-training). Prints accuracy against cumulative training time
(the one-off encoder pass included) and the time at which pixel AUROC first comes within
0.5 points of its final value. The evaluations never feed back into training.

    python benchmarks/time_to_accuracy.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cflow_ad import api
from cflow_ad.config import CFlowConfig
from cflow_ad.model import CFlowModel
from cflow_ad.source import DataSource
from cflow_ad.training import fit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = CFlowConfig()
    train_set = DataSource(args.data, args.category).open("train", cfg.image_size)
    model = CFlowModel(cfg)
    rows, paused = [], 0.0
    t0 = time.perf_counter()

    def on_epoch(epoch: int, m: CFlowModel) -> None:
        nonlocal paused
        start = time.perf_counter()
        metrics = api.test(m, None, source=DataSource(args.data, args.category), normalization="paper", progress=False)
        rows.append({"epoch": epoch, "train_s": round(start - t0 - paused, 1), "image_auroc": metrics["image_auroc"],
                     "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"]})
        print(json.dumps(rows[-1]), flush=True)
        paused += time.perf_counter() - start

    history = fit(model, train_set, progress=False, log=lambda m: None, on_epoch=on_epoch)
    final = rows[-1]["pixel_auroc"]
    reached = next(r for r in rows if r["pixel_auroc"] >= final - 0.005)
    print(f"\n{args.category}, default config ({cfg.epochs} x {cfg.sub_epochs} epochs, fiber batch {cfg.fiber_batch}), "
          f"{args.threads} threads; metrics with paper normalisation")
    print("| epoch | s/epoch | training s so far | image AUROC | pixel AUROC | AUPRO |\n|---|---|---|---|---|---|")
    for r, s in zip(rows, history["epoch_seconds"]):
        print(f"| {r['epoch']} | {s:.1f} | {r['train_s']:.0f} | {100 * r['image_auroc']:.1f} | {100 * r['pixel_auroc']:.1f} "
              f"| {100 * r['aupro']:.1f} |")
    print(f"\npixel AUROC within 0.5 points of its final {100 * final:.1f} after epoch {reached['epoch']}: "
          f"{reached['train_s']:.0f} s of training (encoder pass included)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "epoch_seconds": history["epoch_seconds"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
