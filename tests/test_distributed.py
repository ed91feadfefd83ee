"""Data-parallel training: 2 CPU processes under torchrun (gloo) train the same model as 1 process with
the same global batch and seed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint, read_metadata
from cflow_ad.source import DataSource

from .conftest import TINY
from .test_device import _one_line_error
from .test_resume import _flags

# fiber_batch / locations must split evenly over the ranks for the same global step: 512 gives
# 2 map rows per step at stride 8 (256 locations) and 8 at stride 16 (64 locations).
SAME = TINY.replace(epochs=1, sub_epochs=4, fiber_batch=512)


def _train(root, out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cflow_ad", "--quiet", "train", "--data", str(root), "--category", "synthetic",
           "--output", str(out), *_flags(SAME), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_two_processes_match_one(synthetic_root, tmp_path):
    one = _train(synthetic_root, tmp_path / "one")
    two = _train(synthetic_root, tmp_path / "two", "--nproc", "2")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("model.safetensors") == 1  # only rank 0 reports and writes
    h1 = read_metadata(tmp_path / "one" / "model.safetensors")["extra"]["history"]
    h2 = read_metadata(tmp_path / "two" / "model.safetensors")["extra"]["history"]
    assert h1["processes"] == 1 and h2["processes"] == 2
    assert len(h1["epoch_loss"]) == len(h2["epoch_loss"]) == 4
    np.testing.assert_allclose(h2["epoch_loss"], h1["epoch_loss"], rtol=1e-3)  # the same curve, not just its shape
    r1, r2 = (load_checkpoint(tmp_path / name / "model.safetensors").activation_ranges for name in ("one", "two"))
    assert r1.any() and torch.allclose(r2, r1, rtol=1e-3, atol=1e-4)  # the ranks' int8 ranges were merged
    m1, m2 = (api.test(tmp_path / name / "model.safetensors", None, source=DataSource(synthetic_root, "synthetic"),
                       progress=False) for name in ("one", "two"))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert m2[key] == pytest.approx(m1[key], abs=0.02), key


def test_baselines_refuse_torchrun(synthetic_root, tmp_path):
    run = _train(synthetic_root, tmp_path, "--nproc", "2", "--method", "padim")
    assert run.returncode != 0 and "no training loop to distribute" in run.stderr


@pytest.mark.parametrize("device,nproc,refused", [
    ("cuda:0", 2, "--device cuda:0 --nproc 2"),  # two ranks on one GPU
    ("cuda", 3, "--nproc 3"),  # more ranks than GPUs
    ("auto", 3, "--nproc 3"),
    ("cuda", 2, None),  # a GPU per rank
    ("cpu", 3, None),  # gloo ranks share the CPU
])
def test_ranks_without_a_gpu_each_are_refused_before_torchrun(device, nproc, refused, monkeypatch, capsys):
    """Two GPUs, pretended: a refusal is one line, exit 2, and torchrun is never started."""
    from cflow_ad import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    started = []
    monkeypatch.setattr(cli, "_torchrun", lambda argv, n: started.append(n) or 0)
    argv = ["train", "--data", ".", "--category", "x", "--output", "o", "--device", device, "--nproc", str(nproc)]
    if refused is None:
        assert cli.run(argv) == 0 and started == [nproc]
        return
    err = _one_line_error(capsys, argv)
    assert refused in err and ("--device cuda " in err or "--nproc 2 or fewer" in err)
    assert started == []


def test_a_cuda_rank_makes_its_gpu_current_before_joining(monkeypatch):
    """Pretended: rank 1 of 2 on cuda:1 sets its device before the process group starts nccl, so that no
    rank opens a context on GPU 0."""
    from cflow_ad import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_DEVICE", distributed._DEVICE)  # restored afterwards
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, device_id: calls.append((backend, device_id)))
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    distributed.init_from_env(torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", torch.device("cuda", 1))]
    calls.clear()
    distributed.init_from_env(torch.device("cpu"))  # gloo ranks leave CUDA alone
    assert calls == [("gloo", None)]
