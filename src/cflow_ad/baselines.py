"""PaDiM and SPADE, the paper's baselines (Sec. 4.3, Table 1), and PatchCore, on CFLOW-AD's own encoder and taps.

All score one embedding: every tap upsampled (nearest) to the finest tap's grid and
concatenated, so a comparison with CFLOW-AD differs only in the density model. Each is a
`contract.AnomalyModel`, as `CFlowModel` is (config, encoder, image_size, train_max_score,
forward(images) -> (anomaly map [B, H, W], score [B])), so test, predict and checkpoints
treat every method alike. Their maps are feature distances, upsampled and blurred as the
papers do. Fitting is closed-form (statistics, a gallery or a coreset); `training.fit_baseline` feeds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .config import CFlowConfig
from .contract import AnomalyModel
from .encoder import Encoder, encoder_for
from .errors import CflowInputError
from .flow_decoder import LocationWhitening
from .scoring import gaussian_blur

PADIM_RIDGE = 0.01  # PaDiM's Sigma + 0.01 I
# PatchCore (Roth et al., CVPR 2022): each tap averaged over a 3x3 patch neighbourhood (Sec. 3.1), the coreset
# chosen on a random projection to 128 dimensions (Johnson-Lindenstrauss, Sec. 3.2), and the image score
# reweighted over the b = 9 memory neighbours of the nearest memory patch (Sec. 3.3).
PATCH_NEIGHBOURHOOD = 3
PROJECTION_DIM = 128
REWEIGHT_NEIGHBOURS = 9
CORESET_CHUNK = 16384  # points per distance update: the update's temporaries stay in cache (2x faster here)
SEARCH_FLOATS = 2**24  # query x memory distances held at once by a nearest-neighbour search (64 MB)


def embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """All taps at the finest tap's grid, concatenated: [B, sum D_k, h_0, w_0]."""
    size = features[0].shape[-2:]
    return torch.cat([features[0], *(F.interpolate(f, size=size, mode="nearest") for f in features[1:])], 1)


class DistanceModel(AnomalyModel):
    """Shared frame of the baselines: encoder, embedding grid, map upsampling and blur."""

    runtimes = ("torch", "onnx")
    normalizations = ()  # distance maps: the same in every scoring mode
    training_loop = False  # fitted in one pass over the training features (`training.fit_baseline`)
    deterministic = False  # PaDiM's channel subset and PatchCore's projection and coreset start are drawn

    fitted = ()  # buffers whose size fitting decides (a gallery, a memory bank): a checkpoint sets their shapes
    map_max_score = True  # PaDiM; SPADE and PatchCore score from the features
    quantizable = False  # no decoders: distances to Gaussians or patches stay fp32
    paper_taps = (3, 16)  # PaDiM and SPADE: ResNet layers 1-3

    def __init__(self, config: CFlowConfig, encoder: Encoder | None = None, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.encoder = encoder or encoder_for(config, pretrained)
        self.dim = sum(self.encoder.channels)
        self.grid = tuple(v // config.strides[0] for v in config.image_size)
        self.register_buffer("train_max_score", torch.tensor(1.0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Reshapes the fitted buffers to the checkpoint's, on the module's device and in its dtype (as
        loading keeps every other buffer), not where the checkpoint was read."""
        for name in self.fitted:
            if prefix + name in state_dict:
                setattr(self, name, getattr(self, name).new_empty(state_dict[prefix + name].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

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
        moments = None
        count = 0
        for features in feature_batches:
            moments = LocationWhitening.add_moments(moments, LocationWhitening.moments(self.fibers(features)))
            count += features[0].shape[0]
        self.gaussian.fit_moments(moments, count, PADIM_RIDGE, relative=False)

    def distance_maps(self, features, gallery_index=None):
        z, _ = self.gaussian(self.fibers(features))
        return z.square().sum(-1).sqrt().view(-1, *self.grid), None


class SPADE(DistanceModel):
    """k-NN against a gallery of the training images' features.

    Image score: mean distance of the pooled deepest tap to its `knn_images` nearest training
    images. Pixel map: distance of each embedding vector to its nearest neighbour among all
    locations of those images. The gallery grows with the training set (N x h x w x D floats, bounded by --memory-mb).
    """

    fitted = ("bank", "pooled")  # the gallery's size is the training set's
    runtimes = ("torch",)  # the gallery search picks each image's nearest training images: no ONNX form
    deterministic = True  # the gallery is every training image's features: nothing is drawn
    map_max_score = False  # the mean distance to the nearest training images

    def __init__(self, config: CFlowConfig, encoder: Encoder | None = None, pretrained: bool = True):
        super().__init__(config, encoder, pretrained)
        self.register_buffer("bank", torch.zeros(0, self.dim, *self.grid))
        self.register_buffer("pooled", torch.zeros(0, self.encoder.channels[-1]))

    @staticmethod
    def pool(features: list[torch.Tensor]) -> torch.Tensor:
        return features[-1].mean((2, 3))

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        """Keep every training image's embedding and pooled features; a batch that would take the gallery past
        --memory-mb is refused before it is kept (117 MB an image: WRN50's layers 1-3 at 512 px)."""
        banks, pooled, size = [], [], 0
        for features in feature_batches:
            emb, pool = embedding(features), self.pool(features)
            size += emb.nbytes + pool.nbytes
            if size > self.config.memory_mb * 2**20:
                raise CflowInputError(
                    f"SPADE's gallery ({sum(map(len, banks)) + len(emb):,} training images so far) needs more than"
                    f" --memory-mb {self.config.memory_mb}: raise it, train on fewer images, or use a smaller"
                    " --image-size or fewer --pool-layers")
            banks.append(emb)
            pooled.append(pool)
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
            best = torch.full((x.shape[1],), float("inf"), device=x.device)
            for part in idx.split(chunk):
                g = self.bank[part].flatten(2).transpose(0, 1).flatten(1)  # [D, chunk * P]
                best = torch.minimum(best, squared_distances(x.T, g.T).amin(1))
            maps.append(best.sqrt())
        return torch.stack(maps).view(-1, *self.grid), near_d.mean(1)


def k_center_greedy(points: torch.Tensor, count: int, start: int, chunk: int | None = None) -> torch.Tensor:
    """Greedy k-center selection (PatchCore's coreset): indices [count] of `points` [N, d], on their device, each
    the point farthest from those chosen before it, from `start` on. The squared distance of every point to the
    chosen set is kept as a running minimum updated `chunk` points at a time, so memory is N floats beyond the
    points and no N x N matrix exists. On a CPU the chunk (default CORESET_CHUNK) keeps the update in cache, and
    points stored column-major (a [d, N] tensor's .T) update ~2x faster; elsewhere the default is one update of
    all N, as each chunk is a kernel launch. Each pick stays on the device, so the host never waits on one."""
    n = len(points)
    chunk = chunk or (CORESET_CHUNK if points.device.type == "cpu" else n)
    norms = points.square().sum(1)
    nearest = torch.full((n,), float("inf"), device=points.device)
    picks = torch.empty(count, dtype=torch.long, device=points.device)
    pick = torch.tensor(start, device=points.device)
    for i in range(count):
        picks[i] = pick
        centre, offset = points.index_select(0, pick)[0], norms.index_select(0, pick)  # not points[pick]: a host read
        for lo in range(0, n, chunk):
            part = slice(lo, lo + chunk)
            d2 = torch.addmv(norms[part] + offset, points[part], centre, alpha=-2)
            torch.minimum(nearest[part], d2, out=nearest[part])
        pick = nearest.argmax()
    return picks


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a_i - b_j|^2 [len(a), len(b)] as |a|^2 - 2ab + |b|^2 (one matmul), clamped at 0 against rounding."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min(0)


class PatchCore(DistanceModel):
    """Nearest-neighbour distance to a coreset of the training images' locally aware patch features.

    Memory: the coreset (`coreset_ratio` of all training patches, full dimension) and, per memory patch,
    its `REWEIGHT_NEIGHBOURS` nearest memory patches (itself first) for the image score. Fitting holds
    every training patch once, in full and projected (N x (D + 128) floats, bounded by --memory-mb); the
    greedy selection runs in chunks without an N x N matrix, and a search holds at most SEARCH_FLOATS distances.
    """

    fitted = ("memory", "neighbours")  # the coreset's size is a share of the training set's
    map_max_score = False  # the reweighted distance of the most distant patch
    paper_taps = (2, 16)  # Sec. 4: WideResNet-50 layers 2 and 3

    def __init__(self, config: CFlowConfig, encoder: Encoder | None = None, pretrained: bool = True):
        super().__init__(config, encoder, pretrained)
        self.register_buffer("memory", torch.zeros(0, self.dim))
        self.register_buffer("neighbours", torch.zeros(0, REWEIGHT_NEIGHBOURS, dtype=torch.long))

    @staticmethod
    def patches(features: list[torch.Tensor]) -> torch.Tensor:
        """Locally aware patch features [B, h_0 * w_0, D]: every tap averaged over its 3x3 neighbourhood,
        then the embedding. At the borders the window counts zeros outside the map, as the PatchCore
        authors' and anomalib's pooling does: averaging only the part inside kept the encoder's border
        artefacts at full strength, and good images' most distant patch sat there (magnetic_tile image
        AUROC 83.0 against 93.3 zero-padded; anomalib 93.0)."""
        pad = PATCH_NEIGHBOURHOOD // 2
        local = [F.avg_pool2d(f, PATCH_NEIGHBOURHOOD, 1, pad, count_include_pad=True) for f in features]
        return embedding(local).flatten(2).transpose(1, 2)

    def fit(self, feature_batches: Iterable[list[torch.Tensor]]) -> None:
        gen = torch.Generator().manual_seed(self.config.seed)
        projection = torch.randn(self.dim, PROJECTION_DIM, generator=gen) if self.dim > PROJECTION_DIM else None
        full, projected, count = [], [], 0
        for features in feature_batches:
            x = self.patches(features).flatten(0, 1)
            if projection is not None:
                projection = projection.to(x.device)
            full.append(x)
            projected.append((x if projection is None else x @ projection).T.contiguous())
            count += len(x)
            if count * (x.shape[1] + projected[-1].shape[0]) * 4 > self.config.memory_mb * 2**20:
                raise CflowInputError(
                    f"PatchCore's training patches ({count:,} so far) need more than --memory-mb"
                    f" {self.config.memory_mb}: raise it, or use a smaller --image-size or fewer --pool-layers")
        if not full:
            raise ValueError("PatchCore needs at least one training image")
        points = torch.cat(projected, 1).T  # column-major [N, d]: see k_center_greedy
        del projected
        start = int(torch.randint(count, (1,), generator=gen))
        picks = k_center_greedy(points, max(1, round(self.config.coreset_ratio * count)), start).sort().values
        del points
        offsets = torch.tensor([0, *(len(f) for f in full)], device=picks.device).cumsum(0)
        batch = torch.searchsorted(offsets, picks, right=True) - 1  # gathered per batch: no copy of all patches
        self.remember(torch.cat([full[b][(picks[batch == b] - offsets[b]).to(full[b].device)]
                                 for b in batch.unique().tolist()]))

    def remember(self, memory: torch.Tensor) -> None:
        """Set the memory bank [M, D] and each memory patch's nearest memory patches, itself first."""
        b = min(REWEIGHT_NEIGHBOURS, len(memory))
        chunk = max(1, SEARCH_FLOATS // len(memory))
        rows = []
        for lo in range(0, len(memory), chunk):
            d2 = squared_distances(memory[lo : lo + chunk], memory)
            own = torch.arange(len(d2), device=memory.device)
            d2[own, own + lo] = float("inf")
            rows.append(torch.cat([(own + lo)[:, None], d2.topk(b - 1, 1, largest=False).indices], 1))
        self.memory, self.neighbours = memory, torch.cat(rows)

    def nearest(self, queries: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance [Q] and index [Q] of each query's nearest memory patch, `chunk` memory patches at a time
        (default: SEARCH_FLOATS distances at once). The loop runs over the memory, whose size is fixed, so an
        ONNX trace covers any batch size."""
        chunk = chunk or max(1, SEARCH_FLOATS // max(len(queries), 1))
        best, where = [], []
        for lo in range(0, len(self.memory), chunk):
            d2, i = squared_distances(queries, self.memory[lo : lo + chunk]).min(1)
            best.append(d2)
            where.append(i + lo)
        d2, part = torch.stack(best, 1).min(1)
        return d2.sqrt(), torch.stack(where, 1).gather(1, part[:, None]).squeeze(1)

    def image_scores(self, patches: torch.Tensor, dist: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """PatchCore's image score w * s*: s* the largest patch distance, at test patch p* with nearest memory
        patch m*, and w = 1 - exp|p* - m*| / sum over N_b(m*) of exp|p* - m|, N_b(m*) the b nearest memory
        patches of m* (m* itself first). The ratio is a softmax over those b distances taken at m*, computed
        stably (exponents shifted by their maximum, never overflowing); as |p* - m*| is the smallest of the
        b distances, w lies in [1 - 1/b, 1)."""
        s_star, p = dist.max(1)
        p_star = patches.gather(1, p[:, None, None].expand(-1, 1, patches.shape[2]))  # [B, 1, D]
        m_star = index.gather(1, p[:, None]).squeeze(1)
        support = self.memory[self.neighbours[m_star]]  # [B, b, D]
        weight = 1 - torch.softmax((support - p_star).square().sum(2).sqrt(), 1)[:, 0]
        return weight * s_star

    def distance_maps(self, features, gallery_index=None):
        """Training images are not left out (`gallery_index` is unused): only the coreset's patches are in
        the memory, and no training patch is farther from it than the coreset's covering radius."""
        if len(self.memory) == 0:
            raise RuntimeError("PatchCore has an empty memory bank: fit it on training images first")
        patches = self.patches(features)
        b, p, _ = patches.shape
        dist, index = self.nearest(patches.flatten(0, 1))
        dist, index = dist.view(b, p), index.view(b, p)
        return dist.view(-1, *self.grid), self.image_scores(patches, dist, index)
