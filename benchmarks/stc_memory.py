"""Peak memory of `cflow-ad train` and `cflow-ad test` against the number of video frames (STC layout).

Writes one synthetic STC tree (`cflow_ad.stc.make_synthetic_stc`: one scene, 8 training videos and
4 test videos of --frames frames each), then trains and tests on every 16th, 4th and every frame of
it (`--frame-step`), once with a small `--memory-mb` and once with the default. Each command runs
in its own process; its peak RSS comes from os.wait4. With the small budget the peak should stay
flat as the frames grow 16-fold: training then decodes and encodes the frames again each pass
instead of caching them, and test bins the map values instead of keeping every map.

    python benchmarks/stc_memory.py --frames 1000 --root /tmp/stc_bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cflow_ad.config import CFlowConfig
from cflow_ad.stc import make_synthetic_stc

TRAIN_VIDEOS, TEST_VIDEOS = 8, 4


def measured(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one `cflow-ad` command in its own process; exits on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cflow_ad", "--quiet", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"cflow-ad {' '.join(args)} failed: {proc.stderr.read().strip()}")
    return wall, usage.ru_maxrss / 1024  # Linux reports kilobytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1000, help="frames per video")
    p.add_argument("--root", type=Path, default=Path("runs/stc_bench"), help="where the tree and the runs go")
    p.add_argument("--frame-size", type=int, nargs=2, default=(120, 160), metavar=("H", "W"))
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--small-mb", type=int, default=256, help="the small --memory-mb")
    p.add_argument("--steps", type=int, nargs="+", default=(16, 4, 1), help="--frame-step values")
    a = p.parse_args()

    data = a.root / "data"
    if not (data / "training").is_dir():
        t0 = time.perf_counter()
        make_synthetic_stc(data, scenes=("01",), train_videos=TRAIN_VIDEOS, test_videos=TEST_VIDEOS, frames=a.frames,
                           size=tuple(a.frame_size), seed=0)
        print(f"wrote {TRAIN_VIDEOS * a.frames} training and {TEST_VIDEOS * a.frames} test frames "
              f"({a.frame_size[0]}x{a.frame_size[1]}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    default_mb = CFlowConfig().memory_mb
    rows = []
    for memory_mb in (a.small_mb, default_mb):
        for step in a.steps:
            out = a.root / f"mb{memory_mb}_step{step}"
            common = ["--data", str(data), "--category", "01", "--frame-step", str(step)]
            train_s, train_mb = measured(["train", *common, "--output", str(out), "--image-size", str(a.image_size),
                                          "--epochs", "1", "--sub-epochs", "1", "--memory-mb", str(memory_mb)])
            test_s, test_mb = measured(["test", *common, "--model", str(out / "model.safetensors"),
                                        "--output", str(out / "test"), "--memory-mb", str(memory_mb)])
            m = json.loads((out / "test" / "metrics.json").read_text())
            frames = TRAIN_VIDEOS * -(-a.frames // step)
            rows.append((memory_mb, frames, m["images"], train_s, train_mb, test_s, test_mb, m["image_auroc"],
                         m["pixel_auroc"], m["pixel_metrics"].split(":")[0]))
            print(rows[-1], file=sys.stderr)

    print(f"image size {a.image_size}, frames {a.frame_size[0]}x{a.frame_size[1]}, 1 epoch; peak RSS per process\n")
    print("| --memory-mb | train frames | test frames | train s | train peak MB | test s | test peak MB |"
          " image AUROC | pixel AUROC | pixel metrics |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.0f} | {100 * r[7]:.1f} |"
              f" {100 * r[8]:.1f} | {r[9]} |")


if __name__ == "__main__":
    main()
