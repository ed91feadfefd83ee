"""PaDiM and SPADE: defects found on synthetic data, distances checked against scipy and
scikit-learn, and the same checkpoint / test / predict / export paths as CFLOW-AD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from sklearn.neighbors import NearestNeighbors

from cflow_ad import api
from cflow_ad.baselines import PADIM_RIDGE, SPADE, PaDiM, PatchCore, embedding
from cflow_ad.scoring import gaussian_blur
from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.errors import CflowInputError
from cflow_ad.inference import load_runner
from cflow_ad.source import DataSource

from .conftest import TINY


@pytest.fixture(scope="module", params=["padim", "spade"])
def baseline(request, synthetic_root, tmp_path_factory):
    cfg = TINY.replace(method=request.param, knn_images=5)
    source = DataSource(synthetic_root, "synthetic")
    path = api.train(cfg, tmp_path_factory.mktemp(request.param), source, progress=False)
    return request.param, path


def test_baseline_finds_the_synthetic_defects(baseline, synthetic_root, tmp_path):
    method, path = baseline
    metrics = api.test(path, tmp_path, source=DataSource(synthetic_root, "synthetic"), progress=False)
    assert metrics["image_auroc"] >= 0.9, metrics
    assert metrics["pixel_auroc"] >= 0.9 and metrics["aupro"] >= 0.8, metrics
    assert (tmp_path / "scores.csv").is_file()


def test_baseline_checkpoint_round_trip_and_predict(baseline, synthetic_root, tmp_path):
    method, path = baseline
    model = load_checkpoint(path)
    assert type(model) is {"padim": PaDiM, "spade": SPADE}[method]
    if method == "spade":
        assert model.bank.shape[0] == 24 and model.pooled.shape[0] == 24  # the gallery is the training set
    files = sorted((synthetic_root / "synthetic" / "test").rglob("*.png"))[:3]
    rows = api.predict(path, files, tmp_path, progress=False)
    assert [r["error"] for r in rows] == ["", "", ""]
    from cflow_ad.data import load_image

    with torch.no_grad():
        _, scores = model(torch.stack([load_image(f, 128) for f in files]))
    assert np.allclose([r["raw_score"] for r in rows], scores.numpy(), rtol=1e-5)
    assert float(model.train_max_score) > 0


def test_baselines_refuse_paper_normalisation(baseline, synthetic_root, tmp_path):
    _, path = baseline
    with pytest.raises(CflowInputError, match="cflow"):
        api.test(path, tmp_path, source=DataSource(synthetic_root, "synthetic"), normalization="paper", progress=False)


@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_separable_blur_equals_torchvision(sigma):
    from torchvision.transforms.v2.functional import gaussian_blur as tv_blur

    maps = torch.rand(2, 1, 40, 50)
    size = 2 * int(4 * sigma + 0.5) + 1
    assert torch.allclose(gaussian_blur(maps, sigma), tv_blur(maps, [size, size], [sigma, sigma]), atol=1e-6)


def _random_features(b: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 6, 4, 4, generator=g), torch.randn(b, 5, 2, 2, generator=g) * 2 + 1]


class _StubEncoder(torch.nn.Module):
    """Stands in for the CNN: the tests feed random features of these sizes (grid 4x4 and 2x2)."""

    channels = (6, 5)


def test_padim_distance_is_scipy_mahalanobis():
    model = PaDiM(TINY.replace(method="padim", image_size=32, padim_channels=7), encoder=_StubEncoder())
    train = [_random_features(30, s) for s in range(2)]
    model.fit(iter(train))
    x = torch.cat([embedding(f) for f in train])[:, model.channels].double()  # [60, 7, 4, 4]
    query = _random_features(3, 9)
    dist, score = model.distance_maps(query)
    assert score is None
    q = embedding(query)[:, model.channels].double()
    for loc in [(0, 0), (1, 2), (3, 3)]:
        samples = x[:, :, loc[0], loc[1]].numpy()
        cov = np.cov(samples, rowvar=False) + PADIM_RIDGE * np.eye(7)
        inv = np.linalg.inv(cov)
        for b in range(3):
            ref = mahalanobis(q[b, :, loc[0], loc[1]].numpy(), samples.mean(0), inv)
            assert dist[b, loc[0], loc[1]].item() == pytest.approx(ref, rel=1e-4)


def test_spade_distances_are_sklearn_nearest_neighbours():
    model = SPADE(TINY.replace(method="spade", image_size=32, knn_images=3), encoder=_StubEncoder())
    train = [_random_features(10, 1)]
    model.fit(iter(train))
    query = _random_features(2, 5)
    dist, score = model.distance_maps(query, chunk=2)
    pooled = train[0][-1].mean((2, 3)).numpy()
    knn = NearestNeighbors(n_neighbors=3).fit(pooled)
    d_img, i_img = knn.kneighbors(query[-1].mean((2, 3)).numpy())
    assert np.allclose(score.numpy(), d_img.mean(1), rtol=1e-5)
    bank = embedding(train[0]).numpy()  # [10, 11, 4, 4]
    emb = embedding(query).numpy()
    for b in range(2):
        gallery = bank[i_img[b]].transpose(0, 2, 3, 1).reshape(-1, 11)
        ref, _ = NearestNeighbors(n_neighbors=1).fit(gallery).kneighbors(emb[b].reshape(11, -1).T)
        assert np.allclose(dist[b].flatten().numpy(), ref[:, 0], atol=1e-4)


def test_spade_leaves_an_image_out_of_its_own_search():
    model = SPADE(TINY.replace(method="spade", image_size=32, knn_images=1), encoder=_StubEncoder())
    train = _random_features(6, 2)
    model.fit(iter([train]))
    own, score_own = model.distance_maps(train)
    assert torch.allclose(score_own, torch.zeros(6), atol=1e-3) and own.abs().max() < 1e-2  # itself: distance 0
    out, score_out = model.distance_maps(train, gallery_index=torch.arange(6))
    assert (score_out > 0.5).all() and (out > 0.1).all()


def test_spade_gallery_is_bounded_by_memory_mb():
    """11 x 4 x 4 + 5 floats an image: 1 MiB holds 1,448 images. Three batches of 400 fit; the fourth is
    refused in one line as it arrives, before it is kept, and no later batch is drawn."""
    model = SPADE(TINY.replace(method="spade", image_size=32, memory_mb=1), encoder=_StubEncoder())
    model.fit(_random_features(400, s) for s in range(3))
    assert len(model.bank) == len(model.pooled) == 1200
    drawn = []

    def batches():
        for s in range(6):
            drawn.append(s)
            yield _random_features(400, s)

    with pytest.raises(CflowInputError, match="1,600 training images so far.*--memory-mb 1: raise it") as err:
        model.fit(batches())
    assert "\n" not in str(err.value) and drawn == [0, 1, 2, 3]


def test_padim_exports_and_spade_is_refused_in_one_line(baseline, tmp_path):
    method, path = baseline
    if method == "padim":
        pytest.importorskip("onnxruntime")
        onnx_path = api.export(path, tmp_path / "padim.onnx")
        runner = load_runner(onnx_path)
        model = load_checkpoint(path)
        x = torch.rand(2, 3, 128, 128)
        maps, scores = runner(x)
        with torch.no_grad():
            ref_maps, ref_scores = model(x)
        assert np.allclose(maps, ref_maps.numpy(), atol=1e-3, rtol=1e-4)
        assert np.allclose(scores, ref_scores.numpy(), atol=1e-3, rtol=1e-4)
    else:
        with pytest.raises(CflowInputError) as err:
            api.export(path, tmp_path / "spade.onnx")
        assert "\n" not in str(err.value) and "SPADE" in str(err.value)


@pytest.mark.filterwarnings("ignore:for .*meta parameter")  # copying into a meta buffer is a no-op
@pytest.mark.parametrize("kind", [SPADE, PatchCore])
@pytest.mark.parametrize("to", [torch.device("meta"), torch.float64])
def test_loading_a_fitted_gallery_keeps_the_modules_device_and_dtype(kind, to):
    """A checkpoint sets the gallery's or memory bank's shape; the new buffers must stay where the module
    was put (a GPU; 'meta' stands in for it here) and in its dtype, as load_state_dict keeps any other."""
    cfg = TINY.replace(method=kind.__name__.lower(), image_size=32, knn_images=1)
    fitted = kind(cfg, encoder=_StubEncoder())
    fitted.fit(iter([_random_features(6, 0)]))
    model = kind(cfg, encoder=_StubEncoder()).to(to)
    before = {name: getattr(model, name) for name in kind.fitted}
    model.load_state_dict(fitted.state_dict())
    for name in kind.fitted:
        new, old = getattr(model, name), before[name]
        assert new.shape == getattr(fitted, name).shape and new.shape[0] > 0
        assert new.device == old.device and new.dtype == old.dtype
