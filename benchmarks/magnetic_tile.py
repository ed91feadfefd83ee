"""Accuracy and training time of config variants on an MVTec-layout category.

Each variant is the default CFlowConfig with a few fields changed; all run in one
process, one after another, with the same data and threads, and are trained and
tested exactly as `cflow-ad train` / `cflow-ad test` do. Prints a Markdown table and
optionally writes the figures as JSON.

    python benchmarks/magnetic_tile.py --variants default n256 n8192 --epochs 1 --sub-epochs 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cflow_ad import api
from cflow_ad.checkpoint import read_metadata
from cflow_ad.config import CFlowConfig
from cflow_ad.source import DataSource

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"

# The decoder of the paper as the previous defaults ran it.
PAPER_DECODER = {"whitening": "none", "rotation": 5.0}

VARIANTS: dict[str, dict] = {
    "default": {},
    "pad32": {"border_pad": 32},
    "n256": {"fiber_batch": 256},
    "n2048": {"fiber_batch": 2048},
    "c64": {"condition_dim": 64},
    "n8192": {"fiber_batch": 8192},
    "logsigmoid": {"loss": "logsigmoid"},
    "strides-4-8-16": {"last_stride": 16},
    "4-scales": {"pool_layers": 4},
    "2-scales": {"pool_layers": 2},
    "512px": {"image_size": 512},
    "4-couplings": {"coupling_layers": 4},
    "4-couplings-c64": {"coupling_layers": 4, "condition_dim": 64},
    "uflow": {"conditional": False},
    "rotation5": {"rotation": 5.0},
    "no-whitening": {"whitening": "none"},
    "paper-decoder": PAPER_DECODER,
    "ridge-1e-4": {"whitening_eps": 1e-4},
    "ridge-0.1": {"whitening_eps": 0.1},
    "hard-permutation": {"permutation": "hard"},
    # issue 14's levers: aspect handling, encoder, resolution through tiles
    "keep-aspect": {"keep_aspect": True},
    "lite2": {"encoder": "efficientnet_lite2"},
    "lite2-keep-aspect": {"encoder": "efficientnet_lite2", "keep_aspect": True},
    "512-tiled": {"image_size": 512, "tile": 256, "tile_overlap": 32},
    "384px": {"image_size": 384},
    "lite2-384px": {"encoder": "efficientnet_lite2", "image_size": 384},
    "lite2-320px": {"encoder": "efficientnet_lite2", "image_size": 320},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    p.add_argument("--epochs", type=int, help="override meta-epochs for every variant")
    p.add_argument("--sub-epochs", type=int, help="override sub-epochs for every variant")
    p.add_argument("--paper-decoder", action="store_true",
                   help="start every variant from the paper's decoder (no whitening, +-5 degree rotation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    common = {"seed": args.seed, **(PAPER_DECODER if args.paper_decoder else {})}
    if args.epochs:
        common["epochs"] = args.epochs
    if args.sub_epochs:
        common["sub_epochs"] = args.sub_epochs
    rows = []
    for name in args.variants:
        cfg = CFlowConfig(**{**common, **VARIANTS[name]})
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            ckpt = api.train(cfg, tmp, source=DataSource(args.data, args.category), progress=False, log=lambda m: None)
            train_s = time.perf_counter() - t0
            history = read_metadata(ckpt)["extra"]["history"]
            m = api.test(ckpt, None, source=DataSource(args.data, args.category), progress=False)
        row = {
            "variant": name,
            "changes": {**common, **VARIANTS[name]},
            "image_auroc": m["image_auroc"],
            "pixel_auroc": m["pixel_auroc"],
            "aupro": m["aupro"],
            "train_s": round(train_s, 1),
            "s_per_epoch": round(sum(history["epoch_seconds"]) / len(history["epoch_seconds"]), 1),
            "final_loss": round(history["epoch_loss"][-1], 4),
            "test_s": m["seconds"],
            "per_type": {t: [v["image_auroc"], v["pixel_auroc"]] for t, v in m["per_type"].items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| variant | image AUROC | pixel AUROC | AUPRO | train s | s/epoch | final loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {100 * r['image_auroc']:.1f} | {100 * r['pixel_auroc']:.1f} | {100 * r['aupro']:.1f} "
            f"| {r['train_s']:.0f} | {r['s_per_epoch']:.0f} | {r['final_loss']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
