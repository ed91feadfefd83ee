"""Precision settings against fp32 on a real category: accuracy next to speed, one run.

A setting is the encoder's `--precision` (fp32, bf16; fp16 on a GPU), optionally with the flows'
`--flow-precision` after a slash: `bf16` is a bf16 encoder with fp32 flows, `fp32/bf16` fp32 features
into bf16 flow products, `bf16/bf16` both. The first setting is the reference (normally fp32).

Trains once per setting and tests every trained model in its own setting, plus the reference model in
each other setting (inference alone in reduced precision), recalibrated in it first on the test set's
good images, since a model runs only in the precisions its thresholds were fitted in (the table's
metrics do not depend on the thresholds). Each train and test is a fresh `cflow-ad` process; the table
gives wall times, the encoder pass, the mean seconds per epoch (decoder training) and the three metrics,
with the CPU flags that decide whether bf16 is fast here. Flags this script does not know go to every
`cflow-ad train`, e.g. the short schedule of quick comparisons:

    python benchmarks/precision.py --precisions fp32 bf16 --output runs/precision
    python benchmarks/precision.py --precisions fp32 fp32/bf16 bf16/bf16 --output runs/flow_precision \\
        --epochs 1 --sub-epochs 2
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
    """Seconds a fresh `cflow-ad` process takes for `argv`; its error lines and exit status if it fails."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "cflow_ad", "--quiet", *argv], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"cflow-ad {argv[0]} failed ({run.returncode}): {run.stderr.strip()}")
    return time.perf_counter() - t0


def _flags(setting: str) -> list[str]:
    """A setting (ENCODER or ENCODER/FLOWS) as `cflow-ad` flags."""
    encoder, _, flows = setting.partition("/")
    return ["--precision", encoder, "--flow-precision", flows or "fp32"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], metavar="ENCODER[/FLOWS]",
                   help="settings, the first the reference: encoder precision, flow precision after a slash")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, default=Path("runs/precision"))
    p.add_argument("--json", type=Path, help="also write the rows here")
    args, train_flags = p.parse_known_args()
    data = ["--data", str(args.data), "--category", args.category, "--device", args.device]
    reference = args.precisions[0]
    rows = []
    for trained in args.precisions:
        folder = args.output / trained.replace("/", "-")
        train_s = _cli(["train", *data, "--output", str(folder), *_flags(trained), *train_flags])
        history = json.loads(subprocess.run(
            [sys.executable, "-c", "import json,sys; from cflow_ad.checkpoint import read_metadata;"
             " print(json.dumps(read_metadata(sys.argv[1])['extra']['history']))", str(folder / "model.safetensors")],
            check=True, capture_output=True, text=True).stdout)
        epochs = history["epoch_seconds"]
        for tested in args.precisions if trained == reference else [trained]:
            out = folder / f"test_{tested.replace('/', '-')}"
            model = folder / "model.safetensors"
            if tested != trained:
                model = folder / f"model_{tested.replace('/', '-')}.safetensors"
                _cli(["calibrate", "--model", str(folder / "model.safetensors"), *data, "--output", str(model),
                      *_flags(tested)])
            test_s = _cli(["test", "--model", str(model), *data, "--output", str(out), *_flags(tested)])
            m = json.loads((out / "metrics.json").read_text())
            rows.append({"train": trained, "test": tested, "train_s": train_s, "encoder_pass_s":
                         history["train_seconds"] - sum(epochs), "epoch_s": sum(epochs) / len(epochs),
                         "test_s": test_s, "scoring_s": m["seconds"],
                         **{k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    schedule = " ".join(train_flags) or "none"
    print(f"\n{args.category}, default config, train flags: {schedule}; device {args.device}; CPU flags: {cpu_flags()}")
    print("settings: encoder precision / flow precision")
    print("| trained | tested | train wall s | encoder pass + calibration s | s/epoch | test wall s | scoring s"
          " | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = {k: r[k] if "/" in r[k] else f"{r[k]}/fp32" for k in ("train", "test")}
        print(f"| {name['train']} | {name['test']} | {r['train_s']:.0f} | {r['encoder_pass_s']:.1f} | {r['epoch_s']:.1f}"
              f" | {r['test_s']:.0f} | {r['scoring_s']:.1f} | {100 * r['image_auroc']:.2f}"
              f" | {100 * r['pixel_auroc']:.2f} | {100 * r['aupro']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
