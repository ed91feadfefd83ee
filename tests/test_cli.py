"""The `cflow-ad` command: help from the config, full train/test/predict, one-line user errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

from cflow_ad import cli
from cflow_ad.cli import build_parser, run
from cflow_ad.config import CFlowConfig
from cflow_ad.errors import CflowInputError


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cflow_ad", *args], capture_output=True, text=True, timeout=600)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    """The one line on stderr of a command that failed as it should, without a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(CFlowConfig):
        assert "--" + f.name.replace("_", "-") in out
    text = " ".join(out.split())
    assert "(default: mobilenet_v2)" in text and "(default: 256 256)" in text  # typed as on the command line
    assert text.count("(default: mobilenet_v2)") == 1 and "(default: (256, 256))" not in text  # said once
    assert "(default: None)" not in text and "sharing the threads (default: 1)" in text  # none for --output


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"cflow-ad {version('cflow-ad')}"


def test_train_test_predict_end_to_end(synthetic_root, tmp_path, capsys):
    flags = ["--image-size", "64", "--pool-layers", "2", "--last-stride", "16", "--coupling-layers", "1",
             "--condition-dim", "16", "--epochs", "1", "--sub-epochs", "1", "--min-steps", "0", "--batch-size", "8", "--fiber-batch", "256"]
    assert run(["--quiet", "train", "--data", str(synthetic_root), "--category", "synthetic", "--output", str(tmp_path / "m"), *flags]) == 0
    ckpt = tmp_path / "m" / "model.safetensors"
    assert ckpt.is_file() and str(ckpt) in capsys.readouterr().out

    assert run(["--quiet", "test", "--model", str(ckpt), "--data", str(synthetic_root), "--category", "synthetic", "--output", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "per_type"} <= set(metrics)
    assert "pixel AUROC" in capsys.readouterr().out

    folder = synthetic_root / "synthetic" / "test" / "spot"
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(folder.joinpath(sorted(p.name for p in folder.iterdir())[0]).read_bytes()[:100])
    assert run(["--quiet", "predict", "--model", str(ckpt), str(folder), str(corrupt), "--output", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "1 skipped" in captured.out
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    n_images = len(list(folder.iterdir()))
    assert len(rows) == n_images + 1
    assert sum(1 for r in rows if r["error"]) == 1
    assert len(list((tmp_path / "p").glob("*_overlay.png"))) == n_images


@pytest.mark.parametrize(
    "args,needle",
    [
        (["test", "--model", "missing.safetensors", "--data", ".", "--category", "x", "--output", "o"], "missing.safetensors"),
        (["train", "--data", "no/such/root", "--category", "x", "--output", "o"], "no/such/root"),
        (["train", "--data", ".", "--category", "x", "--output", "o", "--condition-dim", "6"], "condition_dim"),
        (["train", "--nproc", "2", "--data", ".", "--category", "all", "--output", "o"], "--jobs"),
        (["train", "--data", ".", "--category", "all", "--output", "o"], "no categories"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cflow_ad", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("cflow-ad: error:")


def test_training_stops_on_a_corrupt_training_image(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(synthetic_root / "synthetic", root / "cat")
    (root / "cat" / "train" / "good" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    proc = _cli("train", "--data", str(root), "--category", "cat", "--output", str(tmp_path / "o"), "--image-size", "64", "--epochs", "1", "--sub-epochs", "1", "--min-steps", "0")
    assert proc.returncode == 2 and "zz_bad.png" in proc.stderr and "Traceback" not in proc.stderr


def test_readme_options_table_is_generated_from_the_config():
    from pathlib import Path

    from cflow_ad.config import options_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert options_markdown() in readme


def test_predict_paper_mode_scores_the_set_and_names_outputs_uniquely(tiny_checkpoint, synthetic_root, tmp_path):
    from cflow_ad import api

    test_dir = synthetic_root / "synthetic" / "test"
    rows = api.predict(tiny_checkpoint, [test_dir], tmp_path, normalization="paper", progress=False)
    assert len(rows) == 12 and all(not r["error"] for r in rows)
    assert len({r["heatmap"] for r in rows}) == 12  # good/000 and spot/000 do not overwrite each other
    scores = [r["raw_score"] for r in rows]
    assert min(scores) >= -1e-6  # paper offset is the set's maximum summed probability
    assert all(r["score"] is None for r in rows)  # relative to the set: not on the model's one scale
    stateless = api.predict(tiny_checkpoint, [test_dir], tmp_path / "s", progress=False)
    assert [r["path"] for r in stateless] == [r["path"] for r in rows]


@pytest.mark.parametrize("count,flags,needle", [
    (2, [], "besides the 1 that --calibration-fraction 0.1 holds out"),
    (1, [], "besides the 1 that --calibration-fraction 0.1 holds out"),
    (1, ["--calibration-fraction", "0"], "training needs 2 to train on: add"),
    (3, ["--calibration-fraction", "0.3", "--val-fraction", "0.4"], "--val-fraction 0.4 holds out"),
])
def test_too_few_training_images_is_one_line_naming_the_folder(count, flags, needle, synthetic_root, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted((synthetic_root / "synthetic" / "train" / "good").glob("*.png"))[:count]:
        shutil.copy(p, good / p.name)
    proc = _cli("train", "--normal-dir", str(good), "--output", str(tmp_path / "m"), *flags)
    line = _one_line(proc)
    assert proc.returncode == 2 and f"'{good}' has {count} training image(s)" in line and needle in line, line
    if count >= 2 and needle.startswith("besides"):
        assert line.endswith("(or pass --calibration-fraction 0)")
    if "--val-fraction" in needle:
        assert line.endswith("(or pass --calibration-fraction 0 and --val-fraction 0)")


def test_every_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def fail(exc):
        def run(args, argv):
            raise exc
        return run

    cases = [(ValueError("bad\nvalue"), 70, "cflow-ad: internal error: ValueError: bad value (run 'cflow-ad --debug"),
             (OSError(28, "No space left on device"), 2, "cflow-ad: error: OSError: [Errno 28] No space left"),
             (CflowInputError("model 'm' does not exist"), 2, "cflow-ad: error: model 'm' does not exist")]
    for exc, code, start in cases:
        for debug in ([], ["--debug"]):
            monkeypatch.setattr(cli, "_run", fail(exc))
            with pytest.raises(SystemExit) as info:
                cli.main([*debug, "report", "--results", "r"])
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            assert info.value.code == code and lines[-1].startswith(start.split(" (run")[0]), err
            assert ("Traceback" in err) == bool(debug) and (len(lines) == 1) != bool(debug)
            assert ("--debug" in lines[-1]) == (not debug and not isinstance(exc, CflowInputError))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--debug" in text and all(f"\n  {code} " in text for code in (0, 1, 2, 70, 130))
