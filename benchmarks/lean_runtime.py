"""The lean runtime end to end: `pip install .` into a fresh venv (no PyTorch), then `predict` and
`serve` of an exported model there, against the full package in this interpreter.

    python benchmarks/lean_runtime.py --model runs/mt/model.onnx \
        --images ../shared/data/magnetic_tile/magnetic_tile/test

Prints the install size, start-up time of `serve` to its first /health answer, peak RSS (VmHWM)
after serving every image, and whether every verdict (label, score to 1e-4, mask area to 1%) equals
the full package's; exits non-zero on any difference or where `import torch` works in the venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import venv
from importlib import metadata
from pathlib import Path

import requests

from cflow_ad.data import list_images
from serve_load import rss_mb, start_server

REPO = Path(__file__).resolve().parents[1]


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def lean_venv(where: Path) -> tuple[str, float]:
    """A fresh venv with the README's lean install; returns its python and its size in MB."""
    venv.create(where, with_pip=True)
    python = str(where / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)], check=True)
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0:
        raise SystemExit("FAIL: torch imports in the lean venv")
    return python, du_mb(where)


def predict(python: str, model: Path, images: list[Path], out: Path) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    subprocess.run([python, "-m", "cflow_ad", "--quiet", "predict", "--model", str(model), *map(str, images),
                    "--output", str(out), "--no-overlays", "--no-heatmaps", "--runtime", "onnx"], check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "predictions.json").read_text())["predictions"], time.perf_counter() - t0


def serve(python: str, model: Path, files: list[Path], threads: int) -> tuple[list[dict], float, float | None]:
    t0 = time.perf_counter()
    proc, url = start_server(model, "onnx", threads, None, python=python)
    started = time.perf_counter() - t0
    try:
        answers = [requests.post(url + "/predict", files={"file": (f.name, f.read_bytes(), "image/png")},
                                 timeout=120).json() for f in files]
        peak = rss_mb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return answers, started, peak


def differences(a: list[dict], b: list[dict]) -> list[str]:
    out = [] if len(a) == len(b) else [f"{len(a)} verdicts against {len(b)}"]
    for x, y in zip(a, b):
        # a score on the threshold to float precision (calibration puts it on a good image) may go either way
        tie = abs(y["score"] - y["image_threshold"]) <= 1e-4 * abs(y["image_threshold"])
        same = ((x["label"] == y["label"] or tie) and abs(x["score"] - y["score"]) <= 1e-4 * max(1.0, abs(y["score"]))
                and abs(x["defect_area_px"] - y["defect_area_px"]) <= 0.01 * x["width"] * x["height"])
        if not same:
            out.append(f"{Path(x.get('path', x.get('file', '?'))).name}: {x['label']} {x['score']:.6g} "
                       f"{x['defect_area_px']} against {y['label']} {y['score']:.6g} {y['defect_area_px']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="an .onnx file written by 'cflow-ad export'")
    p.add_argument("--checkpoint", type=Path, help="the checkpoint it was exported from: the full install then "
                   "scores that with --runtime onnx (PyTorch loaded) instead of the same .onnx file")
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files or folders")
    p.add_argument("--serve-images", type=int, default=40, help="how many of them to upload to each server")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    files = list_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lean_python, size = lean_venv(tmp / "venv")
        lean_rows, lean_s = predict(lean_python, args.model, args.images, tmp / "lean")
        full_model = args.checkpoint or args.model
        full_rows, full_s = predict(sys.executable, full_model, args.images, tmp / "full")
        step = max(1, len(files) // args.serve_images)
        uploads = files[::step][: args.serve_images]
        lean_http, lean_start, lean_peak = serve(lean_python, args.model, uploads, args.threads)
        full_http, full_start, full_peak = serve(sys.executable, full_model, uploads, args.threads)
    checks = {"predict, lean = full": differences(lean_rows, full_rows),
              "serve, lean = full": differences(lean_http, full_http),
              "lean serve = lean predict": differences(lean_http, lean_rows[::step][: args.serve_images])}
    torch_mb = sum(Path(str(f.locate())).stat().st_size for name in ("torch", "torchvision")
                   for f in metadata.distribution(name).files or () if Path(str(f.locate())).is_file()) / 2**20
    print(f"{len(lean_rows)} images predicted, {len(uploads)} served, --threads {args.threads}")
    print("| install | size MB | predict s | serve start-up s | serve peak RSS MB |")
    print("|---|---|---|---|---|")
    print(f"| lean (pip install ., no torch) | {size:.0f} (whole venv) | {lean_s:.1f} | {lean_start:.1f} | "
          f"{lean_peak:.0f} |")
    print(f"| full (.[train]), {'checkpoint' if args.checkpoint else '.onnx'} | {torch_mb:.0f} (torch + torchvision alone) | {full_s:.1f} | {full_start:.1f} | "
          f"{full_peak:.0f} |")
    n = {"predict, lean = full": len(full_rows), "serve, lean = full": len(uploads), "lean serve = lean predict": len(uploads)}
    print("lean runtime verdicts: " + ", ".join(f"{k} {n[k] - len(v)}/{n[k]}" for k, v in checks.items()))
    bad = [line for v in checks.values() for line in v]
    if bad:
        print("\n".join(["DIFFERENT:", *bad]))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
