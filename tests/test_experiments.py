"""The experiment commands on synthetic data with a tiny grid: tables, JSON, figures, reuse of runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cflow_ad import experiments
from cflow_ad.cli import run
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
            "--condition-dim", "16", "--epochs", "1", "--sub-epochs", "1", "--batch-size", "8", "--fiber-batch", "256",
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
