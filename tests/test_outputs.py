"""What the commands leave behind (issue 33): every file complete or visibly not, no stale files from an
earlier run, names that are not UTF-8, outputs that cannot be written, and one line for every error."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cflow_ad import api, cli
from cflow_ad.errors import CflowInputError
from cflow_ad.inference import Predictions
from cflow_ad.outputs import as_text, replacing
from cflow_ad.report import write_report
from cflow_ad.source import DataSource

from .conftest import strict_json
from .test_cli import _cli, _one_line

NOT_UTF8 = b"\xff\xfe.png"


def _table(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _with_undecodable_name(synthetic_root: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the synthetic root where one defect image's name is not UTF-8; (root, that file)."""
    shutil.copytree(synthetic_root, dest)
    spot = dest / "synthetic" / "test" / "spot"
    first = sorted(spot.glob("*.png"))[0]
    renamed = Path(os.fsdecode(os.fsencode(spot) + b"/" + NOT_UTF8))
    first.rename(renamed)
    mask = dest / "synthetic" / "ground_truth" / "spot" / f"{first.stem}_mask.png"
    mask.rename(mask.with_name(renamed.stem + "_mask.png"))
    return dest, renamed


def test_a_file_name_that_is_not_utf8_is_scored_and_written_by_predict_test_and_report(
        padim_checkpoint, synthetic_root, tmp_path, capsys):
    root, odd = _with_undecodable_name(synthetic_root, tmp_path / "root")
    shown = as_text(str(odd))
    assert shown.endswith("/\\xff\\xfe.png")

    assert cli.run(["--quiet", "predict", "--model", str(padim_checkpoint), str(root / "synthetic" / "test"),
                    "--output", str(tmp_path / "p")]) == 0
    assert shown in capsys.readouterr().out
    rows = _table(tmp_path / "p" / "predictions.csv")
    assert len(rows) == 12 and not any(r["error"] for r in rows) and shown in [r["path"] for r in rows]
    summary = strict_json((tmp_path / "p" / "predictions.json").read_text(encoding="utf-8"))
    assert summary["scored"] == 12 and shown in [r["path"] for r in summary["predictions"]]
    assert any(n.endswith("_overlay.png") and "\udcff" in n for n in os.listdir(tmp_path / "p"))

    assert cli.run(["--quiet", "test", "--model", str(padim_checkpoint), "--data", str(root), "--category",
                    "synthetic", "--output", str(tmp_path / "t")]) == 0
    scores = _table(tmp_path / "t" / "scores.csv")
    assert len(scores) == 12 and shown in [r["path"] for r in scores]
    assert strict_json((tmp_path / "t" / "metrics.json").read_text())["images"] == 12
    assert (tmp_path / "t" / "curves.json").is_file() and (tmp_path / "t" / "cases" / "cases.json").is_file()
    assert cli.run(["report", "--results", str(tmp_path / "t")]) == 0


def test_the_console_shows_such_a_name_as_the_files_do(padim_checkpoint, synthetic_root, tmp_path):
    root, odd = _with_undecodable_name(synthetic_root, tmp_path / "root")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # as under a UTF-8 locale: strict stdout
    proc = subprocess.run([sys.executable, "-m", "cflow_ad", "--quiet", "predict", "--model", str(padim_checkpoint),
                           str(odd), "--output", str(tmp_path / "p")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert as_text(str(odd)) in proc.stdout


def test_replacing_leaves_the_old_file_whole_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
    with replacing(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]


def _killed_after_first_batch(monkeypatch):
    """Predictions.add stops the run (as a kill would) when the second batch arrives."""
    add, calls = Predictions.add, []

    def add_once(self, *args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        add(self, *args)

    monkeypatch.setattr(Predictions, "add", add_once)


def test_a_killed_predict_leaves_complete_rows_and_no_summary_of_an_older_run(padim_checkpoint, synthetic_root,
                                                                               tmp_path, monkeypatch):
    test_dir = synthetic_root / "synthetic" / "test"
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "mine_overlay.png").write_bytes(b"mine")  # named like an output, but not written by cflow-ad
    api.predict(padim_checkpoint, [test_dir], out, progress=False)
    first = _files(out)
    assert "predictions.json" in first and len([n for n in first if n.endswith("_overlay.png")]) == 13

    with monkeypatch.context() as m:
        _killed_after_first_batch(m)
        with pytest.raises(KeyboardInterrupt):
            api.predict(padim_checkpoint, [test_dir / "good", test_dir / "spot"], out, progress=False)
    rows = _table(out / "predictions.csv")
    assert len(rows) == 8 and all(r["score"] and r["label"] and r["overlay"] for r in rows)  # the first batch, whole
    left = _files(out)
    assert "predictions.json" not in left  # the run is visibly unfinished, and run 1's summary is gone
    assert not [n for n in left if n.endswith(".tmp")]
    assert {n for n in left if n.endswith("_overlay.png")} == {Path(r["overlay"]).name for r in rows} | {
        "mine_overlay.png"}

    few = sorted((test_dir / "spot").glob("*.png"))[:2]
    api.predict(padim_checkpoint, few, out, progress=False, heatmaps=False)
    assert _files(out) == {"notes.txt", "mine_overlay.png", ".cflow-ad-predict-files", "predictions.csv",
                           "predictions.json", *(f"{p.stem}_{kind}.png" for p in few for kind in ("overlay", "mask"))}
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine_overlay.png").read_bytes() == b"mine"


def test_a_rerun_of_test_removes_the_cases_and_report_of_the_last(padim_checkpoint, synthetic_root, tmp_path):
    out = tmp_path / "t"
    api.test(padim_checkpoint, out, DataSource(synthetic_root, "synthetic"), progress=False)
    write_report(out)
    assert {"report.html", "cases/fp4.png", "cases/fn4.png"} <= _files(out)
    good = sorted((synthetic_root / "synthetic" / "test" / "good").glob("*.png"))[:2]
    spot = sorted((synthetic_root / "synthetic" / "test" / "spot").glob("*.png"))[:1]
    normal, abnormal = tmp_path / "normal", tmp_path / "abnormal"
    for folder, files in ((normal, good), (abnormal, spot)):
        folder.mkdir()
        for p in files:
            shutil.copy(p, folder / p.name)
    api.test(padim_checkpoint, out, DataSource(normal_dir=normal, abnormal_dir=abnormal), progress=False)
    assert _files(out) == {".cflow-ad-test-files", "metrics.json", "scores.csv", "curves.json", "cases/cases.json",
                           "cases/fp1.png", "cases/fp2.png", "cases/fn1.png"}
    assert len(_table(out / "scores.csv")) == 3


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A folder path that cannot be created (its parent is a file), even for root."""
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "out"


def _refuse_work(monkeypatch):
    """Every step after the output check fails the test: the check must come before any work."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    for name in ("Inspector", "as_model", "load_runner", "calibrate_thresholds", "export_onnx"):
        monkeypatch.setattr(api, name, work)
    monkeypatch.setattr(DataSource, "open", work)


@pytest.mark.parametrize("command", ["predict", "test", "train", "export", "calibrate"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(command, blocked, padim_checkpoint,
                                                                      synthetic_root, monkeypatch):
    _refuse_work(monkeypatch)
    data = ["--data", str(synthetic_root), "--category", "synthetic"]
    model = ["--model", str(padim_checkpoint)]
    args = {"predict": [*model, str(synthetic_root), "--output", str(blocked)],
            "test": [*model, *data, "--output", str(blocked)],
            "train": [*data, "--output", str(blocked)],
            "export": [*model, "--output", str(blocked / "model.onnx")],
            "calibrate": [*model, *data, "--output", str(blocked / "model.safetensors")]}[command]
    with pytest.raises(CflowInputError, match=f"cannot write to --output '{blocked}': Not a directory"):
        cli.run([command, *args])


def test_an_output_that_is_a_file_or_a_read_only_folder(padim_checkpoint, synthetic_root, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    proc = _cli("predict", "--model", str(padim_checkpoint), str(synthetic_root), "--output", str(taken))
    assert proc.returncode == 2 and "is a file, not a folder" in _one_line(proc)
    proc = _cli("calibrate", "--model", str(padim_checkpoint), "--data", str(synthetic_root), "--category",
                "synthetic", "--output", str(tmp_path))
    assert proc.returncode == 2 and f"'{tmp_path}' is a folder" in _one_line(proc)
    if os.geteuid() == 0:
        return  # root writes anywhere: the mode of a folder stops no one
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    proc = _cli("export", "--model", str(padim_checkpoint), "--output", str(locked / "m.onnx"))
    assert proc.returncode == 2 and "Permission denied" in _one_line(proc)


def _corrupt(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return path


def test_predict_that_scores_nothing_fails_after_writing_its_outputs(padim_checkpoint, tmp_path, capsys):
    bad = [_corrupt(tmp_path / "a.png"), _corrupt(tmp_path / "b.png")]
    with pytest.raises(CflowInputError, match="none of the 2 images could be scored"):
        cli.run(["--quiet", "predict", "--model", str(padim_checkpoint), *map(str, bad), "--output",
                 str(tmp_path / "p")])
    assert "0 scored, 2 skipped (each with its reason above" in capsys.readouterr().out
    assert [r["error"] != "" for r in _table(tmp_path / "p" / "predictions.csv")] == [True, True]
    assert strict_json((tmp_path / "p" / "predictions.json").read_text())["skipped"] == 2


def test_an_output_inside_the_input_folder_is_not_scored_again(padim_checkpoint, synthetic_root, tmp_path):
    folder = shutil.copytree(synthetic_root / "synthetic" / "test" / "spot", tmp_path / "in")
    n = len(list(folder.glob("*.png")))
    for _ in range(2):
        rows = api.predict(padim_checkpoint, [folder], folder / "out", progress=False)
        assert len(rows) == n and all("/out/" not in r["path"] for r in rows)
    with pytest.raises(CflowInputError, match="is the input folder"):
        api.predict(padim_checkpoint, [folder], folder, progress=False)


def test_broken_links_and_fifos_in_a_folder_are_reported_as_skipped(padim_checkpoint, synthetic_root, tmp_path,
                                                                    capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted((synthetic_root / "synthetic" / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "dangling.png").symlink_to("no_such_file.png")
    (folder / "loop.png").symlink_to("loop.png")
    os.mkfifo(folder / "pipe.png")
    assert cli.run(["--quiet", "predict", "--model", str(padim_checkpoint), str(folder), "--output",
                    str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    assert "2 scored, 3 skipped" in captured.out
    for name in ("dangling.png", "loop.png", "pipe.png"):
        assert sum(name in line and "skipped: " in line for line in captured.err.splitlines()) == 1
    reasons = {Path(r["path"]).name: r["error"] for r in _table(tmp_path / "p" / "predictions.csv") if r["error"]}
    assert set(reasons) == {"dangling.png", "loop.png", "pipe.png"}
    assert "broken symbolic link" in reasons["dangling.png"] and "broken symbolic link" in reasons["loop.png"]
    assert "FIFO" in reasons["pipe.png"]
    summary = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert summary["skipped"] == 3 and summary["scored"] == 2
