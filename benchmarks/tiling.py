"""Small defects in large images: squashed to 64 px, the whole 256 px image, and 256 px in tiles.

The set (`data.make_fine_defect_mvtec`) has 16 x 16 px checkerboard defects that a 4x downscale
averages away. Each row trains and tests the same small CFLOW-AD config (the test suite's) with
one input geometry; prints a Markdown table.

    python benchmarks/tiling.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cflow_ad import api
from cflow_ad.config import CFlowConfig
from cflow_ad.data import make_fine_defect_mvtec
from cflow_ad.source import DataSource

BASE = CFlowConfig(pool_layers=2, last_stride=16, coupling_layers=2, condition_dim=16, epochs=1, sub_epochs=1,
                   batch_size=8, fiber_batch=1024, calibration_fraction=0.0)
ROWS = {
    "squashed to 64 px": {"image_size": 64},
    "whole image, 256 px": {"image_size": 256},
    "256 px in 128 px tiles, overlap 32": {"image_size": 256, "tile": 128, "tile_overlap": 32},
    "256 px in 64 px tiles, overlap 32": {"image_size": 256, "tile": 64, "tile_overlap": 32},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| input | image AUROC | pixel AUROC | AUPRO | train s | test s |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        source = DataSource(make_fine_defect_mvtec(Path(tmp) / "data"), "fine")
        for name, changes in ROWS.items():
            t0 = time.perf_counter()
            path = api.train(BASE.replace(**changes), Path(tmp) / name, source, progress=False, log=lambda m: None)
            train_s = time.perf_counter() - t0
            m = api.test(path, None, source, progress=False)
            print(f"| {name} | {100 * m['image_auroc']:.1f} | {100 * m['pixel_auroc']:.1f} | {100 * m['aupro']:.1f}"
                  f" | {train_s:.1f} | {m['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
