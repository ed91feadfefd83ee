"""Load check of `cflow-ad serve`: N requests at a fixed concurrency against a local server.

Starts `cflow-ad serve` on a free port (or uses --url), sends real image uploads from a folder
round-robin from `--concurrency` client threads, and prints throughput, p50 / p99 latency, the
status codes and the server's peak RSS (VmHWM, read from /proc when this script started it).

    python benchmarks/serve_load.py --model runs/mt5/model.safetensors \
        --images ../shared/data/magnetic_tile/magnetic_tile/test --requests 1000 --concurrency 8
"""

from __future__ import annotations

import argparse
import collections
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from cflow_ad.data import list_images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, runtime: str, threads: int | None, concurrency: int | None,
                 python: str = sys.executable, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`cflow-ad serve` in `python` (another environment's interpreter, e.g. the lean runtime's) with `env`;
    None leaves that setting at the server's default."""
    port = free_port()
    threads_flag = [] if threads is None else ["--threads", str(threads)]
    extra = [] if concurrency is None else ["--max-concurrency", str(concurrency)]
    proc = subprocess.Popen([python, "-m", "cflow_ad", *threads_flag, "serve", "--model", str(model),
                             "--port", str(port), "--runtime", runtime, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read()}")
        try:
            requests.get(url + "/health", timeout=2)
            return proc, url
        except requests.ConnectionError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


def rss_mb(pid: int, field: str) -> float | None:
    """A memory figure of a process from /proc: VmHWM (peak RSS) or VmRSS (now)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint or .onnx to serve (not needed with --url)")
    p.add_argument("--url", help="an already running server instead of starting one")
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files or folders to upload")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--runtime", choices=("onnx", "torch"), default="onnx")
    p.add_argument("--threads", type=int, default=2, help="server inference threads")
    p.add_argument("--server-concurrency", type=int, help="server --max-concurrency (default: the server's default)")
    args = p.parse_args()

    files = list_images(args.images)
    bodies = [(f.name, f.read_bytes()) for f in files]
    proc = None
    if args.url:
        url = args.url
    elif args.model:
        proc, url = start_server(args.model, args.runtime, args.threads, args.server_concurrency)
    else:
        raise SystemExit("pass --model or --url")
    local = threading.local()

    def one(i: int) -> tuple[int, float, float | None]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        name, body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        try:
            r = session.post(url + "/predict", files={"file": (name, body, "image/png")}, timeout=120)
            status = r.status_code
            server_ms = r.json()["timing"]["total_ms"] if status == 200 else None
        except requests.RequestException:
            status, server_ms = -1, None
        return status, time.perf_counter() - t0, server_ms

    try:
        one(0)  # warm-up: first-call allocations are not part of the steady state
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        peak, now = (rss_mb(proc.pid, "VmHWM"), rss_mb(proc.pid, "VmRSS")) if proc else (None, None)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    codes = collections.Counter(s for s, _, _ in results)
    latency = np.array([t for _, t, _ in results]) * 1e3
    server = np.array([ms for _, _, ms in results if ms is not None])
    errors = sum(n for s, n in codes.items() if s != 200)
    print(f"{args.requests} requests, concurrency {args.concurrency}, {len(files)} distinct images, runtime {args.runtime},"
          f" server: --threads {args.threads}, --max-concurrency {args.server_concurrency or 'default'}")
    mb = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    print("| requests | concurrency | throughput req/s | p50 ms | p99 ms | max ms | server p50 ms | errors |"
          " peak RSS MB | RSS at end MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.requests} | {args.concurrency} | {args.requests / wall:.1f} | {np.percentile(latency, 50):.0f} | "
          f"{np.percentile(latency, 99):.0f} | {latency.max():.0f} | "
          f"{np.percentile(server, 50) if server.size else float('nan'):.0f} | {errors} | {mb(peak)} | {mb(now)} |")
    print("status codes:", dict(codes))


if __name__ == "__main__":
    main()
