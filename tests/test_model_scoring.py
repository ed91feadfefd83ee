"""Model forward, Eq. 8 scoring and the two normalisation modes."""

from __future__ import annotations

import pytest
import torch

from cflow_ad.checkpoint import load_checkpoint
from cflow_ad.config import CFlowConfig
from cflow_ad.data import load_image
from cflow_ad.errors import CflowInputError
from cflow_ad.model import CFlowModel
from cflow_ad.scoring import anomaly_maps, paper_constants, score_set


def _random_model(**kw) -> CFlowModel:
    cfg = CFlowConfig(image_size=64, coupling_layers=2, condition_dim=16, **kw)
    return CFlowModel(cfg, pretrained=False).eval()


def test_stateless_score_of_an_image_does_not_depend_on_its_batch(tiny_checkpoint, synthetic_root):
    model = load_checkpoint(tiny_checkpoint)
    files = sorted((synthetic_root / "synthetic" / "train").rglob("*.png"))[:6]  # in-distribution: unsaturated scores
    batch = torch.stack([load_image(f, 128) for f in files])
    with torch.no_grad():
        maps_b, scores_b = model(batch)
        for i in range(len(files)):
            m, s = model(batch[i : i + 1])
            assert torch.allclose(m[0], maps_b[i], atol=1e-5)
            assert torch.allclose(s[0], scores_b[i], rtol=1e-4, atol=1e-5)  # location scores: in sd units
    assert scores_b.std() > 1e-3  # different images get clearly different scores


def test_paper_mode_depends_on_the_set_but_stateless_does_not():
    logs_a = [torch.randn(4, 8, 8), torch.randn(4, 4, 4)]
    logs_b = [torch.cat([t, t[:1] + 3.0]) for t in logs_a]  # add one very likely image
    refs = torch.tensor([0.0, 0.0])
    _, s_a = score_set(logs_a, (32, 32), "stateless", refs, torch.tensor(2.0))
    _, s_b = score_set(logs_b, (32, 32), "stateless", refs, torch.tensor(2.0))
    assert torch.allclose(s_a, s_b[:4])
    _, p_a = score_set(logs_a, (32, 32), "paper")
    _, p_b = score_set(logs_b, (32, 32), "paper")
    assert not torch.allclose(p_a, p_b[:4])


def test_paper_mode_follows_eq8_normalisation():
    logs = [torch.randn(3, 4, 4), torch.randn(3, 2, 2)]
    maps, scores = score_set(logs, (8, 8), "paper")
    refs, offset = paper_constants(logs, (8, 8))
    assert torch.allclose(refs, torch.stack([logs[0].max(), logs[1].max()]))

    def up(t):
        return torch.nn.functional.interpolate(t[:, None].double(), size=(8, 8), mode="bilinear", align_corners=True)[:, 0]

    total = up(torch.exp(logs[0] - logs[0].max())) + up(torch.exp(logs[1] - logs[1].max()))
    assert torch.allclose(maps.double(), total.max() - total, atol=1e-5)
    assert maps.min() >= -1e-6 and float(offset) <= 2.0 + 1e-6
    assert torch.allclose(scores, maps.flatten(1).amax(1))


def test_higher_likelihood_means_lower_anomaly():
    low, high = torch.full((1, 4, 4), -5.0), torch.full((1, 4, 4), -1.0)
    refs = torch.tensor([0.0])
    a_low, _ = anomaly_maps([low], refs, 1.0, (8, 8))
    a_high, _ = anomaly_maps([high], refs, 1.0, (8, 8))
    assert (a_low > a_high).all()


def test_border_pad_keeps_feature_map_sizes():
    plain, padded = _random_model(), _random_model(border_pad=32)
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(plain.encoder(x), padded.encoder(x)):
        assert a.shape == b.shape
    assert not torch.allclose(plain.encoder(x)[-1], padded.encoder(x)[-1])


def test_forward_shapes_for_each_pool_layer_count():
    for k in (1, 2, 3, 4):
        model = _random_model(pool_layers=k)
        assert len(model.decoders) == k
        maps, scores = model(torch.rand(2, 3, 64, 64))
        assert maps.shape == (2, 64, 64) and scores.shape == (2,)
        assert torch.isfinite(maps).all()


def test_uflow_has_no_condition_and_smaller_decoders():
    cflow, uflow = _random_model(), _random_model(conditional=False)
    assert uflow.condition(4, 4) is None

    def n(m):
        return sum(p.numel() for p in m.decoders.parameters())

    assert n(uflow) < n(cflow)
    maps, _ = uflow(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(maps).all()


def test_location_whitening_is_optional_and_refuses_huge_encoders():
    assert _random_model(whitening="none").whitenings is None
    model = _random_model()
    assert [w.locations for w in model.whitenings] == [256, 64, 16, 4]  # 64 px at strides 4/8/16/32
    with pytest.raises(CflowInputError, match="--whitening none"):
        CFlowModel(CFlowConfig(encoder="wide_resnet50_2"), pretrained=False)


def test_eval_uses_folded_decoders_that_match_the_training_path_and_follow_weight_changes():
    model = _random_model()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    feats = model.features(images)
    with torch.no_grad():
        folded = model.log_density_maps(feats)
        model.train()
        plain = model.log_density_maps(feats)
        model.eval()
        for p in model.decoders.parameters():
            p.add_(0.01)  # an optimiser step changes the weights in place...
        refolded = model.log_density_maps(feats)  # ...and the folded decoders follow
        model.train()
        changed = model.log_density_maps(feats)
        model.eval()
    for a, b, c, d in zip(folded, plain, changed, refolded):
        assert torch.allclose(a, b, atol=1e-5)
        assert not torch.allclose(c, b, atol=1e-3)
        assert torch.allclose(d, c, atol=1e-5)


def test_location_stats_are_each_places_mean_and_spread_over_the_training_maps():
    from cflow_ad.scoring import SPREAD_FLOOR, fit_constants

    model = _random_model(pool_layers=2, last_stride=16)  # places: 4x4 + 8x8 at 64 px
    gen = torch.Generator().manual_seed(0)
    batches = [[torch.randn(n, 8, 8, generator=gen) * 0.3, torch.randn(n, 4, 4, generator=gen) * 0.1 - 1]
               for n in (3, 5, 4)]
    for b in batches:
        b[0][:, 0, 0] = 0.25  # one place that never varies: its spread is raised to the floor
    fit_constants(model, lambda: iter(batches))
    flat = torch.cat([torch.cat([lm.flatten(1) for lm in b], 1) for b in batches]).double()
    mean, sd = model.location_stats
    assert torch.allclose(mean.double(), flat.mean(0), atol=1e-6)
    want = flat.std(0)
    floors = [part.median() * SPREAD_FLOOR for part in want.split(model.places)]
    want = torch.cat([part.clamp_min(f) for part, f in zip(want.split(model.places), floors)])
    assert sd[0].item() == pytest.approx(floors[0].item(), rel=1e-5) and sd[0] > 0
    assert torch.allclose(sd.double(), want, rtol=1e-5)
    # the image score: the largest standardised deficit over every place of every scale
    logs = [batches[0][0][:1] - 0.5, batches[0][1][:1]]
    got = model.location_deficit(logs)
    ref = max(((mean[i] - v) / sd[i]).item() for i, v in enumerate(torch.cat([lm.flatten() for lm in logs])))
    assert got.item() == pytest.approx(ref, rel=1e-6)


def test_image_score_modes_location_map_and_auto():
    model = _random_model(pool_layers=2, last_stride=16)
    model.location_stats[1].fill_(0.5)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        amap, score = model(x)
        logs = model.log_density_maps(model.features(x))
    assert model.config.image_score == "auto" and model.config.location_score
    assert torch.allclose(score, model.location_deficit(logs))
    assert not torch.allclose(score, amap.flatten(1).amax(1))
    by_map = _random_model(pool_layers=2, last_stride=16, image_score="map")
    with torch.no_grad():
        amap, score = by_map(x)
    assert torch.equal(score, amap.flatten(1).amax(1))
    assert not CFlowConfig(keep_aspect=True).location_score  # auto: the map, which leaves the padding out
    with pytest.raises(CflowInputError, match="image-score map"):
        CFlowConfig(keep_aspect=True, image_score="location")
    assert CFlowConfig.from_dict({"seed": 1}).image_score == "map"  # checkpoints from before the option


def test_blur_sigma_blurs_the_map_in_every_mode_and_not_the_location_score():
    from cflow_ad.scoring import gaussian_blur

    sharp = _random_model(pool_layers=2, last_stride=16, blur_sigma=0.0)
    blurred = _random_model(pool_layers=2, last_stride=16, blur_sigma=2.0)
    blurred.load_state_dict(sharp.state_dict())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for mode in ("log", "stateless"):
            (m0, s0), (m2, s2) = sharp(x, mode), blurred(x, mode)
            assert torch.allclose(m2, gaussian_blur(m0[:, None], 2.0)[:, 0], atol=1e-5)
            assert torch.equal(s0, s2)  # the location score reads the log-likelihoods, not the map
            assert m2.std() < m0.std()
    logs = [torch.randn(2, 8, 8), torch.randn(2, 4, 4)]
    m0, _ = anomaly_maps(logs, torch.zeros(2), 1.0, (32, 32), "paper")
    m2, top = anomaly_maps(logs, torch.zeros(2), 1.0, (32, 32), "paper", blur=2.0)
    assert torch.allclose(m2, gaussian_blur(m0[:, None], 2.0)[:, 0]) and torch.equal(top, m2.flatten(1).amax(1))
    # CFLOW-AD checkpoints saved before it read blur_sigma (they have no min_steps) keep their unblurred maps
    assert CFlowConfig.from_dict({"seed": 1, "blur_sigma": 4.0}).blur_sigma == 0.0
    assert CFlowConfig.from_dict({"seed": 1, "blur_sigma": 4.0, "min_steps": 0}).blur_sigma == 4.0
    assert CFlowConfig.from_dict({"method": "padim", "blur_sigma": 4.0}).blur_sigma == 4.0
