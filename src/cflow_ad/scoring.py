"""Eq. 8 onwards: per-scale log-likelihood maps -> anomaly map and image score, in one place.

Per scale k the per-dimension log-likelihood l_k is turned into a probability
P_k = exp(l_k - ref_k) in (0, 1], upsampled bilinearly to the input size and summed
over scales into S. The image score is the map's maximum. Three modes:

- `log` (default): log(offset) - log S, computed in log space. It orders pixels exactly as
  Eq. 8 does, but never saturates: far from the training data every P_k underflows and
  offset - S pins at the offset, while log S keeps falling.
- `stateless`: Eq. 8, offset - S, with ref_k and offset fixed from training data.
- `paper`: Eq. 8 with ref_k and offset taken from the evaluated set itself, as the authors'
  code does (ref_k = max of l_k over the set, offset = max of S).

The first two never depend on the other images scored with them; their constants are fitted
by `fit_constants` when training ends.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import all_reduce
from .errors import CflowInputError

# Least spread of a place's log-likelihood, as a fraction of its scale's median spread: a place that
# never varies (a constant background) would otherwise turn rounding noise into the image score.
SPREAD_FLOOR = 0.1


def fixed_mode(config) -> str:
    """The mode of a checkpoint's constants, thresholds and heat-map scale: `log`, or `stateless` for
    a model configured for either Eq. 8 mode (`paper` calibrates its thresholds with `stateless`)."""
    return "log" if config.normalization == "log" else "stateless"


def probability_sum(log_maps: Sequence[torch.Tensor], refs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 8's S = sum_k upsample(exp(l_k - ref_k)) as [B, H, W]; `log_maps` are [B, h_k, w_k]."""
    total = None
    for k, lm in enumerate(log_maps):
        p = torch.exp(lm - refs[k]).unsqueeze(1)
        p = F.interpolate(p, size=size, mode="bilinear", align_corners=True).squeeze(1)
        total = p if total is None else total + p
    return total


def _interpolation(n_in: int, n_out: int) -> np.ndarray:
    """[n_in, n_out] weights of linear upsampling with align_corners=True (as `probability_sum`),
    from integer arithmetic: an output that lies on a sample gets exactly one nonzero weight."""
    weights = np.zeros((n_in, n_out))
    den = max(n_out - 1, 1)
    for j in range(n_out):
        lo, rem = divmod(j * (n_in - 1), den)
        weights[lo, j] += 1 - rem / den
        if rem:
            weights[lo + 1, j] += rem / den
    return weights


@functools.lru_cache(maxsize=64)
def _plan(n_ins: tuple[int, ...], n_out: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """How `_log_upsample` evaluates log(exp(x) @ A) for A = the stacked interpolation matrices of
    `n_ins` inputs to `n_out` outputs. Outputs are cut into blocks of neighbours that draw on the same
    inputs, each with a positive weight; a block's inputs are padded to one width by repeating one of
    them (with weight 0). Returns (input index per block slot, [blocks * width, n_out] slot weights,
    block of each output, width)."""
    a = np.concatenate([_interpolation(n, n_out) for n in n_ins])
    blocks: list[tuple[int, ...]] = []
    block_of = np.zeros(n_out, np.int64)
    for j in range(n_out):
        support = tuple(np.flatnonzero(a[:, j] > 0))
        if not blocks or blocks[-1] != support:
            blocks.append(support)
        block_of[j] = len(blocks) - 1
    width = max(map(len, blocks))
    index = np.array([list(b) + [b[0]] * (width - len(b)) for b in blocks], np.int64).ravel()
    slots = np.zeros((len(blocks) * width, n_out), np.float32)
    for j in range(n_out):
        b = block_of[j]
        slots[b * width : b * width + len(blocks[b]), j] = a[list(blocks[b]), j]
    as_tensor = lambda v: torch.from_numpy(v).to(device)  # noqa: E731
    return as_tensor(index), as_tensor(slots), as_tensor(block_of), width


def _log_upsample(x: torch.Tensor, n_ins: Sequence[int], n_out: int) -> torch.Tensor:
    """log(exp(x) @ A) over the last axis of `x` (log values, the inputs of `n_ins` side by side), A as
    in `_plan`, without under- or overflow: each block's inputs are shifted by their maximum before the
    exponential, so every term is <= 1 and the largest, 1, has a positive weight at every output of
    the block; the block's weighted sums are then one matrix product. About ten full-size operations,
    against some fifty for pairwise log-add-exps (3.6x faster in PyTorch, benchmarks/RESULTS.md)."""
    index, slots, block_of, width = _plan(tuple(int(n) for n in n_ins), int(n_out), str(x.device))
    g = x[..., index].unflatten(-1, (-1, width))
    top = g.amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)  # finite, so -inf inputs give -inf
    return torch.log(torch.exp(g - top).flatten(-2) @ slots) + top.squeeze(-1)[..., block_of]


def log_probability_sum(log_maps: Sequence[torch.Tensor], refs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """log S as [B, H, W] without under- or overflow. Bilinear upsampling is separable: each scale's
    map is upsampled along its rows in log space, then the scales, side by side, along the columns,
    which also sums them."""
    rows = [_log_upsample((lm.float() - refs[k]).transpose(-1, -2), [lm.shape[-2]], size[0]).transpose(-1, -2)
            for k, lm in enumerate(log_maps)]  # [B, H, w_k]
    return _log_upsample(torch.cat(rows, -1), [lm.shape[-1] for lm in log_maps], size[1])


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, 1, H, W] maps with reflected borders, radius 4 sigma.
    torchvision's blur gives the same result (tested) but does not export to ONNX with a dynamic
    batch and costs (8 sigma + 1)^2 instead of 2 (8 sigma + 1) multiply-adds per pixel."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


def anomaly_maps(log_maps: Sequence[torch.Tensor], refs: torch.Tensor, offset: torch.Tensor | float,
                 size: tuple[int, int], mode: str = "log", blur: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly map [B, H, W], image score [B]) for fixed constants: log(offset) - log S in `log`
    mode, offset - S otherwise, blurred by a Gaussian of `blur` pixels (0: none) as PaDiM's map is:
    the finest scale's map is noisy from place to place, and a defect spans several places."""
    if mode == "log":
        amap = torch.log(torch.as_tensor(offset, dtype=torch.float32)) - log_probability_sum(log_maps, refs, size)
    else:
        amap = offset - probability_sum(log_maps, refs, size)
    if blur > 0:
        amap = gaussian_blur(amap.unsqueeze(1), blur).squeeze(1)
    return amap, amap.flatten(1).amax(1)


def paper_constants(log_maps: Sequence[torch.Tensor], size: tuple[int, int],
                    chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' constants taken over a whole evaluated set: (refs [K], offset)."""
    refs = torch.stack([lm.max() for lm in log_maps])
    n = log_maps[0].shape[0]
    offset = max(
        probability_sum([lm[i : i + chunk] for lm in log_maps], refs, size).max().item() for i in range(0, n, chunk)
    )
    return refs, torch.tensor(offset)


def score_set(
    log_maps: Sequence[torch.Tensor],
    size: tuple[int, int],
    mode: str,
    refs: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps [N, H, W] and scores [N] for a whole set of per-scale log maps [N, h_k, w_k]."""
    if mode == "paper":
        refs, offset = paper_constants(log_maps, size, chunk)
    elif refs is None or offset is None:
        raise ValueError(f"{mode} scoring needs the constants fixed at training time")
    maps, scores = [], []
    for i in range(0, log_maps[0].shape[0], chunk):
        m, s = anomaly_maps([lm[i : i + chunk] for lm in log_maps], refs, offset, size, mode)
        maps.append(m)
        scores.append(s)
    return torch.cat(maps), torch.cat(scores)


def paper_stream(batches: Iterable[tuple[list[torch.Tensor], object]], size: tuple[int, int], host: Callable,
                 blur: float = 0.0):
    """`paper` mode over a stream of (per-scale log maps, payload) batches: the set's constants need
    every batch first, so the log maps (small: 5 KB an image at 256 px) are kept on their device, then
    (maps, scores, payload) come back through `host` a batch at a time."""
    kept = list(batches)
    if not kept:
        return
    refs, offset = paper_constants([torch.cat(p) for p in zip(*(logs for logs, _ in kept))], size)
    for logs, payload in kept:
        yield (*host(*anomaly_maps(logs, refs, offset, size, "paper", blur)), payload)


@torch.no_grad()
def fit_constants(model, log_batches: Callable[[], Iterable[list[torch.Tensor]]], chunk: int = 64,
                  budget_bytes: int = 256 << 20) -> None:
    """Fix the constants of `model` from its training images' log maps: per-scale max log-density
    (ref_k), the mean and spread of the log-density at each place (`location_stats`), the largest S
    (the map offset, so training maps are >= 0) and the largest training map value in the model's
    mode (the heat-map scale). `log_batches()` yields each image batch's per-scale
    log maps. Memory stays bounded however many images there are: the batches are kept between the two
    passes while they fit in `budget_bytes`, else made again (one more decoder pass). Images with a
    non-finite map are left out. Under torchrun the ranks agree on every constant."""

    def finite_batches(batches):
        for logs in batches:
            ok = torch.stack([torch.isfinite(lm).flatten(1).all(1) for lm in logs]).all(0)
            if ok.any():
                yield [lm[ok] for lm in logs]

    refs = torch.full((len(model.decoders),), -math.inf, device=model.map_offset.device)
    moments = torch.zeros(3, model.location_stats.shape[1], dtype=torch.float64)  # count, sum, sum of squares
    kept: list[list[torch.Tensor]] | None = []
    size = 0
    for logs in finite_batches(log_batches()):
        refs = torch.maximum(refs, torch.stack([lm.max() for lm in logs]))
        flat = torch.cat([lm.flatten(1) for lm in logs], 1).cpu().double()
        moments += torch.stack([torch.full_like(flat[0], len(flat)), flat.sum(0), flat.square().sum(0)])
        size += sum(lm.numel() * lm.element_size() for lm in logs)
        kept = kept if kept is not None and size <= budget_bytes else None
        if kept is not None:
            kept.append(logs)
    refs = all_reduce(refs, "max")
    if not torch.isfinite(refs).all():
        raise CflowInputError("the trained model gives no finite likelihood on any training image: it cannot be used")
    model.ref_log_density.copy_(refs)
    count, total, squares = all_reduce(moments, "sum")
    mean = total / count
    spread = ((squares / count - mean.square()).clamp_min(0) * count / (count - 1).clamp_min(1)).sqrt()
    floors = [part.median() * SPREAD_FLOOR for part in spread.split(model.places)]
    spread = torch.cat([part.clamp_min(max(floor.item(), 1e-6)) for part, floor in zip(spread.split(model.places), floors)])
    model.location_stats.copy_(torch.stack([mean, spread]))
    high, low = -math.inf, math.inf  # of log S
    for logs in kept if kept is not None else finite_batches(log_batches()):
        for i in range(0, logs[0].shape[0], chunk):  # full-size maps only a chunk at a time
            log_s = log_probability_sum([lm[i : i + chunk] for lm in logs], refs, model.image_size)
            high, low = max(high, log_s.max().item()), min(low, log_s.min().item())
    high = all_reduce(torch.tensor(high), "max").item()
    low = all_reduce(torch.tensor(low), "min").item()
    model.map_offset.fill_(math.exp(high))
    top = high - low if model.config.normalization == "log" else math.exp(high) - math.exp(low)
    model.train_max_score.fill_(max(top, 1e-6))
