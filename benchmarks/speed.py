"""Inference speed of full CFLOW-AD against the encoder alone, in PyTorch and onnxruntime,
with PaDiM, SPADE and PatchCore on the same encoder (the paper's Table 6).

One run, one machine, identical 256x256 inputs. For each runtime (PyTorch eager, the ONNX
export in onnxruntime) and each part (the encoder alone with the same taps; the whole model
from image tensor to anomaly map and score) it times batch 1 and batch 32 after a warm-up
and prints the median of several repeats (the two parts alternate within each repeat, so
machine noise hits both alike), the ratio full/encoder, and the peak RSS of a fresh process
per runtime. It also prints the decoders' size (the paper's
Table 6 "model size") next to the location whitening's Gaussians, PaDiM's Gaussian bank,
SPADE's gallery and PatchCore's memory bank for the same encoder and taps. `cflow` is the default
(the map in log space), `cflow_int8` the default with int8 decoder products (`export --quantize int8`,
onnxruntime only; the encoder stays fp32, so its ratio to the encoder is what the decoders cost), `cflow_eq8` the same model with the paper's Eq. 8 map (`--normalization
stateless`). The baselines' timings do not depend on their fitted values, so PaDiM runs with its
initial Gaussians, SPADE with a random gallery of --gallery training images (762: magnetic_tile's)
and PatchCore with a random memory bank of --memory-patches (magnetic_tile's 1% coreset: 762 images
x 32x32 patches x 0.01). SPADE runs in PyTorch only.

    python benchmarks/speed.py --json speed.json

--coupling-layers and --condition-dim time a smaller decoder than the default's.

With --device it times the paper's own Table 6 configurations instead, on that device (a GPU:
the paper used a GTX 1080): ResNet-18, Wide-ResNet-50 and MobileNetV3-L with the paper's taps and
decoders (3 scales, 8 couplings, C = 128, no whitening), and MobileNetV2 with this project's
default decoder, at 256 and 512 px, batch 1 and 32, in fp32 and in bf16 (the encoder autocast and
the flows' matrix products, `--precisions fp32 bf16/bf16`; `bf16` alone is the encoder only). Each
row gives the encoder alone and the whole model from image tensor to anomaly map and score (the
images already on the device, outputs left there; the device is synchronised before and after
each timed repeat), the median of --repeats, beside the paper's fps. Random weights: speed does
not depend on their values. The filters make a short run, also on the CPU:

    python benchmarks/speed.py --device cuda --json speed_gpu.json
    python benchmarks/speed.py --device cpu --encoders resnet18 --sizes 256 --precisions fp32 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from cflow_ad.config import CFlowConfig
from cflow_ad.device import Compute, available_cores, set_threads, synchronize
from cflow_ad.export import onnx_runner, trace_onnx
from cflow_ad.runtime import CHUNK, session_options
from cflow_ad.encoder import encoder_for
from cflow_ad.model import METHOD_CLASSES, CFlowModel, build_model
from workers import cpu_flags

PARTS = ("encoder", "cflow", "cflow_int8", "cflow_eq8", "padim", "spade", "patchcore")
ONNX_ONLY = ("cflow_int8",)  # int8 decoders exist as an export only

# Table 6 of the paper, by encoder: its label, the config of its Table 3 model (pooling layers as
# PaDiM for the ResNets, layers 1-3; the authors' MobileNetV3-L blocks, our strides 8/16/32; the
# paper's decoder, without location whitening) and its GTX 1080 fps at 256 / 512 px, encoder alone
# and CFLOW-AD. MobileNetV2 is not in the paper: this project's default configuration.
PAPER_DECODER = {"pool_layers": 3, "coupling_layers": 8, "condition_dim": 128, "whitening": "none"}
TABLE6 = {
    "resnet18": ("R18", {"last_stride": 16, **PAPER_DECODER}, {"encoder": (80, 62), "cflow": (34, 12)}),
    "wide_resnet50_2": ("WRN50", {"last_stride": 16, **PAPER_DECODER}, {"encoder": (62, 30), "cflow": (27, 9)}),
    "mobilenet_v3_large": ("MNetV3L", {"last_stride": 32, **PAPER_DECODER}, {"encoder": (82, 61), "cflow": (35, 12)}),
    "mobilenet_v2": ("MNetV2 (default decoder)", {}, {}),
}
PAPER_SIZES = (256, 512)
# Table 6's model sizes (MB): the whole encoder network, and CFLOW-AD (encoder and decoders).
PAPER_MB = {"resnet18": (45, 96), "wide_resnet50_2": (268, 947), "mobilenet_v3_large": (12, 25)}
RUNTIMES = ("torch", "onnx")
TORCH_ONLY = tuple(name for name, kind in METHOD_CLASSES.items() if "onnx" not in kind.runtimes)


def _models(decoder: dict, gallery: int, memory_patches: int) -> dict:
    """CFLOW-AD (the default config with the `decoder` fields changed) and the baselines on one shared
    encoder (MobileNetV2, taps 8/16/32, 256 px)."""
    cfg = CFlowConfig(**decoder)
    cflow = build_model(cfg).eval()
    # the same weights (seeded decoders, shared encoder) with the paper's Eq. 8 map: what the log-space map costs
    eq8 = CFlowModel(cfg.replace(normalization="stateless"), cflow.encoder).eval()
    assert all(torch.equal(a, b) for a, b in zip(cflow.state_dict().values(), eq8.state_dict().values()))
    with torch.no_grad(), cflow.recording_ranges():  # int8 input ranges (speed does not depend on their values)
        cflow(torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2)))
    models = {"encoder": cflow.encoder, "cflow": cflow, "cflow_int8": cflow, "cflow_eq8": eq8}
    for method in ("padim", "spade", "patchcore"):
        models[method] = METHOD_CLASSES[method](cfg.replace(method=method), encoder=cflow.encoder).eval()
    spade, patchcore = models["spade"], models["patchcore"]
    gen = torch.Generator().manual_seed(1)
    spade.bank = torch.randn(gallery, spade.dim, *spade.grid, generator=gen)
    spade.pooled = torch.randn(gallery, spade.pooled.shape[1], generator=gen)
    patchcore.remember(torch.randn(memory_patches, patchcore.dim, generator=gen))
    return models


def _runner(models: dict, part: str, runtime: str, threads: int):
    if runtime == "torch":
        return models[part]
    if part != "encoder":
        return onnx_runner(models[part], threads, quantize="int8" if part == "cflow_int8" else None)
    model = models["cflow"]
    import onnxruntime as ort

    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    trace_onnx(model.encoder, model.image_size, path, [f"tap{s}" for s in model.config.strides])
    session = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    os.remove(path)

    def encode(x: torch.Tensor) -> list:  # the same batch chunking as the full model
        return [session.run(None, {"images": x[i : i + CHUNK].numpy()}) for i in range(0, len(x), CHUNK)]

    return encode


def _parts(runtime: str) -> list[str]:
    return [p for p in PARTS if p not in (ONNX_ONLY if runtime == "torch" else TORCH_ONLY)]


def _rows(runtime: str, threads: int, repeats: int, b1_calls: int, decoder: dict, gallery: int,
          memory_patches: int) -> dict:
    """Times every part of one runtime at batch 1 and 32, alternating them in every repeat so
    that machine noise hits all alike; runs in its own process for a clean peak RSS."""
    torch.set_num_threads(threads)
    models = _models(decoder, gallery, memory_patches)
    runs = {part: _runner(models, part, runtime, threads) for part in _parts(runtime)}
    out: dict = {}
    gen = torch.Generator().manual_seed(0)
    for batch, calls in ((1, b1_calls), (32, 1)):
        x = torch.rand(batch, 3, 256, 256, generator=gen)
        times: dict[str, list[float]] = {part: [] for part in runs}
        with torch.inference_mode():
            for run in runs.values():
                run(x)  # warm-up: allocations, folding, onnxruntime's first-run setup
            for _ in range(repeats):
                for part, run in runs.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        run(x)
                    times[part].append((time.perf_counter() - t0) / (calls * batch))
        for part in runs:
            out[f"{part}_b{batch}"] = statistics.median(times[part])
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _sizes(decoder: dict, gallery: int, memory_patches: int) -> dict:
    """What each method stores besides the encoder, counted from the models' own tensors."""
    models = _models(decoder, gallery, memory_patches)
    model = models["cflow"]
    count = lambda tensors: sum(t.numel() for t in tensors)  # noqa: E731
    dec = count(model.decoders.parameters())
    gauss = count(model.whitenings.buffers())
    padim = count(models["padim"].gaussian.buffers())  # a mean and a whitening matrix per location
    spade = count([models["spade"].bank, models["spade"].pooled])
    mb = lambda n: n * 4 / 2**20  # noqa: E731
    return {"decoder_params": dec, "decoder_mb": mb(dec), "whitening_floats": gauss, "whitening_mb": mb(gauss),
            "padim_bank_floats": padim, "padim_bank_mb": mb(padim), "spade_gallery_floats": spade,
            "spade_gallery_mb": mb(spade), "spade_gallery_images": gallery,
            "patchcore_memory_floats": models["patchcore"].memory.numel(),
            "patchcore_memory_mb": _megabytes([models["patchcore"].memory, models["patchcore"].neighbours]),
            "patchcore_memory_patches": memory_patches}


def _timed_parts(runs: dict, x: torch.Tensor, calls: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per image of each part on `x`'s device: warm-up calls first (allocations,
    cuDNN's algorithm choice, the folded flows), then timed repeats that alternate the parts,
    each repeat between two synchronisations so that only finished work counts."""
    times: dict[str, list[float]] = {part: [] for part in runs}
    with torch.inference_mode():
        for run in runs.values():
            for _ in range(warmup):
                run(x)
        for _ in range(repeats):
            for part, run in runs.items():
                synchronize(x.device)
                t0 = time.perf_counter()
                for _ in range(calls):
                    run(x)
                synchronize(x.device)
                times[part].append((time.perf_counter() - t0) / (calls * len(x)))
    return {part: statistics.median(t) for part, t in times.items()}


def _megabytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def table6(args: argparse.Namespace) -> dict:
    """Times every selected configuration on `args.device`; prints the tables and returns the figures."""
    set_threads(args.threads)
    where = Compute(args.device).describe().rsplit(", ", 1)[0]
    gen = torch.Generator().manual_seed(0)
    rows, sizes = [], []
    for encoder in args.encoders:
        label, changes, paper = TABLE6[encoder]
        shared = encoder_for(CFlowConfig(encoder=encoder, **changes), pretrained=False)  # the same at every size
        for size in args.sizes:
            model = CFlowModel(CFlowConfig(encoder=encoder, image_size=size, **changes), shared).eval()
            stored = [*model.decoders.parameters(), *(model.whitenings.buffers() if model.whitenings else [])]
            sizes.append({"encoder": encoder, "image_size": size, "encoder_mb": _megabytes(shared.parameters()),
                          "decoders_mb": _megabytes(stored), "paper_mb": PAPER_MB.get(encoder)})
            runs = {"encoder": model.encoder, "cflow": model}
            at = PAPER_SIZES.index(size) if paper and size in PAPER_SIZES else None
            for precision in args.precisions:
                encoder_p, _, flows_p = precision.partition("/")
                compute = Compute(args.device, encoder_p, workers=0, flow_precision=flows_p or "fp32")
                compute.place(model)
                for batch in args.batches:
                    x = compute.put(torch.rand(batch, 3, size, size, generator=gen))
                    sec = _timed_parts(runs, x, args.b1_calls if batch == 1 else 1, args.repeats, args.warmup)
                    rows.append({"encoder": encoder, "image_size": size, "precision": precision, "batch": batch,
                                 "encoder_ips": 1 / sec["encoder"], "cflow_ips": 1 / sec["cflow"],
                                 "paper_encoder_fps": None if at is None else paper["encoder"][at],
                                 "paper_cflow_fps": None if at is None else paper["cflow"][at]})
                    print(f"{label} {size} px {precision} batch {batch}: done", file=sys.stderr, flush=True)
            del model, runs
        del shared
    na = lambda v: "n/a" if v is None else f"{v:g}"  # noqa: E731
    print(f"\nTable 6 configurations on {where}: img/s, median of {args.repeats} repeats (batch 1: {args.b1_calls}"
          " calls each), inputs on the device, random weights. Paper: GTX 1080 fps, batch not stated.")
    print("| encoder | px | precision | batch | encoder img/s | CFLOW-AD img/s | CFLOW-AD / encoder"
          " | paper encoder fps | paper CFLOW-AD fps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {TABLE6[r['encoder']][0]} | {r['image_size']} | {r['precision']} | {r['batch']}"
              f" | {r['encoder_ips']:.1f} | {r['cflow_ips']:.1f} | {r['cflow_ips'] / r['encoder_ips']:.2f}"
              f" | {na(r['paper_encoder_fps'])} | {na(r['paper_cflow_fps'])} |")
    print("\n| encoder | px | encoder MB (up to its last tap) | decoders MB (and whitening) | paper: encoder MB"
          " (whole network) | paper: CFLOW-AD MB |\n|---|---|---|---|---|---|")
    for m in sizes:
        paper = m["paper_mb"] or (None, None)
        print(f"| {TABLE6[m['encoder']][0]} | {m['image_size']} | {m['encoder_mb']:.1f} | {m['decoders_mb']:.1f}"
              f" | {na(paper[0])} | {na(paper[1])} |")
    return {"device": where, "threads": torch.get_num_threads(), "repeats": args.repeats, "b1_calls": args.b1_calls,
            "warmup": args.warmup, "rows": rows, "model_mb": sizes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=available_cores(), help="torch and onnxruntime threads (default: the cores)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--b1-calls", type=int, default=20, help="single-image calls per timed repeat")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--condition-dim", type=int, default=CFlowConfig.condition_dim,
                   help="size C of the positional condition (a lighter condition trades accuracy for speed)")
    p.add_argument("--coupling-layers", type=int, default=CFlowConfig.coupling_layers, help="coupling layers per decoder")
    p.add_argument("--pool-layers", type=int, default=CFlowConfig.pool_layers, help="taps (scales) of every method")
    p.add_argument("--last-stride", type=int, default=CFlowConfig.last_stride, help="stride of the deepest tap")
    p.add_argument("--blur-sigma", type=float, default=CFlowConfig.blur_sigma, help="Gaussian blur of every map")
    p.add_argument("--gallery", type=int, default=762, help="SPADE's gallery size in training images (magnetic_tile: 762)")
    p.add_argument("--memory-patches", type=int, default=round(762 * 32 * 32 * 0.01),
                   help="PatchCore's memory bank in patches (magnetic_tile's 1%% coreset: 7803)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--row", metavar="RUNTIME", help=argparse.SUPPRESS)
    t6 = p.add_argument_group("the paper's Table 6 configurations on one device (--device)")
    t6.add_argument("--device", help="cuda, cuda:N, cpu or mps: time the Table 6 configurations there")
    t6.add_argument("--encoders", nargs="+", default=list(TABLE6), choices=list(TABLE6))
    t6.add_argument("--sizes", nargs="+", type=int, default=list(PAPER_SIZES), help="input sizes in pixels")
    t6.add_argument("--precisions", nargs="+", default=["fp32", "bf16/bf16"], metavar="ENCODER[/FLOWS]",
                    help="the encoder's autocast precision (fp32, bf16, fp16), and after a slash the flows' matrix"
                         " products' (--flow-precision; fp32 without one)")
    t6.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    t6.add_argument("--warmup", type=int, default=3, help="untimed calls per part before the timed repeats")
    args = p.parse_args()
    decoder = {"condition_dim": args.condition_dim, "coupling_layers": args.coupling_layers,
               "pool_layers": args.pool_layers, "last_stride": args.last_stride, "blur_sigma": args.blur_sigma}
    if args.device:
        figures = table6(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
        return
    if args.row:
        print(json.dumps(_rows(args.row, args.threads, args.repeats, args.b1_calls, decoder, args.gallery,
                               args.memory_patches)))
        return

    rows = {}
    for runtime in args.runtimes:
        cmd = [sys.executable, __file__, "--row", runtime, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--b1-calls", str(args.b1_calls),
               "--condition-dim", str(args.condition_dim), "--coupling-layers", str(args.coupling_layers),
               "--pool-layers", str(args.pool_layers), "--last-stride", str(args.last_stride),
               "--blur-sigma", str(args.blur_sigma),
               "--gallery", str(args.gallery),
               "--memory-patches", str(args.memory_patches)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[runtime] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{runtime}: done", file=sys.stderr, flush=True)

    figures: dict = {"cpu_flags": cpu_flags(), "threads": args.threads, "repeats": args.repeats, "image_size": 256, **decoder}
    taps = "/".join(map(str, CFlowConfig(**decoder).strides))
    print(f"\nMobileNetV2, taps {taps}, blur {args.blur_sigma:g}, {args.coupling_layers} couplings, C = {args.condition_dim}, 256 px; {args.threads} threads; median of {args.repeats};"
          f" CPU flags: {figures['cpu_flags']}")
    print("| runtime | part | batch | img/s | ms/img | part/encoder |")
    print("|---|---|---|---|---|---|")
    for runtime in args.runtimes:
        r = rows[runtime]
        for part in _parts(runtime):
            for b in (1, 32):
                ips = 1 / r[f"{part}_b{b}"]
                ratio = r[f"encoder_b{b}"] / r[f"{part}_b{b}"]
                figures[f"{runtime}_{part}_ips_b{b}"] = ips
                if part != "encoder":
                    figures[f"{runtime}_{part}_ratio_b{b}"] = ratio
                print(f"| {runtime} | {part} | {b} | {ips:.1f} | {1000 / ips:.1f} | {ratio:.2f} |")
        figures[f"{runtime}_peak_rss_mb"] = r["peak_rss_mb"]
    print("\n| runtime | peak RSS of a process running every part at batch 1 and 32 |\n|---|---|")
    for runtime in args.runtimes:
        print(f"| {runtime} | {rows[runtime]['peak_rss_mb']:.0f} MB |")
    best = max(args.runtimes, key=lambda rt: figures[f"{rt}_cflow_ips_b1"])
    for b in (1, 32):  # the headline keys: the fastest runtime we ship
        figures[f"encoder_ips_b{b}"] = figures[f"{best}_encoder_ips_b{b}"]
        figures[f"cflow_ips_b{b}"] = figures[f"{best}_cflow_ips_b{b}"]
    figures["fastest_runtime"] = best
    if "onnx" in args.runtimes:  # int8 beside the encoder of the same runtime and run (fp32 encoder in both)
        for b in (1, 32):
            figures[f"cflow_int8_ips_b{b}"] = figures[f"onnx_cflow_int8_ips_b{b}"]
        print("\nint8 decoders (onnx): CFLOW-AD / encoder alone = "
              f"{figures['onnx_cflow_int8_ratio_b1']:.2f} at batch 1, {figures['onnx_cflow_int8_ratio_b32']:.2f} at batch 32"
              f" (fp32: {figures['onnx_cflow_ratio_b1']:.2f} / {figures['onnx_cflow_ratio_b32']:.2f})")
    sizes = _sizes(decoder, args.gallery, args.memory_patches)
    figures.update(sizes)
    print("\n| stored per model | parameters / floats | MB (float32) |\n|---|---|---|")
    print(f"| flow decoders ({args.pool_layers} scales, {args.coupling_layers} couplings) | {sizes['decoder_params']:,} | {sizes['decoder_mb']:.1f} |")
    print(f"| location whitening (per-location Gaussians, {args.pool_layers} scales) | {sizes['whitening_floats']:,} | {sizes['whitening_mb']:.1f} |")
    print(f"| PaDiM bank, same taps (--padim-channels at every finest-tap location) | {sizes['padim_bank_floats']:,} | {sizes['padim_bank_mb']:.1f} |")
    print(f"| SPADE gallery, same taps ({args.gallery} images x finest-tap grid x all channels + pooled) | {sizes['spade_gallery_floats']:,}"
          f" | {sizes['spade_gallery_mb']:.1f} |")
    print(f"| PatchCore memory bank, same taps ({args.memory_patches} patches x all channels, + 9 neighbour indices each)"
          f" | {sizes['patchcore_memory_floats']:,} | {sizes['patchcore_memory_mb']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
