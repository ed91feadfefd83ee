"""On a CUDA GPU (marker `cuda`, skipped without one): the GPU scores what the CPU scores, trains as well,
resumes to the same model, and trains data-parallel on two GPUs. Plus one CPU test that keeps
benchmarks/speed.py's device mode, the GPU benchmark's code path, running where CI runs.

    pytest -m cuda tests/test_cuda.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cflow_ad import DataSource, api
from cflow_ad.checkpoint import load_checkpoint, read_metadata
from cflow_ad.config import NORMALIZATIONS
from cflow_ad.device import Compute, cuda_available, cuda_count

from .conftest import TINY
from .test_distributed import _train as _train_distributed
from .test_resume import LONG, _train_cmd

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def gpu(test):
    """Marked `cuda`, so that `pytest -m cuda` selects it, and skipped where PyTorch sees no GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")(test))


@gpu
@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_cuda_maps_and_scores_match_the_cpu(mode, tiny_checkpoint, synthetic_root):
    """In every scoring mode: log (the default), stateless, and paper (normalised over the set scored)."""
    dataset = DataSource(synthetic_root, "synthetic").open("test", TINY.image_size)
    cpu, cuda = (api.score_dataset(load_checkpoint(tiny_checkpoint), dataset, mode,
                                   compute=Compute(device, workers=0))[:2] for device in ("cpu", "cuda"))
    for got, want in zip(cuda, cpu):  # relative to the values' scale: map values cross zero
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="this onnxruntime has no CUDA execution provider (onnxruntime-gpu)")
def test_onnx_on_cuda_scores_like_the_cpu(tiny_checkpoint, synthetic_root, tmp_path):
    """The exported model under onnxruntime's CUDA provider: the CPU provider's scores, and metrics.json names the
    provider that ran."""
    onnx = tmp_path / "model.onnx"
    api.export(tiny_checkpoint, onnx)
    source = DataSource(synthetic_root, "synthetic")
    got = {device: api.test(onnx, tmp_path / device, source, progress=False, device=device) for device in ("cpu", "cuda")}
    assert got["cuda"]["device"] == "CUDAExecutionProvider" and got["cpu"]["device"] == "CPUExecutionProvider"
    for key in METRICS:
        assert got["cuda"][key] == pytest.approx(got["cpu"][key], abs=1e-3), key


@gpu
def test_training_on_cuda_reaches_the_cpu_metrics(synthetic_root, tmp_path):
    metrics, source = {}, DataSource(synthetic_root, "synthetic")
    for device in ("cpu", "cuda"):
        path = api.train(TINY, tmp_path / device, source, progress=False, log=lambda m: None, device=device)
        metrics[device] = api.test(path, None, source, progress=False, device=device)
    for key in METRICS:
        assert metrics["cuda"][key] == pytest.approx(metrics["cpu"][key], abs=0.005), key  # 0.5 points


@gpu
def test_bf16_flow_products_on_cuda_stay_close(tiny_checkpoint, synthetic_root):
    """The flows' products in bf16 (7 mantissa bits): the likelihood per dimension within 0.01 of fp32's, or 1%
    where it is beyond -1 (a defect's fibers reach -245 here, and the rounding scales with |u|^2; on the CPU:
    0.3%), in training's forward and backward and in the folded form, with TF32 left off."""
    flows = "bf16"
    model = load_checkpoint(tiny_checkpoint)
    x = torch.stack([api.D.load_image(p, TINY.image_size)
                     for p in sorted((synthetic_root / "synthetic" / "test" / "spot").iterdir())[:2]]).cuda()
    logs, grads = {}, {}
    for precision in ("fp32", flows):
        Compute("cuda", flow_precision=precision).place(model)
        with torch.no_grad():
            features = model.features(x)
            logs[precision] = torch.cat([m.flatten() for m in model.log_density_maps(features)])
        fibers, log_det = model.fibers(0, features[0])
        lp = model.log_likelihood(0, fibers, log_det, tuple(features[0].shape[-2:]), model.decoders[0].log_prob)
        grads[precision] = torch.cat([g.flatten() for g in torch.autograd.grad(lp.sum(), model.decoders[0].parameters())])
        assert not torch.backends.cuda.matmul.allow_tf32 and logs[precision].dtype == lp.dtype == torch.float32
    assert ((logs[flows] - logs["fp32"]).abs() <= 0.01 * logs["fp32"].abs().clamp_min(1)).all()
    assert (grads[flows] - grads["fp32"]).norm() < 0.05 * grads["fp32"].norm()


def _cuda_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return _train_cmd(root, out, "--device", "cuda", *extra)


@pytest.fixture(scope="module")
def uninterrupted_cuda(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda-whole")
    subprocess.run(_cuda_cmd(synthetic_root, out), check=True, capture_output=True, timeout=600)
    ckpt = out / "model.safetensors"
    return ckpt, api.test(ckpt, None, source=DataSource(synthetic_root, "synthetic"), progress=False, device="cuda")


@gpu
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_run_stopped_on_cuda_resumes_to_the_same_model(sig, uninterrupted_cuda, synthetic_root, tmp_path):
    """As tests/test_resume.py on the CPU: stopped once the second epoch's state is saved, then resumed."""
    proc = subprocess.Popen(_cuda_cmd(synthetic_root, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    state = tmp_path / api.STATE_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and torch.load(state, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be stopped: {proc.stderr.read()}"
    proc.send_signal(sig)
    proc.communicate(timeout=300)
    assert torch.load(state, weights_only=True)["epoch"] < LONG.epochs * LONG.sub_epochs
    extra = ["--memory-mb", "0"] if sig == signal.SIGKILL else []  # after a kill, resume without any cache
    resumed = subprocess.run(_cuda_cmd(synthetic_root, tmp_path, "--resume", *extra), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    ckpt, metrics = uninterrupted_cuda
    a, b = load_checkpoint(ckpt).state_dict(), load_checkpoint(tmp_path / "model.safetensors").state_dict()
    for key in a:  # the same kernels on the same inputs: any resume error would show far above this
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    got = api.test(tmp_path / "model.safetensors", None, source=DataSource(synthetic_root, "synthetic"), progress=False,
                   device="cuda")
    for key in METRICS:
        assert got[key] == pytest.approx(metrics[key], abs=1e-4), key


@pytest.mark.cuda
@pytest.mark.skipif(cuda_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_the_model_of_one(synthetic_root, tmp_path):
    """tests/test_distributed.py's check with NCCL: two GPU ranks follow one GPU's loss curve."""
    one = _train_distributed(synthetic_root, tmp_path / "one", "--device", "cuda")
    two = _train_distributed(synthetic_root, tmp_path / "two", "--nproc", "2", "--device", "cuda")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    h1, h2 = (read_metadata(tmp_path / name / "model.safetensors")["extra"]["history"] for name in ("one", "two"))
    assert h1["processes"] == 1 and h2["processes"] == 2
    np.testing.assert_allclose(h2["epoch_loss"], h1["epoch_loss"], rtol=1e-3)
    m1, m2 = (api.test(tmp_path / name / "model.safetensors", None, source=DataSource(synthetic_root, "synthetic"),
                       progress=False, device="cuda") for name in ("one", "two"))
    for key in METRICS:
        assert m2[key] == pytest.approx(m1[key], abs=0.02), key


def test_speed_benchmark_device_mode_runs_on_the_cpu(tmp_path):
    """The smallest selection of `speed.py --device`: seconds where bf16 is native; without avx512_bf16 or
    amx_bf16 bf16 is emulated about 10x slower, and a busy CI machine slower still (the timeout guards a hang)."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", "cpu", "--encoders", "resnet18",
           "--sizes", "256", "--precisions", "fp32", "bf16", "--batches", "1", "--repeats", "1", "--b1-calls", "1",
           "--warmup", "1", "--threads", "2", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "| R18 | 256 | bf16 | 1 |" in run.stdout and "| 80 | 34 |" in run.stdout  # beside the paper's fps
    rows = json.loads(out.read_text())["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"] and all(r["cflow_ips"] > 0 for r in rows)
