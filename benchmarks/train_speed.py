"""Training speed, in one process on the same images: per fiber batch size, or per epoch on a device.

Fiber-batch comparison (the default): times one training epoch over the first `--images` (64)
training images of a category for each fiber batch N (after a short warm-up), repeats, and prints
the median seconds per image and the relative speed, so that variants are compared as ratios in
one run.

    python benchmarks/train_speed.py --fiber-batches 256 1024 8192 --images 64 --repeats 3

Seconds per epoch (with --device, and no --fiber-batches): trains each `--configs` entry on the
first `--images` (300) training images on that device, once per precision, and prints the one-off
part outside the epochs (the first encoder pass, which also fits the whitening, and the final
calibration), the first
epoch and the median of the later ones. `default` is this project's default configuration;
`wrn50-paper` is the paper's WRN50 model and training batch (taps 4/8/16 as PaDiM, 8 couplings, no
whitening, +-5 degree rotation, so the encoder runs every epoch; encoder batch 32, 8,192 fibers a step), with
random encoder weights when no ImageNet weights are installed (speed does not depend on them).

    python benchmarks/train_speed.py --device cuda --precisions fp32 bf16/bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from cflow_ad.config import CFlowConfig
from cflow_ad.device import Compute, set_threads, synchronize
from cflow_ad.encoder import packaged_weights_path
from cflow_ad.model import CFlowModel
from cflow_ad.source import DataSource
from cflow_ad.training import fit

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
CONFIGS = {
    "default": CFlowConfig(),
    "wrn50-paper": CFlowConfig(encoder="wide_resnet50_2", pool_layers=3, last_stride=16, coupling_layers=8,
                               condition_dim=128, whitening="none", rotation=5.0, batch_size=32, fiber_batch=8192),
}


def fiber_batches(args: argparse.Namespace, subset: Subset) -> None:
    times: dict[int, list[float]] = {n: [] for n in args.fiber_batches}
    compute = Compute(args.device or "auto", workers=args.workers)
    for rep in range(args.repeats + 1):  # the first round warms caches and is discarded
        for n in args.fiber_batches:
            model = CFlowModel(CFlowConfig(fiber_batch=n, epochs=1, sub_epochs=1, min_steps=0))
            history = fit(model, subset, progress=False, log=lambda m: None, compute=compute)
            if rep:
                times[n].append(history["epoch_seconds"][0] / len(subset))
    base = statistics.median(times[args.fiber_batches[0]])
    cfg = CFlowConfig()
    print(f"\n{len(subset)} images, {cfg.image_size[0]} px, {cfg.encoder} taps {'/'.join(map(str, cfg.strides))},"
          f" {cfg.coupling_layers} couplings; median of {args.repeats}")
    print("| fiber batch N | s / image / epoch | speed vs N=%d |" % args.fiber_batches[0])
    print("|---|---|---|")
    for n in args.fiber_batches:
        med = statistics.median(times[n])
        print(f"| {n} | {med:.3f} | {base / med:.2f}x |")


def epochs(args: argparse.Namespace, root: Path) -> None:
    rows = []
    for name in args.configs:
        cfg = CONFIGS[name].replace(epochs=1, sub_epochs=args.epochs, min_steps=0)  # exactly --epochs
        pretrained = packaged_weights_path(cfg.encoder) is not None
        full = DataSource(root, args.category).open("train", cfg.image_size)
        subset = Subset(full, range(min(args.images, len(full))))
        for precision in args.precisions:
            encoder_p, _, flows_p = precision.partition("/")
            compute = Compute(args.device, encoder_p, args.workers, flow_precision=flows_p or "fp32")
            model = CFlowModel(cfg, pretrained=pretrained)
            t0 = time.perf_counter()
            history = fit(model, subset, progress=False, log=lambda m: None, compute=compute)
            synchronize(compute.torch_device)
            total = time.perf_counter() - t0
            sec = history["epoch_seconds"]
            rows.append((name, "ImageNet" if pretrained else "random", precision, len(subset), total - sum(sec),
                         sec[0], statistics.median(sec[1:] or sec), history["skipped_steps"]))
            del model
    print(f"\nSeconds per training epoch on {Compute(args.device).describe().rsplit(', ', 1)[0]}, {args.category}"
          f" ({args.images} images max), {args.epochs} epochs per run")
    print("| config | encoder weights | precision | images | outside the epochs s | epoch 1 s"
          " | later epochs s (median) | s / image / epoch | skipped steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, weights, precision, n, once, first, later, skipped in rows:
        print(f"| {name} | {weights} | {precision} | {n} | {once:.2f} | {first:.2f} | {later:.2f} | {later / n:.4f}"
              f" | {skipped} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="MVTec-layout root")
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--fiber-batches", type=int, nargs="+",
                   help="compare these fiber batch sizes (default without --device: 256 1024 8192)")
    p.add_argument("--images", type=int, help="first N training images (default: 64 per fiber batch, 300 per epoch)")
    p.add_argument("--repeats", type=int, default=3, help="fiber-batch comparison: timed rounds")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 2 for the fiber-batch comparison, else"
                   " the cores available)")
    p.add_argument("--device", help="cuda, cuda:N, cpu or mps: seconds per epoch there (default: auto, fiber batches)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--precisions", nargs="+", default=["fp32"], metavar="ENCODER[/FLOWS]",
                   help="per-epoch timing: the encoder's precision, and after a slash the flows' (fp32 without one)")
    p.add_argument("--epochs", type=int, default=3, help="per-epoch timing: epochs per run (the first one warms up)")
    p.add_argument("--workers", type=int, help="image-decoding worker processes (default: the package's)")
    args = p.parse_args()
    if args.device and not args.fiber_batches:
        set_threads(args.threads)
        args.images = args.images or 300
        epochs(args, args.data)
        return
    torch.set_num_threads(args.threads or 2)
    args.fiber_batches = args.fiber_batches or [256, 1024, 8192]
    full = DataSource(args.data, args.category).open("train", CFlowConfig().image_size)
    fiber_batches(args, Subset(full, range(min(args.images or 64, len(full)))))


if __name__ == "__main__":
    main()
