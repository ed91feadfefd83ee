"""int8 decoders against fp32 on a real test set: the three metrics and the test pass's time, one run.

The same checkpoint is scored three ways: PyTorch (fp32), onnxruntime fp32 and onnxruntime with int8
decoder products (`cflow-ad test --runtime onnx [--quantize int8]`); the last column is the change
against onnxruntime fp32. Throughput without image decoding is benchmarks/speed.py's `cflow_int8` rows.

    python benchmarks/int8.py --model runs/mt/model.safetensors --data ../shared/data/magnetic_tile --category magnetic_tile
"""

from __future__ import annotations

import argparse
import json

from cflow_ad import api
from cflow_ad.source import DataSource

KEYS = ("image_auroc", "pixel_auroc", "aupro")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a CFLOW-AD checkpoint trained with input ranges recorded")
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    source = DataSource(args.data, args.category)
    runs = {"torch fp32": {}, "onnx fp32": {"runtime": "onnx"}, "onnx int8": {"runtime": "onnx", "quantize": "int8"}}
    figures = {name: api.test(args.model, None, source, progress=False, **kw) for name, kw in runs.items()}
    print("| run | image AUROC | pixel AUROC | AUPRO | test s | change against onnx fp32 (points) |")
    print("|---|---|---|---|---|---|")
    base = figures["onnx fp32"]
    for name, m in figures.items():
        delta = " / ".join(f"{100 * (m[k] - base[k]):+.2f}" for k in KEYS)
        print(f"| {name} | " + " | ".join(f"{100 * m[k]:.2f}" for k in KEYS) + f" | {m['seconds']:.1f} | {delta} |")
    worst = max(100 * (base[k] - figures["onnx int8"][k]) for k in KEYS)
    print(f"\nint8 loses at most {worst:.2f} points ({'within' if worst <= 0.2 else 'beyond'} the 0.2-point bar)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({name: {k: m[k] for k in (*KEYS, "seconds")} for name, m in figures.items()}, f, indent=2)


if __name__ == "__main__":
    main()
