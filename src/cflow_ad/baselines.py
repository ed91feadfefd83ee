"""PaDiM and SPADE, the paper's baselines (Sec. 4.3, Table 1), on CFLOW-AD's own encoder and taps.

Both score one embedding: every tap upsampled (nearest) to the finest tap's grid and
concatenated, so a comparison with CFLOW-AD differs only in the density model. Each is an
`nn.Module` with `CFlowModel`'s interface (config, encoder, image_size, train_max_score,
forward(images) -> (anomaly map [B, H, W], score [B])), so test, predict and checkpoints
treat every method alike. Their maps are feature distances, upsampled and blurred as both
papers do. Fitting is closed-form (statistics or a gallery); `training.fit_baseline` feeds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import CFlowConfig
from .encoder import Encoder, encoder_for
from .flow_decoder import LocationWhitening

PADIM_RIDGE = 0.01  # PaDiM's Sigma + 0.01 I


def embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """All taps at the finest tap's grid, concatenated: [B, sum D_k, h_0, w_0]."""
    size = features[0].shape[-2:]
    return torch.cat([features[0], *(F.interpolate(f, size=size, mode="nearest") for f in features[1:])], 1)


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


class DistanceModel(nn.Module):
    """Shared frame of the baselines: encoder, embedding grid, map upsampling and blur."""

    fitted = ()  # buffers whose size fitting decides (a gallery, a memory bank): a checkpoint sets their shapes

    def __init__(self, config: CFlowConfig, encoder: Encoder | None = None, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.encoder = encoder or encoder_for(config, pretrained)
        self.dim = sum(self.encoder.channels)
        side = config.image_size // config.strides[0]
        self.grid = (side, side)
        self.register_buffer("train_max_score", torch.tensor(1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.fitted:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return self.encoder(images)

    def distance_maps(self, features: list[torch.Tensor], gallery_index: torch.Tensor | None = None):
        """(distance map [B, h_0, w_0], image score [B] or None for the map's maximum)."""
        raise NotImplementedError

    def maps_from_features(self, features: list[torch.Tensor], gallery_index: torch.Tensor | None = None):
        """(anomaly map [B, H, W], score [B]). `gallery_index`: the images' own places in a gallery, left
        out of their search (SPADE scoring its own training images)."""
        dist, score = self.distance_maps(features, gallery_index)
        amap = F.interpolate(dist.unsqueeze(1), size=self.image_size, mode="bilinear", align_corners=False)
        sigma = self.config.blur_sigma
        if sigma > 0:
            amap = gaussian_blur(amap, sigma)
        amap = amap.squeeze(1)
        return amap, amap.flatten(1).amax(1) if score is None else score

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.maps_from_features(self.features(images))


class PaDiM(DistanceModel):
    """A Gaussian per location over a random channel subset; the map is the Mahalanobis distance.

    The Gaussian is a `LocationWhitening` with PaDiM's absolute ridge, so |W (x - mu)| is the
    Mahalanobis distance through a Cholesky solve (no explicit inverse).
    """

    def __init__(self, config: CFlowConfig, encoder: Encoder | None = None, pretrained: bool = True):
        super().__init__(config, encoder, pretrained)
        keep = min(config.padim_channels, self.dim)
        gen = torch.Generator().manual_seed(config.seed)
        self.register_buffer("channels", torch.randperm(self.dim, generator=gen)[:keep].sort().values)
        self.gaussian = LocationWhitening(self.grid[0] * self.grid[1], keep)

    def fibers(self, features: list[torch.Tensor]) -> torch.Tensor:
        return embedding(features)[:, self.channels].flatten(2).transpose(1, 2)

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        total = outer = None
        count = 0
        for features in feature_batches:
            s, o = LocationWhitening.moments(self.fibers(features))
            total, outer = (s, o) if total is None else (total + s, outer + o)
            count += features[0].shape[0]
        self.gaussian.fit_moments(total, outer, count, PADIM_RIDGE, relative=False)

    def distance_maps(self, features, gallery_index=None):
        z, _ = self.gaussian(self.fibers(features))
        return z.square().sum(-1).sqrt().view(-1, *self.grid), None


class SPADE(DistanceModel):
    """k-NN against a gallery of the training images' features.

    Image score: mean distance of the pooled deepest tap to its `knn_images` nearest training
    images. Pixel map: distance of each embedding vector to its nearest neighbour among all
    locations of those images. The gallery grows with the training set (N x h x w x D floats).
    """

    fitted = ("bank", "pooled")  # the gallery's size is the training set's

    def __init__(self, config: CFlowConfig, encoder: Encoder | None = None, pretrained: bool = True):
        super().__init__(config, encoder, pretrained)
        self.register_buffer("bank", torch.zeros(0, self.dim, *self.grid))
        self.register_buffer("pooled", torch.zeros(0, self.encoder.channels[-1]))

    @staticmethod
    def pool(features: list[torch.Tensor]) -> torch.Tensor:
        return features[-1].mean((2, 3))

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        banks, pooled = [], []
        for features in feature_batches:
            banks.append(embedding(features))
            pooled.append(self.pool(features))
        self.bank, self.pooled = torch.cat(banks), torch.cat(pooled)

    def distance_maps(self, features, gallery_index=None, chunk: int = 8):
        if len(self.bank) == 0:
            raise RuntimeError("SPADE has an empty gallery: fit it on training images first")
        emb, query = embedding(features), self.pool(features)
        d_img = torch.cdist(query, self.pooled)
        if gallery_index is not None:
            d_img[torch.arange(len(query), device=d_img.device), gallery_index.to(d_img.device)] = float("inf")
        k = min(self.config.knn_images, len(self.pooled) - (gallery_index is not None))
        near_d, near_i = d_img.topk(max(k, 1), dim=1, largest=False)
        maps = []
        for x, idx in zip(emb.flatten(2), near_i):  # x [D, P]: one image at a time bounds the memory
            x_sq = x.square().sum(0, keepdim=True).T  # [P, 1]
            best = torch.full((x.shape[1],), float("inf"), device=x.device)
            for part in idx.split(chunk):
                g = self.bank[part].flatten(2).transpose(0, 1).flatten(1)  # [D, chunk * P]
                d2 = x_sq + g.square().sum(0, keepdim=True) - 2 * (x.T @ g)
                best = torch.minimum(best, d2.amin(1))
            maps.append(best.clamp_min(0).sqrt())
        return torch.stack(maps).view(-1, *self.grid), near_d.mean(1)
