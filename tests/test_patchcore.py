"""PatchCore: coreset, nearest-neighbour distances and the reweighted image score against brute-force
references, its memory bound, and the train / test / checkpoint / export paths on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cflow_ad import api, experiments
from cflow_ad.baselines import REWEIGHT_NEIGHBOURS, PatchCore, k_center_greedy
from cflow_ad.checkpoint import load_checkpoint, save_checkpoint
from cflow_ad.errors import CflowInputError
from cflow_ad.inference import load_runner
from cflow_ad.source import DataSource

from .conftest import TINY

STUB = TINY.replace(method="patchcore", image_size=32, pool_layers=2, last_stride=8, border_pad=0)  # grid 8x8


class _StubEncoder(torch.nn.Module):
    """Stands in for the CNN: the tests feed random features of these sizes (grid 8x8 and 4x4)."""

    def __init__(self, channels=(6, 5)):
        super().__init__()
        self.channels = channels


def _features(b: int, seed: int, channels=(6, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, channels[0], 8, 8, generator=g), torch.randn(b, channels[1], 4, 4, generator=g) * 2 + 1]


def _greedy_reference(points: torch.Tensor, count: int, start: int) -> list[int]:
    """Textbook greedy k-center on the full N x N distance matrix."""
    d = torch.cdist(points.double(), points.double())
    picks = [start]
    for _ in range(count - 1):
        picks.append(int(d[:, picks].min(1).values.argmax()))
    return picks


def test_coreset_is_the_brute_force_greedy_k_center():
    points = torch.randn(400, 7, generator=torch.Generator().manual_seed(3))
    ref = _greedy_reference(points, 40, start=11)
    picks = k_center_greedy(points, 40, start=11)
    assert picks.dtype == torch.long and picks.device == points.device  # on the device: tests/test_device_rules.py
    assert picks.tolist() == ref
    assert k_center_greedy(points.T.contiguous().T, 40, start=11).tolist() == ref  # column-major, as fit stores them
    assert len(set(ref)) == 40


def test_coreset_in_small_chunks_is_identical():
    """The memory bound: the running minimum updated 13 points at a time (never an N x N matrix, not even
    an N-vector of temporaries) selects exactly what one whole-set update does."""
    points = torch.randn(1000, 16, generator=torch.Generator().manual_seed(4)) * 3
    whole = k_center_greedy(points, 60, start=0, chunk=len(points))
    assert torch.equal(k_center_greedy(points, 60, start=0, chunk=13), whole)
    assert whole.tolist() == _greedy_reference(points, 60, start=0)


def test_patches_average_each_tap_over_its_3x3_neighbourhood():
    feats = _features(2, 0)
    x = PatchCore.patches(feats)  # [2, 64, 11]
    f0 = feats[0]
    centre = f0[:, :, 2:5, 3:6].mean((2, 3))  # location (3, 4): a full window
    corner = f0[:, :, :2, :2].sum((2, 3)) / 9  # location (0, 0): zeros outside the map count, as in PatchCore's code
    assert torch.allclose(x[:, 3 * 8 + 4, :6], centre, atol=1e-6)
    assert torch.allclose(x[:, 0, :6], corner, atol=1e-6)
    deep = F.avg_pool2d(feats[1], 3, 1, 1, count_include_pad=True)
    assert torch.allclose(x[:, 3 * 8 + 4, 6:], deep[:, :, 1, 2], atol=1e-6)  # the deep tap, nearest-upsampled


def test_fit_keeps_the_greedy_coreset_and_is_deterministic_per_seed():
    channels = (100, 60)  # 160 dimensions: the selection runs on the 128-d projection
    train = [_features(4, s, channels) for s in range(3)]
    cfg = STUB.replace(coreset_ratio=0.05)
    model = PatchCore(cfg, encoder=_StubEncoder(channels))
    model.fit(iter(train))
    patches = torch.cat([PatchCore.patches(f).flatten(0, 1) for f in train])  # 768 patches
    assert model.memory.shape == (round(0.05 * 768), 160)
    rows = {tuple(r) for r in patches.tolist()}
    assert all(tuple(r) in rows for r in model.memory.tolist())  # full-dimension features of chosen patches
    again = PatchCore(cfg, encoder=_StubEncoder(channels))
    again.fit(iter(train))
    assert torch.equal(again.memory, model.memory)
    other = PatchCore(cfg.replace(seed=1), encoder=_StubEncoder(channels))
    other.fit(iter(train))
    assert not torch.equal(other.memory, model.memory)


def _fitted(ratio: float = 0.3) -> PatchCore:
    model = PatchCore(STUB.replace(coreset_ratio=ratio), encoder=_StubEncoder())
    model.fit(iter([_features(5, 1), _features(5, 2)]))
    return model


def test_nearest_memory_patches_are_brute_force_cdist():
    model = _fitted()
    queries = PatchCore.patches(_features(3, 7)).flatten(0, 1)
    ref = torch.cdist(queries.double(), model.memory.double())
    for chunk in (None, 5):  # one pass over the memory, or five patches at a time
        dist, index = model.nearest(queries, chunk)
        assert torch.allclose(dist.double(), ref.min(1).values, atol=1e-4)
        assert torch.equal(index, ref.argmin(1))


def test_memory_neighbours_are_brute_force_nearest():
    model = _fitted()
    d = torch.cdist(model.memory.double(), model.memory.double())
    d.fill_diagonal_(float("inf"))
    own = torch.arange(len(model.memory))
    assert model.neighbours.shape == (len(model.memory), REWEIGHT_NEIGHBOURS)
    assert torch.equal(model.neighbours[:, 0], own)
    assert torch.equal(model.neighbours[:, 1:], d.topk(REWEIGHT_NEIGHBOURS - 1, 1, largest=False).indices)


def _reference_score(memory: np.ndarray, patches: np.ndarray) -> float:
    """The paper's image score for one image's patches [P, D], literally: exp() of the distances."""
    d = np.linalg.norm(patches[:, None] - memory[None], axis=2)  # [P, M]
    p = int(d.min(1).argmax())
    m_star = int(d[p].argmin())
    s_star = d[p, m_star]
    to_m = np.linalg.norm(memory - memory[m_star], axis=1)
    support = np.argsort(to_m)[:REWEIGHT_NEIGHBOURS]  # N_b(m*), m* itself first
    w = 1 - math.exp(s_star) / np.exp(np.linalg.norm(memory[support] - patches[p], axis=1)).sum()
    return w * s_star


def test_image_score_is_the_papers_reweighting():
    model = _fitted()
    feats = _features(3, 8)
    dist, score = model.distance_maps(feats)
    patches = PatchCore.patches(feats).double().numpy()
    ref = [_reference_score(model.memory.double().numpy(), patches[b]) for b in range(3)]
    assert np.allclose(score.numpy(), ref, rtol=1e-4)
    top = dist.flatten(1).amax(1)  # s*: the weight lies in [1 - 1/b, 1)
    assert (score < top).all() and (score >= (1 - 1 / REWEIGHT_NEIGHBOURS) * top).all()


def test_image_score_does_not_overflow_at_large_distances():
    model = _fitted()
    feats = [f * 1e3 for f in _features(2, 9)]  # distances ~1e3: exp() of them overflows float64
    dist, score = model.distance_maps(feats)
    top = dist.flatten(1).amax(1)
    assert torch.isfinite(score).all() and (score >= (1 - 1 / REWEIGHT_NEIGHBOURS) * top).all() and (score <= top).all()


def test_fit_refuses_past_memory_mb_in_one_line():
    model = PatchCore(STUB.replace(memory_mb=0), encoder=_StubEncoder())
    with pytest.raises(CflowInputError, match="memory-mb") as err:
        model.fit(iter([_features(2, 0)]))
    assert "\n" not in str(err.value)


def test_run_key_reads_coreset_ratio_for_patchcore_only():
    cfg = TINY.replace(method="patchcore")
    assert experiments.run_key(cfg) != experiments.run_key(cfg.replace(coreset_ratio=0.1))
    assert experiments.run_key(cfg) == experiments.run_key(cfg.replace(knn_images=5, padim_channels=7))
    padim = TINY.replace(method="padim")
    assert experiments.run_key(padim) == experiments.run_key(padim.replace(coreset_ratio=0.1))


@pytest.fixture(scope="module")
def patchcore_checkpoint(synthetic_root, tmp_path_factory):
    return api.train(TINY.replace(method="patchcore"), tmp_path_factory.mktemp("patchcore"),
                     DataSource(synthetic_root, "synthetic"), progress=False, log=lambda m: None)


def test_patchcore_finds_the_synthetic_defects(patchcore_checkpoint, synthetic_root, tmp_path):
    metrics = api.test(patchcore_checkpoint, tmp_path, source=DataSource(synthetic_root, "synthetic"), progress=False)
    assert metrics["image_auroc"] >= 0.9 and metrics["pixel_auroc"] > 0.9 and metrics["aupro"] >= 0.8, metrics


def test_patchcore_checkpoint_round_trip_gives_identical_maps(patchcore_checkpoint, tmp_path):
    model = load_checkpoint(patchcore_checkpoint)
    assert type(model) is PatchCore
    assert model.memory.shape == (round(0.01 * 24 * 16 * 16), model.dim)  # 1% of 24 images x 16x16 patches
    assert float(model.train_max_score) > 0
    again = load_checkpoint(save_checkpoint(model, tmp_path / "again.safetensors"))
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (maps, scores), (maps2, scores2) = model(x), again(x)
    assert torch.equal(again.memory, model.memory) and torch.equal(again.neighbours, model.neighbours)
    assert torch.equal(maps, maps2) and torch.equal(scores, scores2)


def test_patchcore_onnx_export_matches_pytorch(patchcore_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    runner = load_runner(api.export(patchcore_checkpoint, tmp_path / "patchcore.onnx"))
    model = load_checkpoint(patchcore_checkpoint)
    x = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))  # another batch size than the trace's
    maps, scores = runner(x)
    with torch.no_grad():
        ref_maps, ref_scores = model(x)
    assert np.allclose(maps, ref_maps.numpy(), atol=1e-4, rtol=1e-4)
    assert np.allclose(scores, ref_scores.numpy(), atol=1e-4, rtol=1e-4)
