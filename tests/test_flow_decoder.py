"""The flow decoder against FrEIA 0.2's AllInOneBlock, which the paper's code uses."""

import pytest
import torch
from torch import nn

from cflow_ad.flow_decoder import LOG_2PI, ConditionalFlow, CouplingBlock, FoldedFlow, LocationWhitening
from cflow_ad.positional_encoding import PositionalCondition

Ff = pytest.importorskip("FrEIA.framework")
Fm = pytest.importorskip("FrEIA.modules")


def _subnet(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, 2 * d_in), nn.ReLU(), nn.Linear(2 * d_in, d_out))


def _freia_copy(flow: ConditionalFlow, dim: int, cond_dim: int):
    """A FrEIA SequenceINN of AllInOneBlocks holding our flow's weights."""
    inn = Ff.SequenceINN(dim)
    for _ in flow.blocks:
        kw = dict(subnet_constructor=_subnet, affine_clamping=flow.blocks[0].clamp, global_affine_type="SOFTPLUS", permute_soft=True)
        if cond_dim:
            inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(cond_dim,), **kw)
        else:
            inn.append(Fm.AllInOneBlock, **kw)
    with torch.no_grad():
        for ours, theirs in zip(flow.blocks, inn.module_list):
            w = ours.in_x.weight if ours.in_c is None else torch.cat([ours.in_x.weight, ours.in_c.weight], 1)
            b = ours.in_x.bias if ours.in_c is None else ours.in_c.bias
            theirs.subnet[0].weight.copy_(w)
            theirs.subnet[0].bias.copy_(b)
            theirs.subnet[2].weight.copy_(ours.out.weight)
            theirs.subnet[2].bias.copy_(ours.out.bias)
            theirs.global_scale.copy_(ours.global_scale.view(1, -1))
            theirs.global_offset.copy_(ours.global_offset.view(1, -1))
            theirs.w_perm.copy_(ours.w_perm)
            theirs.w_perm_inv.copy_(ours.w_perm.T)
    return inn


def _randomise(flow: ConditionalFlow, seed: int):
    """Move every parameter away from its init so the comparison covers trained values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim,cond_dim", [(32, 128), (7, 16), (96, 0)])
def test_matches_freia_allinoneblock_forward_and_inverse(dim, cond_dim, dtype):
    flow = ConditionalFlow(dim, cond_dim, n_blocks=4, clamp=1.9, permutation="soft", seed=3)
    _randomise(flow, seed=dim)
    inn = _freia_copy(flow, dim, cond_dim)
    if dtype == torch.float64:
        flow, inn = flow.double(), inn.double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, dim, generator=g, dtype=dtype)
    c = torch.randn(64, cond_dim, generator=g, dtype=dtype) if cond_dim else None
    cond = [c] if cond_dim else []

    z, jac = flow(x, c)
    z_ref, jac_ref = inn(x, c=cond)
    assert torch.allclose(z, z_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(jac, jac_ref, atol=1e-5, rtol=1e-5)
    assert jac.abs().max() > 0.1  # the comparison covers a non-trivial Jacobian

    x_back, jac_back = flow(z, c, rev=True)
    x_ref, jac_back_ref = inn(z_ref, c=cond, rev=True)
    assert torch.allclose(x_back, x_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(jac_back, jac_back_ref, atol=1e-5, rtol=1e-5)
    # float32 round trip through randomised (large) scales: loose but meaningful
    assert torch.allclose(x_back, x, atol=1e-3, rtol=1e-3)
    assert torch.allclose(jac_back, -jac, atol=1e-3, rtol=1e-4)


def test_log_det_matches_autograd_jacobian():
    flow = ConditionalFlow(6, 4, n_blocks=3, seed=0).double()
    _randomise(flow, seed=5)
    x, c = torch.randn(6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    _, log_det = flow(x[None], c[None])
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], c[None])[0][0], x)
    assert torch.allclose(log_det[0], torch.linalg.slogdet(jac).logabsdet, atol=1e-8)


def test_condition_broadcast_equals_per_fiber_condition():
    """A [L, C] condition broadcast over [B, L, D] fibers equals repeating it per fiber."""
    flow = ConditionalFlow(10, 8, n_blocks=2, seed=0)
    x, c = torch.randn(3, 5, 10), torch.randn(5, 8)
    lp = flow.log_prob(x, c)
    lp_rep = flow.log_prob(x.reshape(15, 10), c.repeat(3, 1)).view(3, 5)
    assert torch.allclose(lp, lp_rep, atol=1e-5)


def test_hard_permutation_is_a_permutation_and_inverts():
    block = CouplingBlock(9, 0, permutation="hard")
    w = block.w_perm
    assert torch.equal(w.sum(0), torch.ones(9)) and torch.equal(w.sum(1), torch.ones(9))
    x = torch.randn(4, 9)
    y, j = block(x)
    x2, j2 = block(y, rev=True)
    assert torch.allclose(x, x2, atol=1e-5) and torch.allclose(j, -j2)


def test_soft_permutation_is_a_rotation():
    w = CouplingBlock(16, 0, permutation="soft").w_perm
    assert torch.allclose(w @ w.T, torch.eye(16), atol=1e-5)
    assert torch.linalg.det(w) == pytest.approx(1.0, abs=1e-4)


def test_positional_condition_gives_the_dense_condition_s_values_and_gradients():
    flow = ConditionalFlow(10, 16, n_blocks=2, seed=0)
    _randomise(flow, 1)
    pc = PositionalCondition(16, 3, 4)
    maps = torch.randn(5, 12, 10)  # rows of whole maps: the condition broadcasts over them
    lp = flow.log_prob(maps, pc)
    g = torch.autograd.grad(lp.sum(), list(flow.parameters()))
    lp_dense = flow.log_prob(maps, pc.dense())
    g_dense = torch.autograd.grad(lp_dense.sum(), list(flow.parameters()))
    assert torch.allclose(lp, lp_dense, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g, g_dense))
    assert torch.allclose(FoldedFlow(flow, pc, 12)(maps), lp_dense, atol=1e-4)


def _correlated(n: int, locations: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[n, P, D] samples with a different mean and covariance at every location."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(locations, dim, dim, generator=g, dtype=torch.float64)
    shift = 3 * torch.randn(locations, dim, generator=g, dtype=torch.float64)
    return torch.einsum("pij,npj->npi", mix, torch.randn(n, locations, dim, generator=g, dtype=torch.float64)) + shift


def test_location_whitening_is_the_per_location_gaussian_density():
    n, p, d, eps = 400, 5, 6, 0.05
    x = _correlated(n, p, d)
    layer = LocationWhitening(p, d).double()
    layer.fit_moments(LocationWhitening.moments(x), n, eps)
    y, log_det = layer(x)
    assert torch.allclose(y.mean(0), torch.zeros(p, d, dtype=torch.float64), atol=1e-9)
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(p):
        cov = torch.cov(x[:, i].T)
        cov = cov + eps * cov.diagonal().mean() * eye  # the ridge is relative to the mean variance
        white = layer.weight[i] @ cov @ layer.weight[i].T
        assert torch.allclose(white, eye, atol=1e-8)
        # standard normal log-density of the whitened fiber + log-det == the Gaussian density of the fiber
        mvn = torch.distributions.MultivariateNormal(x[:, i].mean(0), cov)
        ours = -0.5 * (y[:, i].square().sum(-1) + d * LOG_2PI) + log_det[i]
        assert torch.allclose(ours, mvn.log_prob(x[:, i]), atol=1e-8)


def test_location_whitening_moments_add_up_over_batches_and_sizes_are_checked():
    x = _correlated(50, 3, 4)
    whole = LocationWhitening.moments(x)
    parts = [LocationWhitening.moments(x[:20]), LocationWhitening.moments(x[20:])]
    assert all(torch.allclose(w, a + b) for w, a, b in zip(whole, *parts))
    layer = LocationWhitening(3, 4)
    with pytest.raises(ValueError, match="feed images at the model's image size"):
        layer(torch.zeros(2, 5, 4))
    singular = torch.zeros(10, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="raise whitening_eps"):
        LocationWhitening(3, 4).double().fit_moments(LocationWhitening.moments(singular), 10, 0.0)
    # Ledoit-Wolf keeps a constant location (zero variance) invertible through the ridge on top
    LocationWhitening(3, 4).double().fit_moments(LocationWhitening.moments(singular), 10, 0.01, "ledoit-wolf")


@pytest.mark.parametrize("n,dim", [(12, 24), (40, 8), (600, 6)])
def test_ledoit_wolf_intensity_equals_scikit_learn(n, dim):
    covariance = pytest.importorskip("sklearn.covariance")
    x = _correlated(n, 4, dim, seed=n) + 5.0  # an offset mean: the intensity is computed about the sample mean
    ours = LocationWhitening.ledoit_wolf(LocationWhitening.moments(x), n)
    ref = torch.tensor([covariance.ledoit_wolf_shrinkage(x[:, i].numpy()) for i in range(4)], dtype=torch.float64)
    assert torch.allclose(ours, ref, rtol=1e-7, atol=1e-10)
    if n < dim:
        assert (ours > 0.3).all()  # fewer samples than channels: strong shrinkage


def test_ledoit_wolf_whitening_uses_the_shrunk_covariance():
    n, p, d, eps = 30, 3, 10, 0.01
    x = _correlated(n, p, d)
    layer = LocationWhitening(p, d).double()
    moments = LocationWhitening.moments(x)
    layer.fit_moments(moments, n, eps, "ledoit-wolf")
    share = LocationWhitening.ledoit_wolf(moments, n)
    eye = torch.eye(d, dtype=torch.float64)
    for i in range(p):
        cov = torch.cov(x[:, i].T)
        mu = cov.diagonal().mean()
        shrunk = (1 - share[i]) * cov + share[i] * mu * eye + eps * mu * eye
        assert torch.allclose(layer.weight[i] @ shrunk @ layer.weight[i].T, eye, atol=1e-8)


@pytest.mark.parametrize("permutation", ["soft", "hard"])
@pytest.mark.parametrize("dim,cond_dim", [(32, 128), (7, 16), (96, 0)])
def test_folded_flow_equals_the_plain_flow(dim, cond_dim, permutation):
    flow = ConditionalFlow(dim, cond_dim, n_blocks=4, permutation=permutation, seed=3)
    _randomise(flow, 4)
    locations = 12
    c = torch.randn(locations, cond_dim) if cond_dim else None
    x = torch.randn(5, locations, dim)
    expected = flow.log_prob(x, c)
    folded = FoldedFlow(flow, c, locations)
    got = folded(x)
    assert got.shape == (5, locations)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_folded_flow_needs_a_condition_per_location():
    flow = ConditionalFlow(8, 16, n_blocks=2)
    with pytest.raises(ValueError, match="condition with 12 rows"):
        FoldedFlow(flow, torch.randn(13, 16), 12)
    with pytest.raises(ValueError, match="condition with 12 rows"):
        FoldedFlow(flow, None, 12)
