"""fp32 against bf16 (or fp16 on a GPU) on a real category: accuracy next to speed, one run.

Trains once per precision and tests every trained model at its own precision, plus the fp32 model
at each lower precision (inference alone in reduced precision), recalibrated in it first on the test
set's good images, since a model runs only in the precision its thresholds were fitted in (the table's
metrics do not depend on the thresholds). Each train and test is a fresh
`cflow-ad` process; the table gives wall times, the encoder pass, the mean seconds per epoch and the
three metrics, with the CPU flags that decide whether bf16 is fast here.

    python benchmarks/precision.py --precisions fp32 bf16 --output runs/precision
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from workers import DATA, cpu_flags


def _cli(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cflow_ad", "--quiet", *argv], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=Path("runs/precision"))
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    data = ["--data", str(args.data), "--category", args.category, "--device", args.device]
    rows = []
    for train_p in args.precisions:
        folder = args.output / train_p
        train_s = _cli(["train", *data, "--output", str(folder), "--precision", train_p])
        history = json.loads(subprocess.run(
            [sys.executable, "-c", "import json,sys; from cflow_ad.checkpoint import read_metadata;"
             " print(json.dumps(read_metadata(sys.argv[1])['extra']['history']))", str(folder / "model.safetensors")],
            check=True, capture_output=True, text=True).stdout)
        epochs = history["epoch_seconds"]
        for test_p in args.precisions if train_p == "fp32" else [train_p]:
            out = folder / f"test_{test_p}"
            model = folder / "model.safetensors"
            if test_p != train_p:
                model = folder / f"model_{test_p}.safetensors"
                _cli(["calibrate", "--model", str(folder / "model.safetensors"), *data, "--output", str(model),
                      "--precision", test_p])
            test_s = _cli(["test", "--model", str(model), *data, "--output", str(out), "--precision", test_p])
            m = json.loads((out / "metrics.json").read_text())
            rows.append({"train": train_p, "test": test_p, "train_s": train_s, "encoder_pass_s":
                         history["train_seconds"] - sum(epochs), "epoch_s": sum(epochs) / len(epochs),
                         "test_s": test_s, "scoring_s": m["seconds"],
                         **{k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\n{args.category}, default config, device {args.device}; CPU flags: {cpu_flags()}")
    print("| trained | tested | train wall s | encoder pass + calibration s | s/epoch | test wall s | scoring s"
          " | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['train']} | {r['test']} | {r['train_s']:.0f} | {r['encoder_pass_s']:.1f} | {r['epoch_s']:.1f}"
              f" | {r['test_s']:.0f} | {r['scoring_s']:.1f} | {100 * r['image_auroc']:.2f}"
              f" | {100 * r['pixel_auroc']:.2f} | {100 * r['aupro']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
