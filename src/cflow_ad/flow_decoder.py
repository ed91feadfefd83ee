"""Decoders g_k(theta_k): conditional normalizing flows over feature vectors (Section 4.2).

`CouplingBlock` computes exactly what FrEIA 0.2's `AllInOneBlock` computes with affine
coupling, soft clamping, SOFTPLUS global affine scaling and a fixed permutation (a test
checks this to 1e-5). It is written here so that the flow exports to ONNX and can be
made fast: inputs are plain [..., D] tensors, and the condition may carry fewer leading
dimensions than the features, so a positional condition of shape [L, C] is projected
once per location and broadcast over a batch of [B, L, D] fibers. A `PositionalCondition`
may stand in for that [L, C] tensor: it projects through the encoding's row/column
factors, far cheaper.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .positional_encoding import PositionalCondition

LOG_2PI = math.log(2.0 * math.pi)


def matmul(x: torch.Tensor, w: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """x @ w in the flows' matrix-product precision (`device.FLOW_PRECISIONS`), the result in x's dtype, so
    the scales, log-determinants and likelihoods computed from it stay fp32. bf16 rounds both factors to
    bfloat16 (the kernels accumulate in fp32). Differentiable, for training."""
    if precision == "bf16":
        return (x.to(torch.bfloat16) @ w.to(torch.bfloat16)).to(x.dtype)
    return x @ w


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           precision: str = "fp32") -> torch.Tensor:
    """F.linear with its product in `precision` and the bias added in x's dtype; fp32 is F.linear itself."""
    if precision == "fp32":
        return F.linear(x, weight, bias)
    y = matmul(x, weight.T, precision)
    return y if bias is None else y + bias


def project_condition(layer: nn.Linear, c: torch.Tensor | PositionalCondition, precision: str = "fp32") -> torch.Tensor:
    """layer(c) for conditions given as a tensor [..., C] or as a `PositionalCondition` (cheaper), its
    products in `precision`."""
    if isinstance(c, PositionalCondition):
        return c.project(layer, lambda a, b: matmul(a, b, precision))
    return linear(c, layer.weight, layer.bias, precision)


def random_rotation(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random matrix from SO(dim) (Haar measure, via QR with sign correction)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    q[:, 0] *= torch.linalg.det(q).sign()  # no branch on a value: a model builds on the meta device too
    return q.float()


def random_permutation_matrix(dim: int, generator: torch.Generator) -> torch.Tensor:
    w = torch.zeros(dim, dim)
    w[torch.arange(dim), torch.randperm(dim, generator=generator)] = 1.0
    return w


class CouplingBlock(nn.Module):
    """Affine coupling + global affine scaling + fixed permutation.

    Forward: the passive half x1 (first ceil(D/2) channels), concatenated with the
    condition, drives a subnet Linear(d, 2d) - ReLU - Linear(2d, 2*|x2|) that gives a
    soft-clamped log-scale s = alpha * tanh(0.1 a_s) and a shift t = 0.1 a_t for the
    active half: x2' = x2 * exp(s) + t. Then y = W (x' * softplus-scale + offset).
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int = 0,
        clamp: float = 1.9,
        permutation: str = "soft",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if dim < 2:
            raise ValueError("a coupling block needs at least 2 feature channels")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.dim, self.cond_dim, self.clamp = dim, cond_dim, clamp
        self.passive = dim - dim // 2
        self.active = dim // 2
        d_in = self.passive + cond_dim
        hidden = 2 * d_in
        # First subnet layer split in two so the condition term can be computed per location.
        self.in_x = nn.Linear(self.passive, hidden, bias=cond_dim == 0)
        self.in_c = nn.Linear(cond_dim, hidden) if cond_dim else None
        self.out = nn.Linear(hidden, 2 * self.active)
        full = nn.Linear(d_in, hidden)  # default init of the unsplit layer, as FrEIA's subnet gets
        with torch.no_grad():
            self.in_x.weight.copy_(full.weight[:, : self.passive])
            if self.in_c is not None:
                self.in_c.weight.copy_(full.weight[:, self.passive :])
                self.in_c.bias.copy_(full.bias)
            else:
                self.in_x.bias.copy_(full.bias)
        # SOFTPLUS global affine: scale = 0.2 * softplus(0.5 * g), initialised to 1.
        self.global_scale = nn.Parameter(torch.full((dim,), 2.0 * math.log(math.exp(5.0) - 1.0)))
        self.global_offset = nn.Parameter(torch.zeros(dim))
        perm = random_rotation(dim, generator) if permutation == "soft" else random_permutation_matrix(dim, generator)
        self.register_buffer("w_perm", perm)

    def scale(self) -> torch.Tensor:
        return 0.2 * F.softplus(0.5 * self.global_scale)

    def out_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The subnet's output layer with its 0.1 factor folded in (saves a pass over its output)."""
        return 0.1 * self.out.weight, 0.1 * self.out.bias

    def mix_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global affine scaling and offset folded into the permutation: W (y * scale + offset) = M y + m."""
        return self.w_perm * self.scale(), self.w_perm @ self.global_offset

    def _coeffs(self, x1: torch.Tensor, c: torch.Tensor | PositionalCondition | None,
                precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        h = linear(x1, self.in_x.weight, self.in_x.bias, precision)
        if self.in_c is not None:
            if c is None:
                raise ValueError("this flow is conditional: pass a condition")
            h = h + project_condition(self.in_c, c, precision)
        a = linear(F.relu(h), *self.out_params(), precision)
        s = self.clamp * torch.tanh(a[..., : self.active])
        return s, a[..., self.active :]

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | PositionalCondition | None = None,
        rev: bool = False,
        jac: bool = True,
        precision: str = "fp32",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`precision`: that of the matrix products (`matmul`); the scales and the log-det stay in x's dtype."""
        scale = self.scale()
        log_scale = torch.log(scale).sum()
        if not rev:
            x1, x2 = x[..., : self.passive], x[..., self.passive :]
            s, t = self._coeffs(x1, c, precision)
            y = torch.cat([x1, x2 * torch.exp(s) + t], dim=-1)
            y = linear(y, *self.mix_params(), precision)
            return y, (s.sum(-1) + log_scale) if jac else None
        y = (linear(x, self.w_perm.T, None, precision) - self.global_offset) / scale
        y1, y2 = y[..., : self.passive], y[..., self.passive :]
        s, t = self._coeffs(y1, c, precision)
        out = torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=-1)
        return out, (-s.sum(-1) - log_scale) if jac else None


class ConditionalFlow(nn.Module):
    """A sequence of coupling blocks: features z -> latent u with log|det J| (Eq. 7-8). `matmul_precision`
    is its matrix products' precision (`matmul`), a run setting that `device.Compute.place` sets."""

    def __init__(
        self,
        dim: int,
        cond_dim: int = 128,
        n_blocks: int = 8,
        clamp: float = 1.9,
        permutation: str = "soft",
        seed: int = 0,
    ):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.dim, self.cond_dim = dim, cond_dim
        self.matmul_precision = "fp32"
        self.blocks = nn.ModuleList(
            CouplingBlock(dim, cond_dim, clamp, permutation, generator) for _ in range(n_blocks)
        )

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor | PositionalCondition | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_det = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device) if jac else None
        for block in reversed(self.blocks) if rev else self.blocks:
            x, j = block(x, c, rev=rev, jac=jac, precision=self.matmul_precision)
            if jac:
                log_det = log_det + j
        return x, log_det

    def log_prob(self, x: torch.Tensor, c: torch.Tensor | PositionalCondition | None = None) -> torch.Tensor:
        """log p(z | c) per fiber (Eq. 8), with a standard normal base density."""
        u, log_det = self(x, c)
        return -0.5 * (u.square().sum(-1) + self.dim * LOG_2PI) + log_det


class FoldedFlow(nn.Module):
    """A trained `ConditionalFlow` at one feature-map size, folded for inference: same function, less work.

    Exact rewrites (a test checks them against `ConditionalFlow.log_prob`):
    - the condition's share of each first subnet layer, W_c c_i + b, is a constant per location,
      so it is computed once here instead of for every image;
    - the subnet's 0.1 output factor moves into its output weights, and the log-scale and shift
      rows stay one matrix product;
    - the global affine scaling and offset fold into the following permutation matrix;
    - fibers are rows, [B, L, D], and every weight is stored transposed, [in, out], so each block is
      three matrix products `activation @ weight` over all B*L fibers at once. A constant second
      input is the layout that onnxruntime's int8 kernels take (`quantize.py`), and it measured 5-15%
      faster in fp32 than weight-first products over channels-first maps.
    `MATMULS` products per block, in the order `weights()` and `forward`'s `ranges` use.
    The products run in the flow's `matmul_precision`, with the weights rounded to bf16 once here for bf16.
    Built from the flow's current weights and precision: rebuild it after either changes.
    """

    MATMULS = 3  # per block: passive half -> hidden, hidden -> (log-scale, shift), block output -> mixed

    def __init__(self, flow: ConditionalFlow, condition: torch.Tensor | PositionalCondition | None, locations: int):
        super().__init__()
        blocks = list(flow.blocks)
        first = blocks[0]
        self.dim, self.passive, self.active, self.clamp = flow.dim, first.passive, first.active, first.clamp
        self.precision = flow.matmul_precision
        with torch.no_grad():
            cond = []
            for b in blocks:
                if b.in_c is None:
                    cond.append(b.in_x.bias.expand(locations, -1))
                else:
                    if condition is None or condition.shape[0] != locations:
                        raise ValueError(f"this flow is conditional: pass a condition with {locations} rows")
                    cond.append(project_condition(b.in_c, condition, self.precision))
            stack = lambda f: torch.stack([f(b) for b in blocks]).contiguous()  # noqa: E731
            weight = lambda f: stack(f).to(torch.bfloat16) if self.precision == "bf16" else stack(f)  # noqa: E731
            self.register_buffer("w_in", weight(lambda b: b.in_x.weight.T))  # [n, p, H]
            self.register_buffer("c_in", torch.stack(cond).contiguous())  # [n, L, H]
            self.register_buffer("w_out", weight(lambda b: b.out_params()[0].T))  # [n, H, 2a]: log-scale, shift
            self.register_buffer("b_out", stack(lambda b: b.out_params()[1]))
            self.register_buffer("w_mix", weight(lambda b: b.mix_params()[0].T))  # [n, D, D]
            self.register_buffer("b_mix", stack(lambda b: b.mix_params()[1]))
            self.register_buffer("log_scale", sum(torch.log(b.scale()).sum() for b in blocks))

    def weights(self) -> list[torch.Tensor]:
        """The [in, out] weight of every matrix product, in forward order."""
        return [w[j] for j in range(len(self.w_in)) for w in (self.w_in, self.w_out, self.w_mix)]

    def forward(self, x: torch.Tensor, ranges: torch.Tensor | None = None) -> torch.Tensor:
        """log p(z | c) [B, L] of fibers [B, L, D]. With `ranges` ([n, MATMULS, 2]), also widens each
        product's (min, max) input range in place to cover this batch (int8 calibration)."""
        p, a = self.passive, self.active

        def product(v: torch.Tensor, j: int, i: int, w: torch.Tensor) -> torch.Tensor:
            if ranges is not None:
                ranges[j, i, 0] = torch.minimum(ranges[j, i, 0], v.min())
                ranges[j, i, 1] = torch.maximum(ranges[j, i, 1], v.max())
            return matmul(v, w, self.precision)

        log_det = torch.zeros_like(x[..., 0])
        for j in range(self.w_in.shape[0]):
            x1, x2 = x[..., :p], x[..., p:]
            h = torch.relu(product(x1, j, 0, self.w_in[j]) + self.c_in[j])
            st = product(h, j, 1, self.w_out[j]) + self.b_out[j]
            s = self.clamp * torch.tanh(st[..., :a])
            x2 = x2 * torch.exp(s) + st[..., a:]
            log_det = log_det + s.sum(-1)
            x = product(torch.cat([x1, x2], -1), j, 2, self.w_mix[j]) + self.b_mix[j]
        return -0.5 * (x.square().sum(-1) + self.dim * LOG_2PI) + log_det + self.log_scale


class LocationWhitening(nn.Module):
    """Per-location Gaussian whitening: an exact, invertible first layer of a decoder.

    The fiber z at location i maps to L_i^-1 (z - mu_i), where mu_i and L_i L_i^T are the mean and
    the regularised covariance of the training features at that location, fitted in closed form
    before the flow is trained; log|det| = -sum_j log (L_i)_jj. The covariance is shrunk towards
    its mean variance (Ledoit-Wolf, or a fixed ridge): a few dozen images cannot estimate hundreds
    of channels' covariance, and unshrunk directions without training variance blow up the
    distance of every unseen good image.
    Why: on real data the feature distribution changes with position far more than a
    position-conditioned flow learns (magnetic_tile image AUROC 76 -> 92 with the same taps);
    after this step the flow models what a per-location Gaussian misses. Costs H*W*D^2 floats per scale.
    """

    def __init__(self, locations: int, dim: int):
        super().__init__()
        self.locations, self.dim = locations, dim
        self.register_buffer("mean", torch.zeros(locations, dim))
        self.register_buffer("weight", torch.eye(dim).expand(locations, dim, dim).contiguous())
        self.register_buffer("log_det", torch.zeros(locations))

    @staticmethod
    def moments(fibers: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Float64 sums over a batch of [B, P, D] fibers, which add up over batches: (sum [P, D], sum of
        outer products [P, D, D], sum of |x|^4 [P], sum of |x|^2 x [P, D]); the last two give the
        fourth moments that Ledoit-Wolf shrinkage needs, in the same single pass."""
        x = fibers.double().transpose(0, 1).contiguous()  # [P, B, D]; strided batches take a slow path (100x)
        norm2 = x.square().sum(-1)  # [P, B]
        return x.sum(1), x.transpose(1, 2) @ x, norm2.square().sum(1), (norm2.unsqueeze(1) @ x).squeeze(1)

    @staticmethod
    def add_moments(acc: tuple[torch.Tensor, ...] | None, more: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The `moments` of two sets of fibers together (`acc` None: none yet)."""
        return more if acc is None else tuple(a + b for a, b in zip(acc, more))

    @staticmethod
    def ledoit_wolf(moments: tuple[torch.Tensor, ...], count: int) -> torch.Tensor:
        """Ledoit and Wolf's (2004) shrinkage intensity per location [P] for the covariance of `count`
        samples, from `moments`, as scikit-learn's `ledoit_wolf_shrinkage` computes it from the samples
        (tested): the share of the way from the sample covariance to its mean variance times I that
        minimises the expected error. Few images for many channels give a large share."""
        total, outer, norm4, norm2x = moments
        n, dim = count, total.shape[-1]
        mean = total / n
        cov = outer / n - mean.unsqueeze(2) * mean.unsqueeze(1)  # the maximum-likelihood covariance
        mm = mean.square().sum(-1)
        trace_outer = torch.diagonal(outer, dim1=1, dim2=2).sum(-1)
        # sum_i |x_i - mean|^4, expanded in the accumulated sums
        centred4 = (norm4 - 4 * (mean * norm2x).sum(-1) + 2 * mm * trace_outer
                    + 4 * (mean.unsqueeze(1) @ outer @ mean.unsqueeze(2)).view(-1) - 3 * n * mm.square())
        mu = torch.diagonal(cov, dim1=1, dim2=2).sum(-1) / dim
        frob = cov.square().sum((1, 2))
        delta = frob / dim - mu.square()  # |cov - mu I|_F^2 / D
        beta = torch.minimum((centred4 / n - frob) / (dim * n), delta)
        return torch.where(delta > 0, beta / delta.clamp_min(1e-300), torch.zeros_like(delta)).clamp(0.0, 1.0)

    @torch.no_grad()
    def fit_moments(self, moments: tuple[torch.Tensor, ...], count: int, eps: float, shrinkage: str = "ridge",
                    relative: bool = True) -> None:
        """Set mean, inverse Cholesky factor and log-det from accumulated `moments` of `count` images.
        `ridge`: the covariance plus eps times each location's mean variance, or eps itself with
        `relative=False` (PaDiM's 0.01 I). `ledoit-wolf`: each location's covariance shrunk towards its
        mean variance by `ledoit_wolf`'s intensity, then the relative ridge eps on top (which keeps a
        location with no variance invertible)."""
        if count < 2:
            raise ValueError("location whitening needs at least 2 training images")
        total, outer = moments[:2]
        mean = total / count
        cov = (outer - count * mean.unsqueeze(2) * mean.unsqueeze(1)) / (count - 1)
        variance = torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(1e-12)
        eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        if shrinkage == "ledoit-wolf":
            share = self.ledoit_wolf(moments, count)[:, None, None]
            cov = (1 - share) * cov + share * variance[:, None, None] * eye
        ridge = eps * variance if relative else torch.full((len(cov),), eps, device=cov.device)
        cov = cov + ridge.to(cov.dtype)[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(cov)
        if bool((info > 0).any()):
            raise ValueError(f"feature covariance is singular at {int((info > 0).sum())} locations: raise whitening_eps")
        self.mean.copy_(mean)
        self.weight.copy_(torch.linalg.solve_triangular(chol, eye.expand_as(cov), upper=False))
        self.log_det.copy_(-torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1))

    def forward(self, fibers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P, D] fibers -> (whitened [B, P, D], log|det| per location [P])."""
        if fibers.shape[1] != self.locations:
            raise ValueError(f"location whitening was fitted for {self.locations} feature locations, got "
                             f"{fibers.shape[1]}: feed images at the model's image size")
        x = (fibers - self.mean).permute(1, 2, 0)  # [P, D, B]
        return torch.bmm(self.weight, x).permute(2, 0, 1), self.log_det
