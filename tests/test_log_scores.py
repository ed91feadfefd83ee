"""Scores that keep their range: Eq. 8 in log space (`log`, the default) against Eq. 8 itself."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cflow_ad import api
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.scoring import anomaly_maps, log_probability_sum, probability_sum
from cflow_ad.source import DataSource
from cflow_ad.thresholds import Thresholds

SIZE = (37, 53)  # not a multiple of the maps: uneven bilinear weights, some of them exactly 0


def _logs(gen: torch.Generator, batch: int = 3, shift: float = -1.0) -> list[torch.Tensor]:
    return [torch.randn(batch, h, w, generator=gen) + shift for h, w in ((12, 16), (6, 8), (1, 1))]


def test_log_sum_equals_the_log_of_eq8_sum_where_it_does_not_underflow():
    gen = torch.Generator().manual_seed(0)
    logs, refs = _logs(gen), torch.tensor([0.5, -0.2, 0.1])
    expected = torch.log(probability_sum([lm.double() for lm in logs], refs.double(), SIZE))
    assert torch.allclose(log_probability_sum(logs, refs, SIZE).double(), expected, atol=1e-5)


def _interpolation(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] float64 weights of linear interpolation with align_corners=True, from exact
    fractions (torch's own weights carry float residues where an output lies on a sample)."""
    out = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        src = Fraction(j * (n_in - 1), max(n_out - 1, 1))
        lo = math.floor(src)
        out[j, lo] += float(1 - (src - lo))
        if src > lo:
            out[j, lo + 1] += float(src - lo)
    return out


def _brute_log_sum(logs, refs, size):
    """log S in float64 as one logsumexp over every scale and source sample of log(weight) + l - ref."""
    terms = []
    for lm, ref in zip(logs, refs):
        rows, cols = _interpolation(lm.shape[1], size[0]), _interpolation(lm.shape[2], size[1])
        w = torch.log(rows)[:, None, :, None] + torch.log(cols)[None, :, None, :]  # [H, W, h, w]
        terms.append((w[None] + (lm.double() - ref)[:, None, None]).flatten(3))
    return torch.logsumexp(torch.cat(terms, 3), 3)


@pytest.mark.parametrize("spread", [1.0, 1e3, 1e5])
def test_log_sum_equals_a_float64_reference_at_any_contrast(spread):
    """Neighbouring samples up to 1e5 nats apart, where every exp underflows in any precision, and
    outputs that lie exactly on a sample next to a far likelier one."""
    gen = torch.Generator().manual_seed(3)
    logs = [torch.randn(2, h, w, generator=gen) * spread for h, w in ((12, 16), (6, 8), (1, 1))]
    refs = torch.tensor([0.5, -0.2, 0.1])
    got = log_probability_sum(logs, refs, SIZE).double()
    want = _brute_log_sum(logs, refs, SIZE)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-4)


def test_log_maps_order_pixels_as_eq8_does_and_give_its_aurocs():
    gen = torch.Generator().manual_seed(1)
    logs, refs, offset = _logs(gen, 4), torch.zeros(3), torch.tensor(3.0)
    log_map, log_score = anomaly_maps(logs, refs, offset, SIZE, "log")
    eq8_map, eq8_score = anomaly_maps(logs, refs, offset, SIZE, "stateless")
    assert torch.allclose(log_map, torch.log(offset) - torch.log(offset - eq8_map), atol=1e-5)
    labels = torch.rand(log_map.shape, generator=gen) < 0.3
    assert roc_auc_score(labels.ravel(), log_map.ravel()) == pytest.approx(
        roc_auc_score(labels.ravel(), eq8_map.ravel()), abs=1e-6)
    assert torch.equal(log_score.argsort(), eq8_score.argsort())


def test_scores_keep_rising_far_beyond_the_training_range():
    """A defect of growing strength: Eq. 8 pins at its offset once exp underflows; log scores keep rising."""
    base = [torch.full((1, 8, 8), -1.0), torch.full((1, 4, 4), -1.0)]
    refs, offset = torch.zeros(2), torch.tensor(2.0)
    log_scores, eq8_scores = [], []
    for strength in (1, 10, 100, 1e3, 1e4, 1e5):
        logs = [lm.clone() for lm in base]
        logs[0][0, 2:5, 3:6] -= strength
        logs[1][0, 1:3, 1:3] -= strength
        maps, s = anomaly_maps(logs, refs, offset, (32, 32), "log")
        assert torch.isfinite(maps).all()
        log_scores.append(s.item())
        eq8_scores.append(anomaly_maps(logs, refs, offset, (32, 32), "stateless")[1].item())
    assert all(b > a for a, b in zip(log_scores, log_scores[1:]))
    assert eq8_scores[-1] == eq8_scores[-2] == pytest.approx(2.0)  # saturated: the contrast the log form removes


def test_no_ties_among_100_anomalous_images(tiny_checkpoint):
    """100 distinct noise images, far from the training data (pixels 30x the normalised range, so far that
    the shrunk whitening cannot keep them near): Eq. 8 gives all of them the same map maximum, the log map
    does not, nor does the per-location image score (linear in the log-likelihood)."""
    model = load_checkpoint(tiny_checkpoint).eval()
    assert model.config.normalization == "log" and model.config.location_score
    images = 30 * torch.rand(100, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_maps, scores = model(images)
        eq8_maps, _ = model(images, "stateless")
    log_top, eq8_top = log_maps.flatten(1).amax(1), eq8_maps.flatten(1).amax(1)
    assert np.unique(log_top.numpy()).size == 100
    assert torch.isfinite(log_top).all() and (log_top > 2 * model.train_max_score).all()
    assert np.unique(eq8_top.numpy()).size < 10
    assert np.unique(scores.numpy()).size == 100 and torch.isfinite(scores).all()


def test_log_and_eq8_test_metrics(tiny_checkpoint, synthetic_root):
    """Through `test`: log scoring is at least as good as Eq. 8 on every metric (it ranks the same where
    Eq. 8 does not saturate, and breaks Eq. 8's ties where it does), and only the checkpoint's own mode
    applies its thresholds. The maps compared are unblurred: a blur (`--blur-sigma`) averages log values in one
    mode and probabilities in the other, which no longer rank alike."""
    source = DataSource(synthetic_root, "synthetic")
    model = load_checkpoint(tiny_checkpoint)
    model.config = model.config.replace(blur_sigma=0.0)
    log = api.test(model, None, source, progress=False)
    eq8 = api.test(model, None, source, normalization="stateless", progress=False)
    assert log["normalization"] == "log" and eq8["normalization"] == "stateless"
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert log[key] >= eq8[key] - 1e-6


def test_good_share_is_the_share_of_calibration_images_scoring_lower():
    t = Thresholds.from_good([3.0, 1.0, 2.0, 5.0], np.zeros((4, 2, 2)), 0.25, "test")
    assert [t.good_share(s) for s in (0.5, 1.0, 2.5, 5.0, 9.0)] == [0.0, 0.0, 0.5, 0.75, 1.0]
    assert Thresholds(1.0, 1.0, "manual").good_share(2.0) is None


def test_predict_reports_the_good_share(padim_checkpoint, synthetic_root, tmp_path):
    rows = api.predict(padim_checkpoint, [synthetic_root / "synthetic" / "test"], tmp_path, overlays=False,
                       masks=False, heatmaps=False, progress=False)
    shares = {r["path"]: r["good_share"] for r in rows}
    assert all(0.0 <= s <= 1.0 for s in shares.values())
    good = [s for p, s in shares.items() if "/good/" in p]
    bad = [s for p, s in shares.items() if "/good/" not in p]
    assert min(bad) == 1.0 and max(good) < 1.0  # every defect scores above every calibration image here
    assert "good_share" in (tmp_path / "predictions.csv").read_text().splitlines()[0].split(",")
