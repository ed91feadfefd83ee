"""Where an image's time goes on this CPU, each part timed alone in one process: decoding and resizing,
and the map step and whole forward in log space against Eq. 8.

These are the figures behind two defaults: no decoding workers on 2 cores (decoding is a small share of
an image's time) and the log-space map (what it costs). bf16 is `benchmarks/precision.py`.

    python benchmarks/cpu_costs.py --model runs/mt/model.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.scoring import anomaly_maps
from cflow_ad.source import DataSource
from workers import DATA, cpu_flags


def _median_ms(fn, repeats: int, per: int) -> float:
    """Median over `repeats` calls of `fn`, in ms per item (`per` items a call)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / per


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a cflow checkpoint written by 'cflow-ad train'")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--images", type=int, default=32, help="test images in the timed batch")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    model = load_checkpoint(args.model).eval()
    size = model.config.image_size
    rows = []
    for split in ("train", "test"):
        ds = DataSource(args.data, args.category).open(split, size)
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        rows.append((f"decode + resize, {split} ({len(ds)} images, once)", 1000 * (time.perf_counter() - t0) / len(ds)))
    test = DataSource(args.data, args.category).open("test", size)
    step = max(1, len(test) // args.images)
    x = torch.stack([test[i]["image"] for i in range(0, len(test), step)][: args.images])
    n = len(x)
    with torch.no_grad():
        logs = model.log_density_maps(model.features(x))
        refs, offset = model.ref_log_density, model.map_offset
        for mode in ("log", "stateless"):
            rows.append((f"map step, {mode}", _median_ms(
                lambda: anomaly_maps(logs, refs, offset, size, mode), args.repeats, n)))
        for mode in ("log", "stateless"):
            rows.append((f"whole forward, {mode}", _median_ms(lambda: model(x, mode), max(1, args.repeats // 2), n)))
    print(f"\n{args.model}, {size[0]}x{size[1]} px, 2 threads; CPU flags: {cpu_flags()}; median of {args.repeats}")
    print("| part | ms per image |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
