"""Shared fixtures: a tiny synthetic MVTec-layout set and a tiny trained model (built once)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cflow_ad import api
from cflow_ad.config import CFlowConfig
from cflow_ad.data import make_synthetic_mvtec
from cflow_ad.source import DataSource

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"

# Small but real: pretrained MobileNetV2, taps at strides 8 and 16, 2 couplings, 128 px.
TINY = CFlowConfig(image_size=128, border_pad=16, pool_layers=2, last_stride=16, coupling_layers=2, condition_dim=16, epochs=1, sub_epochs=2,
                   batch_size=8, fiber_batch=256, calibration_fraction=0.0, min_steps=0, seed=0)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity: Python's json writes them by default, but JSON has neither."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def without_masks(root: Path, dest: Path, drop: list[str] | None = None) -> Path:
    """A copy of the synthetic root at `dest` without its ground_truth folder, or without only the masks
    named in `drop` ('spot/000_mask.png'): a test set labelled per image, wholly or in part."""
    shutil.copytree(root, dest)
    truth = dest / "synthetic" / "ground_truth"
    if drop is None:
        shutil.rmtree(truth)
    for name in drop or []:
        (truth / name).unlink()
    return dest


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_mvtec(tmp_path_factory.mktemp("syn"), n_train=24, n_test_good=6, n_test_defect=6, size=128, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    return api.train(TINY, out, source=DataSource(synthetic_root, "synthetic"), progress=False, log=lambda m: None)


@pytest.fixture(scope="session")
def padim_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    """PaDiM separates the synthetic defects cleanly and trains in seconds: a model whose verdicts mean
    something, with thresholds calibrated on a quarter of the training images."""
    return api.train(TINY.replace(method="padim", calibration_fraction=0.25), tmp_path_factory.mktemp("padim"),
                     source=DataSource(synthetic_root, "synthetic"), progress=False, log=lambda m: None)
