"""`cflow-ad report`: the artifacts `test` writes for it, the HTML page, its errors, and how a browser shows it."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cflow_ad import api, cli
from cflow_ad.errors import CflowInputError
from cflow_ad.report import GT_OUTLINE, write_report
from cflow_ad.source import DataSource

from .browser import chromium_page
from .conftest import strict_json, without_masks


@pytest.fixture(scope="module")
def results(padim_checkpoint, synthetic_root, tmp_path_factory):
    """A test run of a model with calibrated thresholds, so the decision parts are filled in."""
    out = tmp_path_factory.mktemp("test_out")
    api.test(padim_checkpoint, out, source=DataSource(synthetic_root, "synthetic"), progress=False)
    return out


@pytest.fixture(scope="module")
def report(results):
    return write_report(results)


def _copy(results, tmp_path):
    return shutil.copytree(results, tmp_path / "results")


def test_curves_are_monotonic_from_origin_to_their_end(results):
    curves = json.loads((results / "curves.json").read_text())
    for name, key, end in (("image_roc", "tpr", 1.0), ("pixel_roc", "tpr", 1.0), ("pro", "pro", None)):
        x, y = np.array(curves[name]["fpr"]), np.array(curves[name][key])
        assert 2 <= x.size <= 1100 and x.shape == y.shape, name
        assert (x[0], y[0]) == (0.0, 0.0), name
        assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0), name
        assert x[-1] == pytest.approx(end if end is not None else curves["pro"]["fpr_limit"]), name
        if end is not None:
            assert y[-1] == pytest.approx(1.0), name
    assert curves["pro"]["fpr_limit"] == 0.3
    metrics = json.loads((results / "metrics.json").read_text())
    pro = curves["pro"]
    assert np.trapezoid(pro["pro"], pro["fpr"]) / 0.3 == pytest.approx(metrics["aupro"], abs=0.02)  # thinned
    assert np.trapezoid(curves["image_roc"]["tpr"], curves["image_roc"]["fpr"]) == pytest.approx(metrics["image_auroc"])


def test_cases_are_the_worst_scored_images_with_outlined_masks(results):
    cases = json.loads((results / "cases" / "cases.json").read_text())
    with open(results / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    good = sorted((float(r["score"]) for r in rows if r["label"] == "0"), reverse=True)
    bad = sorted(float(r["score"]) for r in rows if r["label"] == "1")
    fp = [c for c in cases if c["kind"] == "false positive"]
    fn = [c for c in cases if c["kind"] == "false negative"]
    assert [c["score"] for c in fp] == pytest.approx(good[:4], abs=1e-6)
    assert [c["score"] for c in fn] == pytest.approx(bad[:4], abs=1e-6)
    assert {c["label"] for c in fp} == {0} and {c["label"] for c in fn} == {1}
    threshold = json.loads((results / "metrics.json").read_text())["thresholds"]["image"]
    for c in cases:
        rgb = np.asarray(Image.open(results / "cases" / c["file"]))
        assert rgb.shape == (128, 128, 3)
        has_outline = bool(np.all(rgb == GT_OUTLINE, axis=-1).any())
        assert has_outline == (c["label"] == 1), c  # synthetic defects all have masks
        assert c["wrong"] == ((c["raw_score"] > threshold) == (c["kind"] == "false positive"))
        assert (c["score"] > 1) == (c["raw_score"] > threshold)  # one scale: 1 is the image threshold


def test_report_holds_metrics_and_embedded_figures_only(results, report):
    page = report.read_text()
    metrics = json.loads((results / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert f"{100 * metrics[key]:.1f}%" in page
    for name, m in metrics["per_type"].items():
        assert name in page and f"{100 * m['image_auroc']:.1f}%" in page
    assert page.count("data:image/png;base64,") == 3 + 8  # curves, histogram, colour bar, 4 + 4 cases
    assert "heat-map colour bar" in page and "Defect regions" in page and "region recall" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "Decision at threshold" in page and f"{100 * metrics['at_threshold']['image_recall']:.1f}" in page


def test_report_decision_table_only_with_thresholds(results, tmp_path):
    folder = _copy(results, tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.pop("at_threshold", None)
    metrics.pop("thresholds", None)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert "Decision at threshold" not in write_report(folder).read_text()

    metrics.update(thresholds={"image": 1.2345, "pixel": 0.5, "source": "<held-out> good images", "target_fpr": 0.01},
                   at_threshold={"image_fpr": 0.125, "image_recall": 0.875, "pixel_fpr": 0.0123, "pixel_recall": 0.5})
    (folder / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(folder, tmp_path / "other" / "r.html").read_text()
    assert "Decision at threshold" in page and "1.234" in page
    for value in ("12.5%", "87.5%", "1.2%", "50.0%"):
        assert value in page
    assert "&lt;held-out&gt; good images" in page and "<held-out>" not in page


def test_missing_curves_is_one_clear_line(results, tmp_path):
    folder = _copy(results, tmp_path)
    (folder / "curves.json").unlink()
    with pytest.raises(CflowInputError) as err:
        write_report(folder)
    message = str(err.value)
    assert "\n" not in message and "curves.json" in message and "cflow-ad test --output" in message


def test_cli_writes_the_report(results, tmp_path, capsys):
    target = tmp_path / "report.html"
    assert cli.run(["--quiet", "report", "--results", str(results), "--output", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert target.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", "--results", str(tmp_path / "nowhere")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cflow-ad: error:") and "metrics.json" in err and "\n" not in err


def test_report_renders_offline_in_chromium(report):
    with chromium_page() as page:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        bar = page.eval_on_selector("img[alt='heat-map colour bar']", "e => e.naturalHeight")
        png = page.screenshot(full_page=True)
    assert len(images) == 11 and all(done and width > 0 for done, width in images), images
    assert bar == 256  # the colour bar is drawn
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert shot.shape[1] == 1280 and shot.shape[0] > 1500
    assert shot.std() > 20  # not a blank page


def test_worst_cases_kept_batch_by_batch_are_those_of_a_stable_sort():
    from cflow_ad.report import WorstCases

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    labels = (rng.random(40) < 0.5).astype(int)
    cases = WorstCases(4)
    for i in range(0, 40, 3):
        n = len(scores[i : i + 3])
        paths = [str(j) for j in range(i, i + n)]
        cases.add(torch.full((n, 2, 2), float(i)), torch.tensor(scores[i : i + 3]),
                  torch.zeros(n, 2, 2, dtype=torch.bool), labels[i : i + 3], ["t"] * n, paths)
    fp = sorted((j for j in range(40) if labels[j] == 0), key=lambda j: -scores[j])[:4]
    fn = sorted((j for j in range(40) if labels[j] == 1), key=lambda j: scores[j])[:4]
    assert [int(r[4]) for r in cases.worst("fp")] == fp and [int(r[4]) for r in cases.worst("fn")] == fn


def test_report_of_a_set_without_masks_says_n_a(padim_checkpoint, synthetic_root, tmp_path):
    root = without_masks(synthetic_root, tmp_path / "root")
    out = tmp_path / "t"
    api.test(padim_checkpoint, out, DataSource(root, "synthetic"), progress=False)
    for name in ("metrics.json", "curves.json", "cases/cases.json"):
        strict_json((out / name).read_text())
    page = write_report(out).read_text()
    metrics = page.split("<h2>Metrics</h2>")[1].split("<h3>")[0]
    assert metrics.count("n/a") == 2 and "pixel metrics on the 6 of them with a mask" in metrics
    per_type = page.split("<h3>Per defect type")[1].split("</table>")[0]
    assert per_type.count("n/a") == 2  # scratch and spot: pixel AUROC
