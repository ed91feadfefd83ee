"""Crash-safe training: a run killed (SIGKILL) or stopped (SIGTERM) mid-way and resumed ends with the same
model and metrics as a run never stopped; non-finite inputs never reach the weights or a checkpoint."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint, save_checkpoint
from cflow_ad.config import CFlowConfig
from cflow_ad.errors import CflowInputError
from cflow_ad.model import CFlowModel
from cflow_ad.source import DataSource
from cflow_ad.training import fit, load_state

from .conftest import TINY

# Many short epochs, so that a kill lands in the middle of the run.
LONG = TINY.replace(epochs=2, sub_epochs=6, batch_size=4, fiber_batch=64)


def _flags(config: CFlowConfig) -> list[str]:
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != f.default:
            flag = "--" + f.name.replace("_", "-")
            words = [str(v) for v in value] if isinstance(value, tuple) else [str(value)]  # image_size: H W
            out += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, *words]
    return out


def _train_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cflow_ad", "--quiet", "--threads", "2", "train", "--data", str(root),
            "--category", "synthetic", "--output", str(out), *_flags(LONG), *extra]


def _stopped_run(root: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start training, send `sig` once the second epoch's state is on disk, and wait for the process."""
    proc = subprocess.Popen(_train_cmd(root, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / api.STATE_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and torch.load(state, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be stopped: {proc.stderr.read()}"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    subprocess.run(_train_cmd(synthetic_root, out), check=True, capture_output=True, timeout=600)
    ckpt = out / "model.safetensors"
    return ckpt, api.test(ckpt, None, source=DataSource(synthetic_root, "synthetic"), progress=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_stopped_run_resumes_to_the_same_model_and_metrics(sig, uninterrupted, synthetic_root, tmp_path):
    stopped = _stopped_run(synthetic_root, tmp_path, sig)
    state = torch.load(tmp_path / api.STATE_FILE, weights_only=True)
    assert not (tmp_path / "model.safetensors").exists()
    assert state["epoch"] < LONG.epochs * LONG.sub_epochs
    if sig == signal.SIGTERM:  # stopped cleanly after an image batch, with a message saying how to go on
        assert stopped.returncode == 130 and "--resume" in stopped.stderr
    else:
        assert stopped.returncode == -signal.SIGKILL
    # after SIGKILL (as after running out of memory) resume without any cache: the model must not change
    extra = ["--memory-mb", "0"] if sig == signal.SIGKILL else []
    resumed = subprocess.run(_train_cmd(synthetic_root, tmp_path, "--resume", *extra), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert not (tmp_path / api.STATE_FILE).exists()  # removed once the model is written
    ckpt, metrics = uninterrupted
    a, b = load_checkpoint(ckpt).state_dict(), load_checkpoint(tmp_path / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    got = api.test(tmp_path / "model.safetensors", None, source=DataSource(synthetic_root, "synthetic"), progress=False,
                   memory_mb=LONG.memory_mb)  # exact pixel metrics, as for the uninterrupted run
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-9)


def test_resume_refuses_a_state_saved_with_other_options(synthetic_root, tmp_path):
    _stopped_run(synthetic_root, tmp_path, signal.SIGTERM)
    with pytest.raises(CflowInputError, match="other options"):
        load_state(tmp_path / api.STATE_FILE, LONG.replace(lr=1e-3))
    assert load_state(tmp_path / api.STATE_FILE, LONG.replace(memory_mb=1))["epoch"] >= 2  # the budget may change
    # a finished run has nothing to resume: its model is returned as it is
    done = tmp_path / "done"
    done.mkdir()
    (done / "model.safetensors").write_bytes(b"x")
    assert api.train(LONG, done, source=DataSource(synthetic_root, "synthetic"), resume=True, log=lambda m: None) == \
        done / "model.safetensors"


class _WithNaN(torch.utils.data.Dataset):
    """A dataset whose images `bad` are all NaN: what a broken decoder or sensor could hand over."""

    def __init__(self, dataset, bad: set[int]):
        self.dataset, self.bad = dataset, bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        if i in self.bad:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_nan_inputs_are_left_out_and_never_reach_the_weights(synthetic_root):
    train = DataSource(synthetic_root, "synthetic").open("train", TINY.image_size)
    model = CFlowModel(TINY)
    logs: list[str] = []
    history = fit(model, _WithNaN(train, {0, 5, 17}), progress=False, log=logs.append)
    assert history["dropped_images"] >= 3  # from the whitening fit and from every batch holding them
    assert any("non-finite" in m for m in logs)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    assert torch.isfinite(model.ref_log_density).all() and torch.isfinite(model.map_offset)


def test_non_finite_steps_are_skipped_and_the_learning_rate_lowered(synthetic_root, monkeypatch):
    """Force every loss of the first 25 steps to NaN: those steps are skipped, the rate is halved twice."""
    from cflow_ad import training

    real = training.fiber_loss
    calls = {"n": 0}

    def flaky(lp, kind):
        calls["n"] += 1
        loss = real(lp, kind)
        return loss * float("nan") if calls["n"] <= 25 else loss

    monkeypatch.setattr(training, "fiber_loss", flaky)
    model = CFlowModel(TINY)
    history = fit(model, DataSource(synthetic_root, "synthetic").open("train", TINY.image_size), progress=False,
                  log=lambda m: None)
    assert history["skipped_steps"] == 25 and history["lr_scale"] == 0.25
    assert all(torch.isfinite(p).all() for p in model.decoders.parameters())


def test_a_nan_model_is_never_saved(tmp_path):
    model = CFlowModel(TINY, pretrained=False)
    with torch.no_grad():
        next(model.decoders.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CflowInputError, match="NaN or Inf"):
        save_checkpoint(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_the_state_leaves_out_the_frozen_encoder_and_resume_checks_the_rest(synthetic_root, tmp_path):
    """The per-epoch state holds every model tensor but the pretrained encoder's (rebuilt from its weights);
    a state that holds them, or lacks any other, is refused as another version's."""
    cfg = TINY.replace(sub_epochs=1, coupling_layers=1)
    train = DataSource(synthetic_root, "synthetic").open("train", cfg.image_size)
    state = tmp_path / "state.pt"
    fit(CFlowModel(cfg), train, progress=False, log=lambda m: None, state_path=state)
    saved = torch.load(state, weights_only=True)
    full = CFlowModel(cfg).state_dict()
    encoder = {k for k in full if k.startswith("encoder.")}
    assert encoder and saved["model"].keys() == full.keys() - encoder
    model = CFlowModel(cfg)
    fit(model, train, progress=False, log=lambda m: None, state_path=state, resume=True)  # finished: loads, trains no more
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items() if k.startswith("decoders."))
    first_decoder_key = next(k for k in saved["model"] if k.startswith("decoders."))
    for weights in ({**saved["model"], **{k: full[k] for k in encoder}},  # as versions before this one saved it
                    {k: v for k, v in saved["model"].items() if k != first_decoder_key}):
        torch.save({**saved, "model": weights}, state)
        with pytest.raises(CflowInputError, match="another version"):
            fit(CFlowModel(cfg), train, progress=False, log=lambda m: None, state_path=state, resume=True)
