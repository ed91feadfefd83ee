"""The CFLOW-AD network: encoder, positional conditions and one flow decoder per scale.

A pure `nn.Module`: no data loading, no optimiser, no files. `forward` maps a batch of
[0,1] images to anomaly maps and scores with the constants fixed at training time.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
from torch import nn

from .baselines import SPADE, PaDiM, PatchCore
from .config import NORMALIZATIONS, CFlowConfig
from .contract import AnomalyModel
from .distributed import all_reduce
from .encoder import Encoder, encoder_for
from .errors import CflowInputError
from .flow_decoder import ConditionalFlow, FoldedFlow, LocationWhitening
from .positional_encoding import PositionalCondition
from .scoring import anomaly_maps, fixed_mode


# Location whitening keeps H*W*D^2 floats per scale; refuse more than 1 GiB of them.
WHITENING_FLOAT_LIMIT = 2**28


class CFlowModel(AnomalyModel):
    runtimes = ("torch", "onnx")
    normalizations = NORMALIZATIONS  # log-density maps: log, Eq. 8 (stateless) or rescaled per set (paper)
    training_loop = True
    deterministic = False  # the decoders' initial weights and the fiber order are drawn from the seed
    # Eq. 8's maximum, or with `config.location_score` the per-location deficit, which keep_aspect never
    # uses: the score is retaken from the map only where padding was cut off, so only for map scores
    map_max_score = True
    quantizable = True  # int8 decoder products (quantize.py)
    paper_taps = (3, 16)  # Sec. 5.1: the pyramid of PaDiM, ResNet layers 1-3

    def __init__(self, config: CFlowConfig, encoder: Encoder | None = None, pretrained: bool = True):
        super().__init__()
        self.config = config
        self.encoder = encoder or encoder_for(config, pretrained)
        cond = config.condition_dim if config.conditional else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.decoders = nn.ModuleList(
                ConditionalFlow(d, cond, config.coupling_layers, config.clamp_alpha, config.permutation, config.seed + k)
                for k, d in enumerate(self.encoder.channels)
            )
        # places (feature-map locations) per scale
        self.places = [(config.image_size[0] // s) * (config.image_size[1] // s) for s in config.strides]
        self.whitenings = None
        if config.whitening == "location":
            floats = sum(p * d * d for p, d in zip(self.places, self.encoder.channels))
            if floats > WHITENING_FLOAT_LIMIT:
                raise CflowInputError(
                    f"location whitening for {config.encoder} at {config.size_text} needs {floats * 4 / 2**30:.1f} GiB:"
                    " pass --whitening none, a smaller --image-size or fewer --pool-layers")
            self.whitenings = nn.ModuleList(LocationWhitening(p, d) for p, d in zip(self.places, self.encoder.channels))
        k = len(self.decoders)
        # Stateless normalisation constants (set by calibration at the end of training).
        self.register_buffer("ref_log_density", torch.zeros(k))
        self.register_buffer("map_offset", torch.tensor(float(k)))
        self.register_buffer("train_max_score", torch.tensor(1.0))
        # Mean and spread of l_k at each place of each scale over the training images, the scales' places
        # concatenated (row-major): the image score's reference (`location_deficit`).
        self.register_buffer("location_stats", torch.stack([torch.zeros(sum(self.places)), torch.ones(sum(self.places))]))
        # Input range (min, max) of every decoder matrix product on the training images, recorded with
        # the constants: what an int8 export quantises with (quantize.py). All zero: not recorded.
        self.register_buffer("activation_ranges", torch.zeros(k, config.coupling_layers, FoldedFlow.MATMULS, 2))
        self._recording = False
        self._conditions: dict[tuple[int, int], PositionalCondition] = {}
        self._folded: dict[tuple[int, int, int], tuple[tuple[int, ...], FoldedFlow]] = {}

    def train(self, mode: bool = True) -> "CFlowModel":
        if mode != self.training:  # fused optimisers update weights without bumping version counters
            self._folded.clear()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._folded.clear()  # device or dtype moves replace the tensors the caches were built from
        self._conditions.clear()
        return super()._apply(fn, recurse)

    def folded(self, k: int, height: int, width: int) -> FoldedFlow:
        """Decoder k folded for inference at one map size. Rebuilt after every switch between train
        and eval mode, whenever an in-place change (a state-dict load, a plain optimiser step)
        has bumped the version counter of one of the decoder's tensors, and when its precision changes."""
        decoder = self.decoders[k]
        version = (decoder.matmul_precision,
                   *(t._version for t in itertools.chain(decoder.parameters(), decoder.buffers())))
        key = (k, int(height), int(width))  # ints: an ONNX trace passes sizes as tensors
        if key not in self._folded or self._folded[key][0] != version:
            self._folded[key] = (version, FoldedFlow(decoder, self.condition(height, width), height * width))
        return self._folded[key][1]

    @property
    def has_activation_ranges(self) -> bool:
        return bool(self.activation_ranges.any())

    @contextlib.contextmanager
    def recording_ranges(self):
        """Inside, every eval-mode decoder pass widens `activation_ranges` to cover its inputs (they
        start empty); afterwards the ranks of a torchrun job agree on them."""
        ranges = self.activation_ranges
        ranges[..., 0].fill_(math.inf)
        ranges[..., 1].fill_(-math.inf)
        self._recording = True
        try:
            yield
        finally:
            self._recording = False
        all_reduce(ranges[..., 0], "min")
        all_reduce(ranges[..., 1], "max")
        if not torch.isfinite(ranges).all():
            ranges.zero_()  # no decoder pass ran: nothing recorded

    def int8_products(self) -> list[tuple[torch.Tensor, float, float]]:
        """(weight [in, out], input low, input high) of every decoder product at the model's image size,
        in the order a forward pass (and so an ONNX trace) runs them; `quantize.quantize_products` takes it."""
        if not self.has_activation_ranges:
            raise CflowInputError("this checkpoint has no recorded decoder input ranges (it was trained before"
                                  " int8 export existed): retrain it, or export without --quantize")
        with torch.no_grad():
            sizes = [f.shape[-2:] for f in self.features(torch.zeros(1, 3, *self.image_size, device=self.map_offset.device))]
        out = []
        for k, (h, w) in enumerate(sizes):
            ranges = self.activation_ranges[k].flatten(0, 1)
            out += [(wt, float(lo), float(hi)) for wt, (lo, hi) in zip(self.folded(k, h, w).weights(), ranges)]
        return out

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

    def condition(self, height: int, width: int) -> PositionalCondition | None:
        """Positional conditions of an h x w map (row-major locations), or None for UFLOW."""
        if not self.config.conditional:
            return None
        key = (int(height), int(width))
        if key not in self._conditions:
            self._conditions[key] = PositionalCondition(self.config.condition_dim, *key)
        return self._conditions[key].to(self.map_offset.device)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return self.encoder(images)

    def fibers(self, k: int, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale k's [B, D, h, w] map as the flow's input fibers [B, h*w, D] and the whitening
        log-det per location [h*w] (None without whitening)."""
        fibers = feature.flatten(2).transpose(1, 2)
        if self.whitenings is None:
            return fibers, None
        return self.whitenings[k](fibers)

    def log_likelihood(self, k: int, fibers: torch.Tensor, log_det: torch.Tensor | None, size: tuple[int, int],
                       log_prob=None) -> torch.Tensor:
        """Eq. 7's log p(z|c) per dimension for scale k's [B, h*w, D] fibers of an h x w map: the flow's
        log-density plus the whitening log-det. Training passes its differentiable `log_prob` (the
        decoder, or its DDP wrapper); in eval mode the folded flow computes it."""
        h, w = size
        if log_prob is not None or self.training:
            lp = (log_prob or self.decoders[k].log_prob)(fibers, self.condition(h, w))
        else:
            lp = self.folded(k, h, w)(fibers, self.activation_ranges[k] if self._recording else None)
        if log_det is not None:  # constant in theta
            lp = lp + log_det
        return lp / fibers.shape[-1]

    def log_density_maps(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-dimension log-likelihood log p(z|c)/D per location, one [B, h, w] map per scale."""
        out = []
        for k, f in enumerate(features):
            b, _, h, w = f.shape
            out.append(self.log_likelihood(k, *self.fibers(k, f), (h, w)).view(b, h, w))
        return out

    def location_deficit(self, log_maps: list[torch.Tensor]) -> torch.Tensor:
        """The image score [B] of `config.location_score`: max over scales and places of (mean - l) / sd
        with the training images' mean and spread there. Eq. 8's sum lets the likeliest scale outvote
        the others at each pixel; standardised per place, a defect that one scale sees, at a place that
        is otherwise steady, stands out. It ranks images better on magnetic_tile (benchmarks/RESULTS.md)."""
        logs = torch.cat([lm.flatten(1) for lm in log_maps], 1)
        mean, sd = self.location_stats
        return ((mean - logs) / sd).amax(1)

    def forward(self, images: torch.Tensor, mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly map [B, H, W] (higher = more anomalous) and image score [B], scored in `mode`
        (`log` or `stateless`; default: the checkpoint's, `fixed_mode`)."""
        logs = self.log_density_maps(self.features(images))
        amap, score = anomaly_maps(logs, self.ref_log_density, self.map_offset, tuple(images.shape[-2:]),
                                   mode or fixed_mode(self.config), self.config.blur_sigma)
        return amap, self.location_deficit(logs) if self.config.location_score else score


# Every method by its `config.method` name (config.METHODS lists the same names for the CLI).
METHOD_CLASSES: dict[str, type[AnomalyModel]] = {"cflow": CFlowModel, "padim": PaDiM, "spade": SPADE,
                                                 "patchcore": PatchCore}


def build_model(config: CFlowConfig, pretrained: bool = True) -> AnomalyModel:
    """The model that `config.method` names: CFLOW-AD or one of the baselines, all with one interface."""
    return METHOD_CLASSES[config.method](config, pretrained=pretrained)
