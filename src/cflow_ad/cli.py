"""`cflow-ad` command line: train, test, predict, export, the paper's experiments and an offline demo.

Training flags are generated from `CFlowConfig`, so `--help` always shows the real
options and defaults. Every error prints one line, with the exit status of EXIT_STATUS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .config import METHODS, NORMALIZATIONS, QUANTIZE, CFlowConfig, default_text
from .device import COMPUTE_FIELDS, FLOW_PRECISIONS, PRECISIONS, Compute, available_cores, cuda_count, set_threads
from .errors import CflowInputError
from .outputs import NAMES, as_text, percent

EXIT_STATUS = """exit status:
  0    done; predict also when it skipped some files (each is listed with its reason)
  1    train --category all: a category failed (the others finished; see summary.md)
  2    an error you can fix, in one line: an option, a file, a folder, a model, an output that
       cannot be written, or predict scoring none of its images
  70   an internal error (a bug), in one line: rerun with 'cflow-ad --debug ...' and report the traceback
  130  interrupted"""


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and training (CFlowConfig)")
    for f in dataclasses.fields(CFlowConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        # an unset field's help says what unset means
        help_text = meta["help"] if f.default is None else f"{meta['help']} (default: {default_text(f.default)})"
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        if str(f.type).startswith("tuple"):  # image_size: S, or H W
            group.add_argument(flag, dest=f.name, type=int, nargs="+", metavar=("H", "W"), action=_Pair,
                               default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        group.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=meta.get("choices"), help=help_text)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once (the config's flags already say theirs, as they are typed), and none where
    there is nothing to show: a required option or an unset one would read "(default: None)"."""

    def _get_help_string(self, action):
        if "(default: " in (action.help or "") or action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


class _Pair(argparse.Action):
    """One value (a square) or two (height, width), as a tuple."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 2:
            parser.error(f"{option_string} takes one value (a square) or two (height width), got {len(values)}")
        setattr(namespace, self.dest, (values[0], values[-1]))


def _config_from(args: argparse.Namespace) -> CFlowConfig:
    return CFlowConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CFlowConfig)})


def _add_data_flags(parser: argparse.ArgumentParser, test: bool) -> None:
    g = parser.add_argument_group("data: an MVTec-AD layout root and category, or plain folders")
    g.add_argument("--data", type=Path, help="MVTec-layout root (ROOT/CATEGORY/train/good, test/<type>, ground_truth/<type>)")
    g.add_argument("--category", help="category folder under --data, or STC scene; train: 'all' trains each one")
    g.add_argument("--normal-dir", type=Path, help="folder of defect-free images (instead of --data)")
    if test:
        g.add_argument("--abnormal-dir", type=Path, help="folder of defective images (with --normal-dir)")
        g.add_argument("--mask-dir", type=Path, help="masks for --abnormal-dir: <stem>.png or <stem>_mask.png")
    g.add_argument("--frame-step", type=int, default=1, help="STC roots: use every N-th frame of each video")
    rule = "a defect test image without a mask is an error; without this flag the pixel metrics leave it out"
    g.add_argument("--require-masks", action="store_true",
                   help=rule if test else f"with --category all, which also tests each category: {rule}")


def _source_from(args: argparse.Namespace):
    """The data flags as one `DataSource`; train has no --abnormal-dir or --mask-dir."""
    from .source import DataSource

    return DataSource(args.data, args.category, args.normal_dir, getattr(args, "abnormal_dir", None),
                      getattr(args, "mask_dir", None), args.frame_step, args.require_masks)


def _add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=QUANTIZE, help="with --runtime onnx and a checkpoint: export it with int8"
                        " decoders first (see 'cflow-ad export --quantize')")


def _add_threshold_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("decision thresholds (default: those calibrated into the model)")
    g.add_argument("--target-fpr", type=float, help="move the calibrated thresholds to this false-positive rate")
    g.add_argument("--image-threshold", type=float, help="score above which an image is a defect")
    g.add_argument("--pixel-threshold", type=float, help="map value above which a pixel is a defect")
    g.add_argument("--min-defect-area", type=int, default=0, metavar="PX",
                   help="defect regions smaller than this (in the image's own pixels) are dropped; an image over the"
                        " image threshold with none left is ok (default: 0, keep all)")
    g.add_argument("--all-regions", action="store_true",
                   help="list every part of the map over the pixel threshold as a region, on every image (faint specks,"
                        " ok images too); default: only defect images have regions, the parts of the map over the"
                        " calibrated region threshold")


def _add_compute_flags(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """--device, --precision, --workers and --flow-precision (`device.Compute`): where a run computes, never
    saved in the model (the precisions are recorded with the constants fitted in them)."""
    g = parser.add_argument_group("compute (a run setting: the model file is the same on every device)")
    choices = {"precision": PRECISIONS, "flow_precision": FLOW_PRECISIONS}
    for f in dataclasses.fields(Compute):
        if f.name == "workers" and not workers:
            continue
        g.add_argument("--" + f.name.replace("_", "-"), type=int if f.name == "workers" else str, default=f.default,
                       choices=choices.get(f.name), help=f.metadata["help"])


def _compute(args: argparse.Namespace) -> dict:
    """The compute flags as keyword arguments of the api functions, checked at once (exit 2 when the
    device or precision is not available here)."""
    kwargs = {name: getattr(args, name) for name in COMPUTE_FIELDS if hasattr(args, name)}
    Compute(**kwargs)
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cflow-ad", description="CFLOW-AD anomaly detection with localization.",
                                epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cflow-ad {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error above its one line")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: the cores available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on defect-free images", formatter_class=_Help)
    _add_data_flags(t, test=False)
    t.add_argument("--output", type=Path, required=True, help="folder for model.safetensors")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel training in N processes on this machine (runs torchrun; see README for multi-node)")
    t.add_argument("--jobs", type=int, default=1,
                   help="with --category all: categories trained at once, in separate processes sharing the threads")
    t.add_argument("--resume", action="store_true",
                   help="continue a run stopped by a crash, SIGINT or SIGTERM from OUTPUT/training_state.pt")
    _add_compute_flags(t)
    _add_config_flags(t)

    e = sub.add_parser("test", help="evaluate a model on a labelled test set")
    e.add_argument("--model", type=Path, required=True,
                   help="checkpoint written by 'train', or a .onnx file written by 'export' (scored as exported)")
    _add_data_flags(e, test=True)
    e.add_argument("--output", type=Path, required=True, help="folder for metrics.json and scores.csv")
    e.add_argument("--normalization", choices=NORMALIZATIONS, help="score in another mode than the checkpoint's"
                   " (its thresholds then do not apply)")
    e.add_argument("--memory-mb", type=int, help="override the checkpoint's memory_mb: exact pixel metrics while the"
                   " maps fit in an eighth of it, else binned")
    e.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="score in PyTorch or in onnxruntime (the checkpoint exported first, as predict does)")
    _add_quantize_flag(e)
    _add_compute_flags(e)

    rp = sub.add_parser("report", help="self-contained HTML report of a 'cflow-ad test' output folder")
    rp.add_argument("--results", type=Path, required=True, help="folder written by 'cflow-ad test --output'")
    rp.add_argument("--output", type=Path, help="HTML file to write (default: RESULTS/report.html)")

    r = sub.add_parser("predict", help="score images: OK / defect, defect area, heat map, overlay, mask",
                       formatter_class=_Help)
    r.add_argument("--model", type=Path, required=True, help="checkpoint written by 'train', or a .onnx file written by 'export'")
    r.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    r.add_argument("--output", type=Path, required=True, help="folder for predictions.csv/.json and the PNGs")
    r.add_argument("--normalization", choices=("paper",), help="normalise over the images given instead of the"
                   " checkpoint's constants (no labels: the thresholds do not apply)")
    r.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="score in PyTorch or export to onnxruntime first (faster on CPUs; a .onnx --model always uses it)")
    _add_quantize_flag(r)
    _add_threshold_flags(r)
    _add_compute_flags(r)
    out = r.add_argument_group("outputs")
    for name, text in (("overlays", "<name>_overlay.png: heat map over the image, defect outline in white"),
                       ("masks", "<name>_mask.png: the defect mask at the pixel threshold"),
                       ("heatmaps", "<name>_heatmap.png: the anomaly map, colours fixed by the model"),
                       ("legend", "a colour bar with the thresholds beside each overlay (default: off)"),
                       ("csv", "predictions.csv: one row per image"),
                       ("json", "predictions.json: thresholds, counts per folder and one entry per image")):
        out.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=name != "legend", help=text)

    c = sub.add_parser("calibrate", help="set a checkpoint's decision thresholds on new images",
                       formatter_class=_Help)
    c.add_argument("--model", type=Path, required=True, help="checkpoint written by 'train'")
    _add_data_flags(c, test=True)
    c.add_argument("--output", type=Path, help="checkpoint to write (default: update --model in place)")
    c.add_argument("--target-fpr", type=float, help="false-positive rate on the good images (default: the config's)")
    c.add_argument("--f1", action="store_true",
                   help="F1-optimal thresholds on a labelled set (--data's test split, or --abnormal-dir with --mask-dir)")
    _add_compute_flags(c)

    sv = sub.add_parser("serve", help="HTTP service: POST /predict, GET /health, GET /model, a web page at /",
                        formatter_class=_Help)
    sv.add_argument("--model", type=Path, required=True, help="checkpoint written by 'train', or a .onnx file")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument("--runtime", choices=("torch", "onnx"), default="onnx", help="inference runtime (SPADE: torch)")
    _add_quantize_flag(sv)
    _add_threshold_flags(sv)
    _add_compute_flags(sv, workers=False)
    from .serve import Limits

    for f in dataclasses.fields(Limits):
        sv.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=f.metadata["help"])

    x = sub.add_parser("export", help="export a checkpoint as one ONNX file: image -> anomaly map and score")
    x.add_argument("--model", type=Path, required=True, help="checkpoint written by 'train'")
    x.add_argument("--format", choices=("onnx",), default="onnx", help="export format")
    x.add_argument("--output", type=Path, required=True, help="file to write, e.g. model.onnx")
    x.add_argument("--quantize", choices=QUANTIZE, help="int8 decoder matrix products, with the input ranges recorded"
                   " in training (CFLOW-AD; default: fp32; README, 'int8 decoders')")

    xp = sub.add_parser(
        "experiment", help="the paper's experiments: ablation (Table 2), compare (Tables 3-4), figures (Figures 3-4);"
        " suite: one config on every development set", formatter_class=_Help)
    xp.add_argument("name", choices=("ablation", "compare", "figures", "suite"), help="which experiment")
    xp.add_argument("--data", type=Path, nargs="+", required=True,
                    help="MVTec-layout roots, or folders of them (e.g. ../shared/data: every set in it)")
    xp.add_argument("--categories", nargs="+", help="categories under --data, by category or root/category (default: all)")
    xp.add_argument("--output", type=Path, required=True, help="folder for NAME.md, NAME.json, figures and runs/")
    xp.add_argument("--seeds", nargs="+", type=int, help="compare: seeds per method (default: 0 1 2 3); suite:"
                    " seeds of the config (default: 0)")
    xp.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="compare: methods")
    xp.add_argument("--paper-taps", action="store_true",
                    help="compare: each method on the taps of its paper (CFLOW-AD, PaDiM, SPADE: strides 4/8/16;"
                    " PatchCore: 8/16) instead of --pool-layers / --last-stride")
    xp.add_argument("--variants", nargs="+", help="ablation: variant names (default: all; see ablation.md)")
    _add_compute_flags(xp)
    _add_config_flags(xp)

    d = sub.add_parser("demo", help="offline demo: synthetic data -> train -> test -> overlays")
    d.add_argument("--output", type=Path, default=Path("runs/demo"), help="folder for data, model and results")
    return p


def _print_metrics(metrics: dict) -> None:
    print(f"image AUROC {percent(metrics['image_auroc'], 2, '')}  pixel AUROC {percent(metrics['pixel_auroc'], 2, '')}"
          f"  AUPRO {percent(metrics['aupro'], 2, '')}")
    used = metrics.get("images_used", {})
    if used.get("pixel_metrics") != used.get("image_metrics"):
        print(f"pixel metrics on the {used['pixel_metrics']} of {used['image_metrics']} images that have masks")
    rates = metrics.get("at_threshold") or {}
    regions = rates.get("regions_per_type", {})
    for name, m in metrics.get("per_type", {}).items():
        found = regions.get(name, {}).get("region_recall")
        print(f"  {name:<12} image AUROC {percent(m['image_auroc'], 2, '')}  pixel AUROC {percent(m['pixel_auroc'], 2, '')}"
              + ("" if found is None else f"  region recall {percent(found, 2, '')}"))
    if rates:
        print(f"at the thresholds: image FPR {percent(rates['image_fpr'], 2, '')}, recall {percent(rates['image_recall'], 2, '')};"
              f" good images with a region {percent(rates.get('region_false_alarm_rate'), 2, '')},"
              f" defects a region finds {percent(rates.get('region_recall'), 2, '')}")


def _print_predictions(rows: list[dict], output: Path) -> None:
    """One line per image, then the share flagged per folder: for MVTec-style folders the false-positive
    rate on 'good' next to the recall on each defect type. A run that scored no image is an error
    (exit 2) once its outputs, which list each image's reason, are written."""
    from .inference import summarize

    used = next((r for r in rows if r.get("image_threshold") is not None), None)
    if used:
        print(f"thresholds: image {used['image_threshold']:.6g}, pixel {used['pixel_threshold']:.6g}, region"
              f" {used['region_threshold']:.6g} (raw; a score over 1 is a defect: 0 is a typical good image)")
    for r in rows:
        if not r["error"]:
            area = "" if r["defect_area_px"] is None else f"  {r['defect_area_px']:>7} px in {r['region_count']:>2} regions"
            score = f"{r['raw_score']:.6g} raw" if r["score"] is None else f"{r['score']:7.3f}"
            print(f"{score}  {r['label'] or '-':<6}{area}  {as_text(r['path'])}")
    summary = summarize(rows, None)
    mvtec = "good" in summary["folders"]  # then the other folders are defect types
    for name, f in summary["folders"].items():
        if f["flagged_rate"] is not None:
            meaning = ", false-positive rate" if name == "good" else ", recall" if mvtec else ""
            print(f"{name}: {f['defect']}/{f['defect'] + f['ok']} flagged as defect ({f['flagged_rate']:.1%}{meaning})")
    print(f"{summary['scored']} scored, {summary['skipped']} skipped" + (
        " (each with its reason above, and in the error column)" if summary["skipped"] else ""))
    print(f"-> {as_text(str(output))}")
    if rows and not summary["scored"]:
        raise CflowInputError(f"none of the {len(rows)} images could be scored: see the reasons above")


def _check_ranks(args: argparse.Namespace) -> None:
    """Checks the compute flags of `train --nproc N`. On CUDA each rank trains on its own GPU,
    cuda:LOCAL_RANK, and NCCL refuses two ranks on one: a GPU named by index, or more ranks than GPUs,
    is refused before torchrun starts instead of failing inside a rank."""
    if Compute(**_compute(args)).type != "cuda":
        return
    if args.device.strip().lower().startswith("cuda:"):
        raise CflowInputError(f"--device {args.device} --nproc {args.nproc}: every rank would train on that one GPU: "
                              "use --device cuda (one GPU per rank) or --nproc 1")
    if args.nproc > cuda_count():
        raise CflowInputError(f"--nproc {args.nproc}: this machine has {cuda_count()} CUDA GPU(s), one per rank: "
                              f"use --nproc {cuda_count()} or fewer, or --device cpu")


def _torchrun(argv: list[str], nproc: int) -> int:
    """`cflow-ad train --nproc N ...` = `torchrun --standalone --nproc-per-node N -m cflow_ad train ...`."""
    import subprocess

    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "cflow_ad", *rest]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, available_cores() // nproc)))}
    return subprocess.run(cmd, env=env).returncode


def _lean(args: argparse.Namespace) -> bool:
    """Whether a predict / serve run scores an exported .onnx file, which needs no PyTorch."""
    from .inference import is_onnx_file

    return is_onnx_file(args.model) and getattr(args, "normalization", None) != "paper"


def _score_onnx(args: argparse.Namespace) -> int:
    """`predict` and `serve` of an .onnx file, without importing PyTorch (the lean runtime)."""
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise CflowInputError(f"--workers must be >= 0, got {args.workers}")
    from .inference import check_onnx_precision, check_quantize

    check_onnx_precision(args.precision, args.flow_precision)
    check_quantize(args.quantize, "onnx", onnx_file=True)
    thresholds = {"target_fpr": args.target_fpr, "image_threshold": args.image_threshold,
                  "pixel_threshold": args.pixel_threshold, "min_defect_area": args.min_defect_area,
                  "all_regions": args.all_regions}
    if args.command == "serve":
        from .serve import Limits, serve

        limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
        serve(args.model, args.host, args.port, "onnx", limits, device=args.device, threads=args.threads, **thresholds)
        return 0
    from .inference import predict_onnx

    rows = predict_onnx(args.model, args.paths, args.output, overlays=args.overlays, progress=not args.quiet,
                        warn=lambda m: print(m, file=sys.stderr), masks=args.masks, heatmaps=args.heatmaps,
                        csv_summary=args.csv, json_summary=args.json, device=args.device, workers=args.workers,
                        threads=args.threads, legend=args.legend, **thresholds)
    _print_predictions(rows, args.output)
    return 0


def _require_torch(args: argparse.Namespace) -> None:
    """One line, not a traceback, where the lean install (no PyTorch) is asked for more than scoring .onnx."""
    try:
        import torch  # noqa: F401
    except ImportError:
        from .inference import is_onnx_file

        fix = "pip install 'cflow-ad[train]'"
        if args.command not in ("predict", "serve"):
            raise CflowInputError(f"'cflow-ad {args.command}' needs PyTorch, which the lean install leaves out: {fix}") from None
        if is_onnx_file(args.model):
            raise CflowInputError(f"--normalization paper needs PyTorch: {fix}, or leave the option out") from None
        raise CflowInputError(f"'{args.model}' is not an exported .onnx model, and without PyTorch only those are "
                              f"scored: run 'cflow-ad export' where PyTorch is installed, or {fix}") from None


def run(argv: list[str] | None = None) -> int:
    """The command `argv` asks for; its exit status, or its `CflowInputError` (and any other error) raised."""
    argv = sys.argv[1:] if argv is None else argv
    return _run(build_parser().parse_args(argv), argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command in ("predict", "serve") and _lean(args):
        return _score_onnx(args)
    _require_torch(args)
    if args.command == "train" and args.nproc > 1:
        if args.category == "all":
            raise CflowInputError("--nproc trains one category in several processes: with --category all use --jobs")
        _check_ranks(args)  # a device that is not there: one line here, not one per rank
        return _torchrun(argv, args.nproc)
    threads = set_threads(args.threads)  # torchrun: the node's cores shared by its ranks
    from . import api

    progress = not args.quiet
    if args.command == "train":
        config = _config_from(args)
        if args.category == "all":
            from .categories import summary_markdown, train_all

            rows = train_all(config, _source_from(args), args.output, args.jobs, threads, args.resume,
                             log=lambda m: print(m, file=sys.stderr), **_compute(args))
            print(summary_markdown(rows), end="")
            return 1 if any(r["status"] != "ok" for r in rows) else 0
        path = api.train(config, args.output, _source_from(args), progress=progress, resume=args.resume,
                         **_compute(args))
        if os.environ.get("RANK", "0") == "0":  # torchrun's rank; the process group is left by now
            print(path)
    elif args.command == "test":
        metrics = api.test(
            args.model, args.output, _source_from(args),
            normalization=args.normalization, progress=progress, memory_mb=args.memory_mb, runtime=args.runtime,
            quantize=args.quantize, **_compute(args),
        )
        _print_metrics(metrics)
        print(args.output / "metrics.json")
    elif args.command == "report":
        from .report import write_report

        print(write_report(args.results, args.output))
    elif args.command == "predict":
        rows = api.predict(
            args.model, args.paths, args.output, args.normalization, overlays=args.overlays, progress=progress,
            warn=lambda m: print(m, file=sys.stderr), runtime=args.runtime, masks=args.masks, heatmaps=args.heatmaps,
            csv_summary=args.csv, json_summary=args.json, target_fpr=args.target_fpr,
            image_threshold=args.image_threshold, pixel_threshold=args.pixel_threshold,
            min_defect_area=args.min_defect_area, all_regions=args.all_regions, legend=args.legend,
            quantize=args.quantize, **_compute(args))
        _print_predictions(rows, args.output)
    elif args.command == "calibrate":
        t = api.calibrate(args.model, args.output, _source_from(args), target_fpr=args.target_fpr, f1=args.f1,
                          progress=progress, **_compute(args))
        print(f"image threshold {t.image:.6g}, pixel threshold {t.pixel:.6g} ({t.source}) -> {args.output or args.model}")
    elif args.command == "serve":
        from .serve import Limits, serve

        limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
        serve(args.model, args.host, args.port, args.runtime, limits, args.target_fpr, args.image_threshold,
              args.pixel_threshold, min_defect_area=args.min_defect_area, all_regions=args.all_regions,
              threads=threads, quantize=args.quantize,
              **_compute(args))
    elif args.command == "export":
        print(api.export(args.model, args.output, args.format, args.quantize))
    elif args.command == "experiment":
        from . import experiments

        base = _config_from(args)
        common = {"progress": progress, "log": lambda m: print(m, file=sys.stderr), "compute": _compute(args)}
        if args.name == "ablation":
            experiments.ablation(base, args.data, args.categories, args.output, args.variants, **common)
        elif args.name == "compare":
            experiments.compare(base, args.data, args.categories, args.output, args.methods, args.seeds or [0, 1, 2, 3],
                                paper_taps=args.paper_taps, **common)
        elif args.name == "suite":
            experiments.suite(base, args.data, args.categories, args.output, args.seeds or [0], **common)
        else:
            experiments.figures(base, args.data, args.categories, args.output, **common)
        print((args.output / f"{args.name}.md").read_text(), end="")
    elif args.command == "demo":
        from .demo import run_demo

        print(json.dumps(run_demo(args.output, progress=progress), indent=2))
    return 0


def _error_line(exc: BaseException, debug: bool) -> tuple[str, int]:
    """The one line and exit status for an error that reached the command line (see EXIT_STATUS)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, CflowInputError):
        return f"cflow-ad: error: {text}", 2
    hint = "" if debug else " (run 'cflow-ad --debug ...' for the traceback)"
    if isinstance(exc, OSError):  # the system refused: a full disk, permissions, a file that went away
        return f"cflow-ad: error: {type(exc).__name__}: {text}{hint}", 2
    return f"cflow-ad: internal error: {type(exc).__name__}: {text}{hint}; please report it", 70


def main(argv: list[str] | None = None) -> None:
    """The `cflow-ad` command: every error ends as one line on stderr and an exit status (EXIT_STATUS),
    with the traceback above it under --debug."""
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed as in the CSV, never fails
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=NAMES)
    args = build_parser().parse_args(argv)
    try:
        code = _run(args, argv)
    except KeyboardInterrupt as exc:
        print(f"cflow-ad: {exc or 'interrupted'}", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001  (the last line of defence: one line, never a bare traceback)
        if args.debug:
            traceback.print_exc()
        line, code = _error_line(exc, args.debug)
        print(line, file=sys.stderr)
    sys.exit(code)
