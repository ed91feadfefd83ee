"""Peak memory of `cflow-ad serve` under hostile uploads (issue 33), in the lean runtime.

Serves an exported .onnx model where torch and the other training packages cannot be imported (as in the
lean install), a fresh server per case, and prints its RSS from /proc (VmHWM, the peak, and VmRSS, now):

- idle: after one small request;
- one 6000 x 6000 PNG (36 megapixels in a few KB, under the default 40-megapixel limit), answered as JSON,
  then as an overlay, then two overlays at once;
- 40 clients each holding back the last byte of a 19 MB body: what /health says while they wait, the RSS
  against the idle one, and how long until the server has closed them all (--upload-timeout-s).

    python benchmarks/serve_memory.py --model model.onnx
    python benchmarks/serve_memory.py --tiny runs/tiny   # trains the tests' tiny model there first (seconds)
"""

from __future__ import annotations

import argparse
import io
import os
import select
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

from serve_load import rss_mb, start_server

REPO = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("torch", "torchvision", "scipy", "sklearn", "matplotlib", "safetensors", "tqdm", "onnx")


def tiny_model(folder: Path) -> Path:
    """The tests' tiny model (tests/conftest.py's TINY, PaDiM with thresholds) on synthetic images, exported."""
    from cflow_ad import api
    from cflow_ad.data import make_synthetic_mvtec
    from cflow_ad.source import DataSource

    sys.path.insert(0, str(REPO))
    from tests.conftest import TINY

    root = make_synthetic_mvtec(folder / "data", n_train=24, n_test_good=6, n_test_defect=6, size=128, seed=0)
    checkpoint = api.train(TINY.replace(method="padim", calibration_fraction=0.25), folder / "model",
                           source=DataSource(root, "synthetic"), progress=False, log=lambda m: None)
    return Path(api.export(checkpoint, folder / "model.onnx"))


def lean_env(blocker: Path) -> dict:
    """An environment in which `import torch` (and the rest of TRAINING_ONLY) fails, as in the lean install."""
    for name in TRAINING_ONLY:
        (blocker / name).mkdir(exist_ok=True)
        (blocker / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\")\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO / "src")])}


def png(rgb: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)).save(buf, "PNG")
    return buf.getvalue()


def large_png(side: int = 6000) -> bytes:
    """A side x side PNG of a few KB: grey with a dark blot, as the probe's."""
    im = Image.new("RGB", (side, side), (128, 128, 128))
    ImageDraw.Draw(im).ellipse((side // 3, side // 3, side // 2, side // 2), fill=(20, 20, 20))
    return png(im)


def post(url: str, body: bytes, output: str = "json") -> int:
    r = requests.post(url + f"/predict?output={output}", data=body, headers={"Content-Type": "image/png"}, timeout=300)
    return r.status_code


def stalled(url: str, size: int, sent: threading.Semaphore) -> str:
    """One client that sends all of a `size`-byte upload but its last byte (releasing `sent` then, or when it
    is refused), and waits: the first line of the server's answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {size}\r\n\r\n"
    try:
        sock.sendall(head.encode())
        if not select.select([sock], [], [], 0.5)[0]:  # no answer to the headers alone: send the body
            sock.sendall(bytes(size - 1))
        sent.release()
        answer = sock.recv(64)  # 503 at once, or 408 when the upload times out
    except OSError as exc:
        sent.release()
        answer = f"reset ({type(exc).__name__})".encode()
    finally:
        sock.close()
    return answer.split(b"\r\n")[0].decode(errors="replace")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an exported .onnx model")
    p.add_argument("--tiny", type=Path, help="train and export the tests' tiny model in this folder, and serve it")
    p.add_argument("--clients", type=int, default=40, help="stalled uploads")
    p.add_argument("--body-mb", type=float, default=19.0, help="size of each stalled upload")
    args = p.parse_args()
    model = tiny_model(args.tiny) if args.tiny else args.model
    if model is None:
        raise SystemExit("pass --model or --tiny")
    small, big = png(np.full((128, 128, 3), 128, np.uint8)), large_png()
    print(f"model {model}; 36-megapixel PNG of {len(big) / 1e3:.0f} KB; server defaults")
    mb = lambda v: f"{v:.0f}"  # noqa: E731
    with tempfile.TemporaryDirectory() as blocker:
        env = lean_env(Path(blocker))
        rows = []
        for case, outputs in (("6000x6000 PNG, json", ["json"]), ("6000x6000 PNG, overlay", ["overlay"]),
                              ("6000x6000 PNG, 2 overlays at once", ["overlay", "overlay"])):
            proc, url = start_server(model, "onnx", None, None, env=env)
            try:
                post(url, small)
                idle = rss_mb(proc.pid, "VmHWM")
                with ThreadPoolExecutor(len(outputs)) as pool:
                    codes = list(pool.map(lambda o: post(url, big, o), outputs))
                rows.append((case, idle, rss_mb(proc.pid, "VmHWM"), codes))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        print("| case | idle peak RSS MB | peak RSS MB | status |\n|---|---|---|---|")
        for case, idle, peak, codes in rows:
            print(f"| {case} | {mb(idle)} | {mb(peak)} | {', '.join(map(str, codes))} |")

        proc, url = start_server(model, "onnx", None, None, env=env)
        try:
            post(url, small)
            idle = rss_mb(proc.pid, "VmRSS")
            size = int(args.body_mb * 1e6)
            t0 = time.monotonic()
            outcomes: list[str] = []
            sent = threading.Semaphore(0)
            threads = [threading.Thread(target=lambda: outcomes.append(stalled(url, size, sent)))
                       for _ in range(args.clients)]
            for t in threads:
                t.start()
            for _ in threads:  # every client has sent all it will, or been refused
                sent.acquire(timeout=120)
            health = requests.get(url + "/health", timeout=10).json()
            during = 0.0
            for _ in range(30):  # the server takes what the sockets still hold in its own time
                during = max(during, rss_mb(proc.pid, "VmRSS"))
                time.sleep(0.1)
            for t in threads:
                t.join(timeout=120)
            closed_s = time.monotonic() - t0
            after = requests.get(url + "/health", timeout=10).json()
            print(f"\n{args.clients} clients, each holding back the last byte of {args.body_mb:g} MB:")
            print(f"- /health while they wait: waiting {health['waiting']}, uploading {health['uploading']},"
                  f" rejected_busy {health['rejected_busy']}")
            print(f"- RSS idle {mb(idle)} MB; while they wait {mb(during)} MB ({during / idle:.2f}x idle);"
                  f" peak of the whole run {mb(rss_mb(proc.pid, 'VmHWM'))} MB")
            print(f"- all closed after {closed_s:.0f} s: " + ", ".join(
                f"{n} x {o}" for o, n in sorted({o: outcomes.count(o) for o in outcomes}.items())))
            print(f"- then /health: waiting {after['waiting']}, uploading {after['uploading']};"
                  f" a small upload answers {post(url, small)}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
