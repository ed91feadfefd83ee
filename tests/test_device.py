"""Device, precision and worker settings on the CPU (CI has no GPU): explicit `--device cpu` on every
command, clean refusals of what this machine lacks, bf16 autocast, and results identical for any
number of image-decoding workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cflow_ad import DataSource, api
from cflow_ad.checkpoint import load_checkpoint, read_metadata
from cflow_ad.cli import main
from cflow_ad.device import Compute, available_cores, cuda_available, default_workers, resolve_device
from cflow_ad.errors import CflowInputError
from cflow_ad.inference import Inspector

from .conftest import TINY

no_cuda = pytest.mark.skipif(cuda_available(), reason="checks the refusals of a machine without CUDA")


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cflow-ad: error:") and "\n" not in err
    return err


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if cuda_available() else torch.device("cpu"))
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(CflowInputError, match="--device"):
            resolve_device(bad)
    with pytest.raises(CflowInputError, match="--workers"):
        Compute("cpu", workers=-1)
    with pytest.raises(CflowInputError, match="precision"):
        Compute("cpu", precision="int8")
    assert Compute("cpu", workers=0).loader_workers == 0
    cores = available_cores()
    assert Compute("cpu").loader_workers == default_workers() == (min(4, cores - 1) if cores > 2 else 0)


@no_cuda
def test_cuda_and_fp16_refused_without_a_gpu():
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(CflowInputError, match="no CUDA GPU"):
            Compute(name)
    with pytest.raises(CflowInputError, match="fp16 needs a GPU"):
        Compute("cpu", precision="fp16")


@no_cuda
@pytest.mark.parametrize("command", [
    ["train", "--data", "ROOT", "--category", "synthetic", "--output", "OUT"],
    ["train", "--data", "ROOT", "--category", "all", "--output", "OUT"],
    ["train", "--nproc", "2", "--data", "ROOT", "--category", "synthetic", "--output", "OUT"],
    ["test", "--model", "MODEL", "--data", "ROOT", "--category", "synthetic", "--output", "OUT"],
    ["predict", "--model", "MODEL", "ROOT", "--output", "OUT"],
    ["calibrate", "--model", "MODEL", "--data", "ROOT", "--category", "synthetic"],
    ["serve", "--model", "MODEL"],
    ["experiment", "compare", "--data", "ROOT", "--output", "OUT"],
])
def test_every_command_refuses_cuda_in_one_line(command, synthetic_root, tiny_checkpoint, tmp_path, capsys):
    argv = [str(synthetic_root) if a == "ROOT" else str(tiny_checkpoint) if a == "MODEL" else
            str(tmp_path / "out") if a == "OUT" else a for a in command]
    err = _one_line_error(capsys, ["--quiet", *argv, "--device", "cuda"])
    assert "--device cuda" in err and "--device cpu" in err
    assert "fp16" in _one_line_error(capsys, ["--quiet", *argv, "--device", "cpu", "--precision", "fp16"])
    assert not (tmp_path / "out").exists()  # refused before any work


def test_every_command_with_device_cpu(synthetic_root, tmp_path, capsys):
    flags = ["--image-size", "64", "--pool-layers", "2", "--last-stride", "16", "--coupling-layers", "1",
             "--condition-dim", "16", "--epochs", "1", "--sub-epochs", "1", "--min-steps", "0", "--batch-size", "8", "--fiber-batch", "256",
             "--calibration-fraction", "0.25"]
    cpu = ["--device", "cpu", "--workers", "1"]
    data = ["--data", str(synthetic_root), "--category", "synthetic"]
    with pytest.raises(SystemExit) as done:
        main(["--quiet", "train", *data, "--output", str(tmp_path / "m"), *flags, *cpu])
    assert done.value.code == 0
    model = tmp_path / "m" / "model.safetensors"
    assert "device" not in read_metadata(model)["config"]  # a run setting, not part of the model
    assert all(t.device.type == "cpu" for t in load_file(str(model)).values())
    for argv in (["test", "--model", str(model), *data, "--output", str(tmp_path / "t")],
                 ["calibrate", "--model", str(model), *data, "--output", str(tmp_path / "c.safetensors")],
                 ["predict", "--model", str(model), str(synthetic_root / "synthetic" / "test" / "spot"),
                  "--output", str(tmp_path / "p")]):
        with pytest.raises(SystemExit) as done:
            main(["--quiet", *argv, *cpu])
        assert done.value.code == 0, argv[0]
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["device"] == "cpu, fp32" and 0 <= metrics["image_auroc"] <= 1
    assert json.loads((tmp_path / "p" / "predictions.json").read_text())["device"] == "cpu, fp32"
    assert (tmp_path / "c.safetensors").is_file()


def test_a_model_runs_in_the_precision_it_was_fitted_in(padim_checkpoint, synthetic_root, tmp_path, capsys):
    """Issue 34: an fp32 fit scored in bf16 moved its scores, so its thresholds no longer held their false-positive
    rate. Another precision is refused in one line until `calibrate --precision` fits the thresholds in it."""
    data = ["--data", str(synthetic_root), "--category", "synthetic"]
    spot = str(synthetic_root / "synthetic" / "test" / "spot")
    fp32 = str(padim_checkpoint)
    bf16 = ["--device", "cpu", "--precision", "bf16"]
    for argv in (["test", "--model", fp32, *data, "--output", str(tmp_path / "t")],
                 ["predict", "--model", fp32, spot, "--output", str(tmp_path / "p")]):
        err = _one_line_error(capsys, ["--quiet", *argv, *bf16])
        assert "fitted in fp32" in err and "--precision fp32" in err and "calibrate --precision bf16" in err
    assert not (tmp_path / "t" / "metrics.json").exists() and not (tmp_path / "p" / "predictions.csv").exists()
    with pytest.raises(CflowInputError, match="fitted in fp32"):
        Inspector(fp32, "torch", compute=Compute("cpu", "bf16"))  # what `serve --runtime torch` loads
    recalibrated = tmp_path / "bf16.safetensors"
    with pytest.raises(SystemExit) as done:
        main(["--quiet", "calibrate", "--model", fp32, *data, "--output", str(recalibrated), *bf16])
    assert done.value.code == 0
    assert read_metadata(recalibrated)["precision"] == "bf16" and read_metadata(fp32)["precision"] == "fp32"
    metrics = api.test(recalibrated, None, DataSource(synthetic_root, "synthetic"), progress=False, device="cpu",
                       precision="bf16")
    assert metrics["device"] == "cpu, bf16" and metrics["thresholds"]
    rows = api.predict(recalibrated, [spot], tmp_path / "p2", progress=False, device="cpu", precision="bf16")
    assert rows and all(r["label"] in ("ok", "defect") for r in rows)
    with pytest.raises(CflowInputError, match="fitted in bf16: run it with --precision bf16"):
        api.test(recalibrated, None, DataSource(synthetic_root, "synthetic"), progress=False, device="cpu")
    with pytest.raises(CflowInputError, match="calibrate --precision fp32"):  # onnxruntime runs fp32
        api.export(recalibrated, tmp_path / "m.onnx")


def test_bf16_autocasts_the_encoder_only(tiny_checkpoint, synthetic_root):
    """bf16 runs the CNN in bfloat16 and hands fp32 features to the flows, close to the fp32 ones."""
    model = load_checkpoint(tiny_checkpoint)
    x = torch.stack([api.D.load_image(p, TINY.image_size)
                     for p in sorted((synthetic_root / "synthetic" / "test" / "spot").iterdir())[:2]])
    exact = model.features(x)
    Compute("cpu", precision="bf16").place(model)
    low = model.features(x)
    assert all(f.dtype == torch.float32 for f in low)
    for a, b in zip(exact, low):
        assert not torch.equal(a, b)  # it did run in reduced precision
        assert (a - b).norm() / a.norm() < 0.1  # 8 mantissa bits through the CNN: about 6% here
    Compute("cpu").place(model)
    assert all(torch.equal(a, b) for a, b in zip(exact, model.features(x)))


def test_workers_give_identical_results(synthetic_root, tiny_checkpoint, tmp_path):
    """Decoding in 0 or 2 worker processes: the same model (images decoded every epoch, no caches), the
    same test metrics and scores, the same predictions."""
    cfg = TINY.replace(memory_mb=0, sub_epochs=1)
    source = DataSource(synthetic_root, "synthetic")
    models = [api.train(cfg, tmp_path / f"m{w}", source, progress=False, log=lambda m: None, device="cpu", workers=w)
              for w in (0, 2)]
    a, b = (load_file(str(m)) for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tests = [api.test(tiny_checkpoint, tmp_path / f"t{w}", source, progress=False, device="cpu", workers=w)
             for w in (0, 2)]
    for key in ("image_auroc", "pixel_auroc", "aupro", "per_type"):
        assert tests[0][key] == tests[1][key]
    assert (tmp_path / "t0" / "scores.csv").read_text() == (tmp_path / "t2" / "scores.csv").read_text()
    folder = synthetic_root / "synthetic" / "test"
    rows = [api.predict(tiny_checkpoint, [folder], tmp_path / f"p{w}", progress=False, overlays=False, heatmaps=False,
                        device="cpu", workers=w, image_threshold=0.5, pixel_threshold=0.5) for w in (0, 2)]
    assert [{k: v for k, v in r.items() if k != "mask"} for r in rows[0]] == \
        [{k: v for k, v in r.items() if k != "mask"} for r in rows[1]]
    assert all(Path(r0["mask"]).read_bytes() == Path(r2["mask"]).read_bytes() for r0, r2 in zip(*rows))


def test_a_bad_file_in_a_worker(synthetic_root, tiny_checkpoint, tmp_path):
    """In a worker process a corrupt image still stops `test` with its one-line error, and `predict`
    still skips it, reports it and scores the rest."""
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    bad = root / "synthetic" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:80])
    with pytest.raises(CflowInputError) as caught:
        api.test(tiny_checkpoint, None, DataSource(root, "synthetic"), progress=False, device="cpu", workers=2)
    message = str(caught.value)
    assert str(bad) in message and "\n" not in message and "Traceback" not in message
    warnings = []
    rows = api.predict(tiny_checkpoint, [bad.parent], tmp_path / "p", progress=False, warn=warnings.append,
                       device="cpu", workers=2)
    assert [r["path"] for r in rows if r["error"]] == [str(bad)]
    assert len(rows) == len(list(bad.parent.iterdir()))
    assert sum(1 for r in rows if r.get("raw_score") is not None) == len(rows) - 1
    assert len(warnings) == 2 and str(bad) in warnings[1]  # the missing-thresholds note, then the skipped file
    assert np.isfinite([r["raw_score"] for r in rows if not r["error"]]).all()


def test_onnx_reports_the_provider_that_ran_and_refuses_a_missing_cuda(tiny_checkpoint, synthetic_root, tmp_path,
                                                                       capsys):
    """metrics.json and predictions.json name onnxruntime's provider, not the device asked for; an explicit CUDA
    device without CUDA's provider is one line (this onnxruntime has only the CPU's)."""
    ort = pytest.importorskip("onnxruntime")
    onnx_file = api.export(tiny_checkpoint, tmp_path / "m.onnx")
    source = DataSource(synthetic_root, "synthetic")
    assert api.test(onnx_file, None, source, progress=False, device="auto")["device"] == "CPUExecutionProvider"
    assert api.test(tiny_checkpoint, None, source, progress=False, device="cpu",
                    runtime="onnx")["device"] == "CPUExecutionProvider"
    spot = str(synthetic_root / "synthetic" / "test" / "spot")
    with pytest.raises(SystemExit) as done:
        main(["--quiet", "predict", "--model", str(onnx_file), spot, "--output", str(tmp_path / "p")])
    assert done.value.code == 0
    assert json.loads((tmp_path / "p" / "predictions.json").read_text())["device"] == "CPUExecutionProvider"
    capsys.readouterr()  # the run's note that the model has no thresholds
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        err = _one_line_error(capsys, ["--quiet", "predict", "--model", str(onnx_file), spot, "--output",
                                       str(tmp_path / "q"), "--device", "cuda"])
        assert "--device cuda --runtime onnx" in err and "onnxruntime-gpu" in err
        assert not (tmp_path / "q" / "predictions.csv").exists()
