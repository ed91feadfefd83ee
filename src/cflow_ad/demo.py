"""Offline demo: synthetic textures with drawn defects -> train -> test -> report -> predictions.

Needs no internet and no dataset: the MobileNetV2 weights come from an installed
package and the images are generated deterministically.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import api
from .config import CFlowConfig
from .data import make_synthetic_mvtec
from .report import write_report
from .source import DataSource

# 128 px synthetic images: taps at strides 4/8/16 keep the feature maps fine enough, and four passes
# separate its defects fully (no --min-steps floor: the demo stays about 30 s).
DEMO_CONFIG = CFlowConfig(image_size=128, pool_layers=3, last_stride=16, border_pad=16, epochs=2, sub_epochs=2,
                          batch_size=8, min_steps=0)


def run_demo(output: str | Path = "runs/demo", progress: bool = True) -> dict:
    """Run the whole pipeline in `output` (rewritten each time) and return the test metrics."""
    out = Path(output)
    if (out / "data").exists():
        shutil.rmtree(out / "data")
    root = make_synthetic_mvtec(out / "data", n_train=60, n_test_good=12, n_test_defect=12, size=128, seed=0)
    print(f"synthetic data: {root / 'synthetic'}")
    source = DataSource(root, "synthetic")
    model_path = api.train(DEMO_CONFIG, out / "model", source, progress=progress)
    print(f"model: {model_path}")
    metrics = api.test(model_path, out / "test", source, progress=progress)
    report = write_report(out / "test")
    rows = api.predict(model_path, [root / "synthetic" / "test"], out / "predict", progress=progress)
    print(f"metrics: {out / 'test' / 'metrics.json'}; report: {report}")
    print(f"{len(rows)} verdicts, overlays, masks and heat maps in {out / 'predict'}")
    return {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "at_threshold")}
