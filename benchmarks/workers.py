"""`cflow-ad test` and `cflow-ad predict` with 0 and N image-decoding workers, same model, same images.

Each repeat runs every worker count once, alternating, as a fresh `cflow-ad` process (the wall time
a user sees, imports and loader start included), and the table gives the median wall time and the
speed-up over 0 workers. The outputs must be identical: metrics.json (its timing fields aside) and
scores.csv for test, predictions.csv for predict; the script exits non-zero otherwise.

    python benchmarks/workers.py --model runs/mt/model.safetensors --workers 0 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"
CPU_FLAGS = ("avx2", "avx512_vnni", "avx512_bf16", "amx_int8")


def cpu_flags() -> str:
    """The CPU's vector extensions that matter for speed (the machine changes between sessions)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(f for f in CPU_FLAGS if f in words) or "none of " + ", ".join(CPU_FLAGS)


def _run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cflow_ad", "--quiet", *argv], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def _outputs(folder: Path, command: str) -> str:
    """What must not depend on the worker count: the results, less their timings and paths."""
    if command == "test":
        metrics = json.loads((folder / "metrics.json").read_text())
        metrics.pop("seconds")
        return json.dumps(metrics, sort_keys=True) + (folder / "scores.csv").read_text()
    return (folder / "predictions.csv").read_text().replace(str(folder), "OUT")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by 'cflow-ad train'")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    images = args.data / args.category / "test"
    times: dict[tuple[str, int], list[float]] = {}
    outputs: dict[tuple[str, int], str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for command in ("test", "predict"):
                for w in args.workers:
                    out = Path(tmp) / f"{command}{w}"
                    common = ["--output", str(out), "--device", args.device, "--workers", str(w)]
                    argv = (["test", "--model", str(args.model), "--data", str(args.data), "--category", args.category]
                            if command == "test" else
                            ["predict", "--model", str(args.model), str(images)])  # every output, as by default
                    times.setdefault((command, w), []).append(_run(argv + common))
                    outputs[(command, w)] = _outputs(out, command)
    print(f"\n{images}: {sum(1 for _ in images.rglob('*.png'))} images; device {args.device}; CPU flags: {cpu_flags()};"
          f" median of {args.repeats}")
    print("| command | workers | wall s | speed-up vs 0 | outputs equal to 0 workers |")
    print("|---|---|---|---|---|")
    same = True
    for command in ("test", "predict"):
        base = statistics.median(times[(command, args.workers[0])])
        for w in args.workers:
            med = statistics.median(times[(command, w)])
            equal = outputs[(command, w)] == outputs[(command, args.workers[0])]
            same &= equal
            print(f"| {command} | {w} | {med:.1f} | {base / med:.2f}x | {'yes' if equal else 'NO'} |")
    if not same:
        sys.exit("outputs differ between worker counts")


if __name__ == "__main__":
    main()
