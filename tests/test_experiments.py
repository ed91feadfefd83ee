"""The experiment commands on synthetic data with a tiny grid: tables, JSON, figures, reuse of runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cflow_ad import experiments
from cflow_ad.cli import run
from cflow_ad.config import CFlowConfig
from cflow_ad.errors import CflowInputError

from .conftest import TINY, strict_json, without_masks

# Smaller than TINY: 64 px, one coupling, one epoch (each run a few seconds).
SMALL = TINY.replace(image_size=64, coupling_layers=1, sub_epochs=1)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def test_compare_tables_all_methods_with_seeds(synthetic_root, out, capsys):
    args = ["--quiet", "experiment", "compare", "--data", str(synthetic_root), "--output", str(out), "--seeds", "0", "1",
            "--image-size", "64", "--border-pad", "16", "--pool-layers", "2", "--last-stride", "16", "--coupling-layers", "1",
            "--condition-dim", "16", "--epochs", "1", "--sub-epochs", "1", "--min-steps", "0", "--batch-size", "8", "--fiber-batch", "256",
            "--knn-images", "5"]
    assert run(args) == 0
    table = (out / "compare.md").read_text()
    assert table in capsys.readouterr().out
    payload = json.loads((out / "compare.json").read_text())
    runs = payload["results"]
    methods = ("cflow", "padim", "spade", "patchcore")
    assert [len(runs[m]["synthetic"]) for m in methods] == [2, 2, 1, 2]  # SPADE is deterministic
    for m in methods:
        for r in runs[m]["synthetic"]:
            assert r["image_auroc"] >= 0.8 and r["pixel_auroc"] >= 0.8, (m, r)
    cflow_row = next(line for line in table.splitlines() if line.startswith("| synthetic"))
    assert cflow_row.count("±") == 3  # cflow, padim and patchcore: two seeds; spade: one run
    seeds = {r["seed"] for r in runs["padim"]["synthetic"]}
    assert seeds == {0, 1}


def test_ablation_reuses_identical_runs(synthetic_root, out):
    base = SMALL  # differs from compare's runs only in knn_images, which cflow never reads
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/*/result.json")}
    payload = experiments.ablation(base, synthetic_root, ["synthetic"], out, ["UFLOW (no condition)"], log=lambda m: None)
    assert [r["variant"] for r in payload["rows"]] == ["base", "UFLOW (no condition)"]
    assert payload["rows"][1]["results"][0]["config"]["conditional"] is False
    after = {p: p.stat().st_mtime for p in out.glob("runs/*/*/result.json")}
    assert len(after) == len(before) + 1  # the base run is compare's cflow seed 0, not retrained
    assert experiments.run_key(SMALL) == experiments.run_key(SMALL.replace(knn_images=5))
    assert experiments.run_key(SMALL) != experiments.run_key(SMALL.replace(seed=1))
    assert all(after[p] == t for p, t in before.items())
    assert "UFLOW" in (out / "ablation.md").read_text()


def test_ablation_variants_follow_the_paper_grid():
    table = experiments.ablation_variants(TINY)
    assert table["4 couplings"] == {"coupling_layers": 4} and table["3 scales"] == {"pool_layers": 3}
    assert table["256 px"] == {"image_size": (256, 256)}
    assert "2 scales" not in table  # TINY already has 2: that row would repeat the base
    assert "mobilenet_v2" not in table  # the base encoder


def test_figures_write_grid_and_histogram(synthetic_root, out):
    payload = experiments.figures(SMALL, synthetic_root, None, out, log=lambda m: None)
    entry = payload["synthetic/cflow"]
    assert 0 < entry["f1"] <= 1
    for key in ("grid", "histogram"):
        with Image.open(entry[key]) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    padim = experiments.figures(SMALL.replace(method="padim"), synthetic_root, None, out, log=lambda m: None)
    assert sorted(padim) == ["synthetic/cflow", "synthetic/padim"]  # the cflow figures stay listed
    assert "| synthetic | padim |" in (out / "figures.md").read_text()


def test_unknown_category_is_one_clear_line(synthetic_root, out):
    with pytest.raises(CflowInputError, match="choose from synthetic"):
        experiments.compare(SMALL, synthetic_root, ["nope"], out)


def test_compare_averages_categories_per_seed(tmp_path):
    from cflow_ad.data import make_synthetic_mvtec

    for name in ("tiles", "plates"):
        make_synthetic_mvtec(tmp_path / "data", category=name, n_train=10, n_test_good=3, n_test_defect=3, size=64,
                             seed=len(name))
    payload = experiments.compare(SMALL, tmp_path / "data", None, tmp_path / "out", methods=["padim"], seeds=[0, 1],
                                  log=lambda m: None)
    runs = payload["results"]["padim"]
    assert sorted(runs) == ["plates", "tiles"]
    per_seed = [(runs["plates"][i]["pixel_auroc"] + runs["tiles"][i]["pixel_auroc"]) / 2 for i in range(2)]
    import statistics

    expected = f"{100 * statistics.mean(per_seed):.1f} ± {100 * statistics.stdev(per_seed):.1f}"
    table = (tmp_path / "out" / "compare.md").read_text()
    pixel = table.split("### Pixel AUROC")[1]
    assert f"| **average** | {expected} |" in pixel


def test_tables_and_figures_of_sets_without_masks(synthetic_root, tmp_path):
    assert experiments._pct([None, float("nan")]) == "n/a" and experiments._pct([0.5, None]) == "50.0"
    assert experiments._mean([None, 0.5, 0.7]) == pytest.approx(0.6) and experiments._mean([None]) is None
    root, out = without_masks(synthetic_root, tmp_path / "root"), tmp_path / "out"
    payload = experiments.compare(SMALL, root, None, out, methods=["padim"], seeds=[0, 1], log=lambda m: None)
    runs = payload["results"]["padim"]["synthetic"]
    assert all(r["image_auroc"] > 0.8 and r["pixel_auroc"] is None and r["aupro"] is None for r in runs)
    strict_json((out / "compare.json").read_text())
    for result in out.glob("runs/*/*/result.json"):
        strict_json(result.read_text())
    table = (out / "compare.md").read_text()
    image, pixel, pro = (table.split(f"### {title}")[1].split("###")[0] for title in ("Image", "Pixel", "AUPRO"))
    assert "±" in image and "| synthetic | n/a |" in pixel and "| synthetic | n/a |" in pro
    experiments.ablation(SMALL, root, None, out, ["base"], log=lambda m: None)
    assert "| base | " in (out / "ablation.md").read_text() and " | n/a | n/a | " in (out / "ablation.md").read_text()

    figures = experiments.figures(SMALL.replace(method="padim"), root, None, out, log=lambda m: None)
    entry = figures["synthetic/padim"]
    assert entry["grid"] is None and entry["f1"] is None and "no defect image has a mask" in entry["note"]
    assert "| synthetic | padim | n/a | n/a | no defect image has a mask" in (out / "figures.md").read_text()
    assert not list(out.glob("figure*.png"))

    partial = without_masks(synthetic_root, tmp_path / "partial", ["spot/000_mask.png", "spot/001_mask.png"])
    entry = experiments.figures(SMALL.replace(method="padim"), partial, None, tmp_path / "p",
                                log=lambda m: None)["synthetic/padim"]
    assert 0 < entry["f1"] <= 1 and Path(entry["grid"]).is_file() and Path(entry["histogram"]).is_file()
    assert not {str(partial / "synthetic" / "test" / "spot" / f"00{i}.png") for i in (0, 1)} & set(entry["examples"])


PROSE = """# A set

| split | class | images |
|---|---|---|
| train | good | 54 |

- Measured on 2 CPU cores, 256 px: cflow-ad defaults (main at 74516ce, 2026-12-07)
  96.27 / 80.46 / 77.05; anomalib 2.7 PaDiM with the same MobileNetV2, its own pipeline (2026-11-29) 93.8 / 74.4 / 76.9.
- Published (IM-IAD, 256 px; image AUROC / pixel AUROC / AUPRO): PatchCore 97.5 / 83.6 / 68.6, PaDiM 88.5 / 76.8 / 79.8.
"""
TABLE = """| method | tiles | plates |
|---|---|---|
| cflow-ad defaults (main at 74516ce) | 100.0 / 97.04 / 80.93 | 100.0 / 99.50 / 97.02 |
| anomalib 2.7 PaDiM, same MobileNetV2 (taps stride 4/8/16), its own pipeline | 100.0 / 99.20 / 90.28 | 99.0 / 99.72 / 98.49 |
"""
IMAGE_ONLY = "- Measured 2026-12-07, 256 px: cflow-ad defaults (main at 74516ce) image\n  AUROC 94.62.\n"


def test_readme_references_from_prose_tables_and_image_only_sets():
    prose = experiments.readme_references(PROSE, "any")
    assert prose["cflow-ad before"] == pytest.approx({"image_auroc": 0.9627, "pixel_auroc": 0.8046, "aupro": 0.7705})
    assert prose["anomalib PaDiM"] == pytest.approx({"image_auroc": 0.938, "pixel_auroc": 0.744, "aupro": 0.769})
    table = experiments.readme_references(TABLE, "plates")  # the category's own column
    assert table["anomalib PaDiM"] == pytest.approx({"image_auroc": 0.99, "pixel_auroc": 0.9972, "aupro": 0.9849})
    assert table["cflow-ad before"]["aupro"] == pytest.approx(0.9702)
    assert experiments.readme_references(IMAGE_ONLY, "mono") == {
        "cflow-ad before": {"image_auroc": pytest.approx(0.9462), "pixel_auroc": None, "aupro": None}}
    assert experiments.readme_references("# nothing measured\n", "x") == {}


def test_suite_runs_every_set_under_a_folder_of_roots(tmp_path):
    from cflow_ad.data import make_synthetic_mvtec

    data = tmp_path / "data"
    make_synthetic_mvtec(data / "first", category="tiles", n_train=12, n_test_good=3, n_test_defect=3, size=64, seed=1)
    make_synthetic_mvtec(data / "second", category="plates", n_train=12, n_test_good=3, n_test_defect=3, size=64, seed=2)
    (data / "first" / "README.md").write_text(TABLE)
    (data / "second" / "README.md").write_text(PROSE)
    assert [c.name for c in experiments.categories(data)] == ["first/tiles", "second/plates"]
    assert [c.name for c in experiments.categories(data / "first")] == ["tiles"]  # a root of categories itself
    with pytest.raises(CflowInputError, match="choose from first/tiles, second/plates"):
        experiments.categories(data, ["nope"])

    base = CFlowConfig(method="padim", image_size=64, border_pad=16, pool_layers=2, last_stride=16,
                       calibration_fraction=0.25)  # what the flags below say
    out = tmp_path / "out"
    assert run(["--quiet", "experiment", "suite", "--data", str(data), "--output", str(out), "--method", "padim",
                "--image-size", "64", "--border-pad", "16", "--pool-layers", "2", "--last-stride", "16",
                "--calibration-fraction", "0.25"]) == 0
    payload = strict_json((out / "suite.json").read_text())
    rows = {r["category"]: r for r in payload["rows"]}
    assert sorted(rows) == ["first/tiles", "second/plates"]
    for r in rows.values():
        assert r["image_auroc"] > 0.8 and r["runs"][0]["config"]["calibration_fraction"] == 0.25  # trained as `train`
        assert r["runs"][0]["at_threshold"]["image_fpr"] is not None  # the calibrated thresholds were measured
    assert payload["mean"]["pixel_auroc"] == pytest.approx((rows["first/tiles"]["pixel_auroc"]
                                                            + rows["second/plates"]["pixel_auroc"]) / 2)
    assert rows["first/tiles"]["references"]["anomalib PaDiM"]["image_auroc"] == pytest.approx(1.0)
    assert rows["second/plates"]["references"]["anomalib PaDiM"]["aupro"] == pytest.approx(0.769)
    table = (out / "suite.md").read_text()
    tiles = next(line for line in table.splitlines() if line.startswith("| first/tiles |"))
    assert "100.0 / 99.2 / 90.3" in tiles  # the README's figures beside the run's
    delta = tiles.rsplit("|", 2)[1].split(" / ")
    assert float(delta[0]) == pytest.approx(100 * rows["first/tiles"]["image_auroc"] - 100.0, abs=0.06)
    assert "| **mean** |" in table
    again = experiments.suite(base, data, ["plates"], out, log=lambda m: None)
    assert again["rows"] == [rows["second/plates"]]  # a stored run is read back, not trained again


def test_compare_with_paper_taps_runs_each_method_on_its_papers_taps(synthetic_root, tmp_path):
    payload = experiments.compare(SMALL.replace(pool_layers=1, last_stride=32, border_pad=0), synthetic_root, None,
                                  tmp_path, methods=["padim", "patchcore"], seeds=[0], paper_taps=True,
                                  log=lambda m: None)
    taps = {m: (r["synthetic"][0]["config"]["pool_layers"], r["synthetic"][0]["config"]["last_stride"])
            for m, r in payload["results"].items()}
    assert taps == {"padim": (3, 16), "patchcore": (2, 16)}  # not the base's single stride-32 tap
    assert "padim strides 4/8/16; patchcore strides 8/16" in (tmp_path / "compare.md").read_text()


DEVELOPMENT = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (DEVELOPMENT / "mpdd" / "README.md").is_file(), reason="needs ../shared/data")
def test_the_development_sets_and_their_readme_figures():
    found = {c.name: c for c in experiments.categories(DEVELOPMENT)}
    assert {"magnetic_tile/magnetic_tile", "mpdd/metal_plate", "piped/flr01_tl", "piped/zpb01_rl"} <= set(found)
    padim = experiments.references(found["mpdd/metal_plate"])["anomalib PaDiM"]
    assert padim == pytest.approx({"image_auroc": 0.4659, "pixel_auroc": 0.9492, "aupro": 0.8285})
    assert experiments.references(found["piped/zpb01_rl"])["anomalib PaDiM"]["aupro"] == pytest.approx(0.9849)
    assert experiments.references(found["magnetic_tile/magnetic_tile"])["anomalib PaDiM"]["pixel_auroc"] == \
        pytest.approx(0.744)
