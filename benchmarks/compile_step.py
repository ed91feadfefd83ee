"""Does `torch.compile` pay for the decoder's training step? One process, the default model's finest
scale: the flow's forward (log p) and backward on one fiber chunk as training cuts it, eager against
compiled, alternating, median seconds per step. Issue 34 asked for it behind a flag only if it pays on
the CPU too or is safe to ship untested on a GPU.

    python benchmarks/compile_step.py --steps 30 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cflow_ad.config import CFlowConfig
from cflow_ad.device import Compute, set_threads, synchronize
from cflow_ad.model import CFlowModel
from cflow_ad.training import location_chunks
from workers import cpu_flags


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    set_threads(args.threads)
    compute = Compute(args.device)
    cfg = CFlowConfig()
    model = compute.place(CFlowModel(cfg, pretrained=False)).train()
    k, (h, w) = 0, (cfg.image_size[0] // cfg.strides[0], cfg.image_size[1] // cfg.strides[0])
    dim = model.encoder.channels[0]
    gen = torch.Generator().manual_seed(0)
    fibers = torch.randn(cfg.batch_size, h * w, dim, generator=gen).to(compute.torch_device)
    chunk = location_chunks(fibers, cfg.fiber_batch, gen)[0]
    decoder = model.decoders[k]
    steps = {"eager": decoder.log_prob, "compiled": torch.compile(decoder.log_prob)}

    def step(log_prob) -> None:
        lp = model.log_likelihood(k, chunk, None, (h, w), log_prob)
        (-lp.mean()).backward()
        decoder.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for log_prob in steps.values():  # warm-up; the compiled one compiles here
        for _ in range(3):
            step(log_prob)
    synchronize(compute.torch_device)
    warm = time.perf_counter() - t0
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, log_prob in steps.items():
            synchronize(compute.torch_device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(log_prob)
            synchronize(compute.torch_device)
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["eager"])
    print(f"\n{compute.describe()}, {torch.get_num_threads()} threads, CPU flags {cpu_flags()}; default model, stride"
          f" {cfg.strides[0]} decoder, {chunk.shape[0]}x{chunk.shape[1]} fibers of {dim} a step;"
          f" warm-up and compilation {warm:.0f} s")
    print("| step | ms per step (median of rounds) | speed vs eager |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1000 * statistics.median(t):.1f} | {base / statistics.median(t):.2f}x |")


if __name__ == "__main__":
    main()
