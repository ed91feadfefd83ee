"""Training throughput per fiber batch size, in one process on the same images.

Times one training epoch over the first `--images` training images of a category for
each fiber batch N (after a short warm-up), repeats, and prints the median seconds per
image and the relative speed, so that variants are compared as ratios in one run.

    python benchmarks/train_speed.py --fiber-batches 256 1024 8192 --images 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from torch.utils.data import Subset

from cflow_ad.config import CFlowConfig
from cflow_ad.model import CFlowModel
from cflow_ad.source import DataSource
from cflow_ad.training import fit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--fiber-batches", type=int, nargs="+", default=[256, 1024, 8192])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    full = DataSource(args.data, args.category).open("train", CFlowConfig().image_size)
    subset = Subset(full, range(min(args.images, len(full))))
    times: dict[int, list[float]] = {n: [] for n in args.fiber_batches}
    for rep in range(args.repeats + 1):  # the first round warms caches and is discarded
        for n in args.fiber_batches:
            model = CFlowModel(CFlowConfig(fiber_batch=n, epochs=1, sub_epochs=1))
            history = fit(model, subset, progress=False, log=lambda m: None)
            if rep:
                times[n].append(history["epoch_seconds"][0] / len(subset))
    base = statistics.median(times[args.fiber_batches[0]])
    print(f"\n{len(subset)} images, 256 px, MobileNetV2 taps 8/16/32, 8 couplings; median of {args.repeats}")
    print("| fiber batch N | s / image / epoch | speed vs N=%d |" % args.fiber_batches[0])
    print("|---|---|---|")
    for n in args.fiber_batches:
        med = statistics.median(times[n])
        print(f"| {n} | {med:.3f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
