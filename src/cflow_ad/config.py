"""The one configuration of a CFLOW-AD model and its training run.

Every option lives here once, with its help text: the CLI builds its flags from these
fields, the checkpoint stores them, and the docs list them from this file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import CflowInputError

ENCODERS = (
    "mobilenet_v2", "resnet18", "wide_resnet50_2", "mobilenet_v3_large",
    "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
)
LOSSES = ("nll", "logsigmoid")
NORMALIZATIONS = ("log", "stateless", "paper")
IMAGE_SCORES = ("auto", "location", "map")
QUANTIZE = ("int8",)  # `export --quantize`: the decoders' matrix products in int8 (quantize.py)
PERMUTATIONS = ("soft", "hard")
WHITENINGS = ("location", "none")
SHRINKAGES = ("ledoit-wolf", "ridge")
METHODS = ("cflow", "padim", "spade", "patchcore")

# Inclusive ranges of the numeric fields, wide enough for any real use: a model file that asks for more
# (an edited checkpoint with coupling_layers 100000 would take ~135 GB to build) is refused before it costs
# anything. Every float is finite, and image_size sides are 32 to MAX_SIDE.
MAX_SIDE = 8192
RANGES: dict[str, tuple[float, float]] = {
    "pool_layers": (1, 4), "tile": (0, MAX_SIDE), "tile_overlap": (0, MAX_SIDE), "border_pad": (0, MAX_SIDE),
    "coupling_layers": (1, 64), "condition_dim": (4, 1024), "clamp_alpha": (0.0, 100.0), "whitening_eps": (0.0, 1e6),
    "padim_channels": (1, 8192), "knn_images": (1, 100_000), "blur_sigma": (0.0, 64.0), "epochs": (1, 100_000),
    "sub_epochs": (1, 10_000), "min_steps": (0, 10_000_000), "batch_size": (1, 1024), "fiber_batch": (1, 1 << 24),
    "lr": (0.0, 10.0), "warmup_epochs": (0.0, 100_000.0), "rotation": (0.0, 180.0), "memory_mb": (0, 1 << 24),
    "seed": (0, 2**32 - 1),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt(default: Any, help: str, choices: tuple | None = None, **kw: Any) -> Any:
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta, **kw)


@dataclass
class CFlowConfig:
    """Model architecture, preprocessing, training and scoring settings."""

    method: str = _opt(
        "cflow", "cflow: the flow decoders; padim, spade: the paper's baselines; patchcore: PatchCore (Roth et al."
        " 2022); every baseline on the same encoder and taps.", METHODS
    )
    # encoder h(lambda)
    encoder: str = _opt("mobilenet_v2", "ImageNet-pretrained CNN encoder.", ENCODERS)
    weights: str | None = _opt(
        None, "Local encoder weights file (.pth state dict); default: installed package, then torchvision download."
    )
    pool_layers: int = _opt(
        4, "Number K of pooled feature scales (1-4). 4 with last_stride 32: taps at strides 4/8/16/32, the paper's"
        " 4/8/16 (PaDiM's) and a coarse one for broad defects."
    )
    last_stride: int = _opt(32, "Stride of the deepest tap; the K taps sit at last_stride/2^i (32, K=3 -> 8/16/32).")
    image_size: tuple[int, int] = _opt(
        (256, 256), "Model input height and width (one value: a square); multiples of 32. Images are resized to it,"
        " without cropping."
    )
    keep_aspect: bool = _opt(
        False, "Resize each image to fit inside image_size with its aspect ratio kept and fill the rest by"
        " reflection; the filled part is left out of every map, score, metric and mask."
    )
    tile: int = _opt(
        0, "Cut the image_size input into overlapping tiles of this size (multiple of 32), encode each at full"
        " resolution and put their features back together; 0: no tiling. For large images with small defects."
    )
    tile_overlap: int = _opt(32, "Overlap of neighbouring tiles in pixels (multiple of last_stride), averaged.")
    border_pad: int = _opt(
        0, "Mirror-pad images by this many pixels before the encoder and crop the features back (multiple of last_stride)."
    )
    # decoders g_k(theta_k)
    coupling_layers: int = _opt(
        4, "Coupling layers per flow decoder. The paper's 8 cost 1.5x the time after the encoder and 1.6x the"
        " training, for a suite mean within 0.7 (benchmarks/RESULTS.md); set 8 for its exact decoder."
    )
    condition_dim: int = _opt(128, "Size C of the 2D sin/cos positional condition (multiple of 4).")
    conditional: bool = _opt(True, "Condition the flows on position (CFLOW); false gives UFLOW.")
    clamp_alpha: float = _opt(1.9, "Soft clamp alpha of the affine coupling scale.")
    permutation: str = _opt("soft", "Fixed permutation between couplings: random orthogonal or hard.", PERMUTATIONS)
    whitening: str = _opt(
        "location",
        "First decoder layer. location: whiten each position with its training mean and covariance, then the flow"
        " (an addition to the paper; image AUROC 76 -> 92 with the same taps on magnetic_tile); none: the paper's decoder.",
        WHITENINGS,
    )
    whitening_shrinkage: str = _opt(
        "ledoit-wolf", "How each location's covariance is regularised before whitening. ledoit-wolf: shrunk towards"
        " its mean variance by the Ledoit-Wolf intensity estimated from the training features (strongly for a few"
        " dozen images, hardly for hundreds), then the ridge; ridge: the ridge alone.", SHRINKAGES
    )
    whitening_eps: float = _opt(
        0.01, "Ridge added to each per-location covariance before whitening, relative to its mean variance."
    )
    # baselines (Sec. 4.3): both score a concatenation of all taps, upsampled to the finest tap's grid
    padim_channels: int = _opt(100, "PaDiM: random subset of the concatenated tap channels (PaDiM used 100 for ResNet-18).")
    knn_images: int = _opt(
        50, "SPADE: nearest training images by pooled features; the image score is the mean distance to them"
        " and each pixel is scored against their pixels (1-NN)."
    )
    coreset_ratio: float = _opt(
        0.01, "PatchCore: share of the training patches kept in its memory bank, chosen by greedy k-center"
        " selection (the paper's 0.01; fitting and test time grow with it)."
    )
    blur_sigma: float = _opt(
        4.0, "Gaussian blur (pixels) of the anomaly map, as PaDiM and PatchCore do; 0: none. CFLOW-AD too: its finest"
        " scale's map is noisy from place to place (image scores by --image-score location are not blurred)."
    )
    # training (Eq. 7)
    epochs: int = _opt(2, "Meta-epochs: the learning-rate schedule and optional validation run per meta-epoch.")
    sub_epochs: int = _opt(2, "Passes over the training images inside each meta-epoch.")
    min_steps: int = _opt(
        100, "Raise the meta-epochs until every scale's flow takes at least this many optimiser steps (a small set"
        " then trains as long as a large one); 0: exactly --epochs."
    )
    batch_size: int = _opt(16, "Images per encoder batch; all their fibers are used before the next batch.")
    fiber_batch: int = _opt(
        2048, "Feature vectors (fibers) per optimizer step, rounded to whole maps: max(1, N // (h*w)) maps per step."
    )
    lr: float = _opt(2e-4, "Adam learning rate.")
    warmup_epochs: float = _opt(1.0, "Epochs of linear learning-rate warm-up before cosine annealing.")
    loss: str = _opt("nll", "nll: negative log-likelihood per dimension (Eq. 7); logsigmoid: the authors' variant.", LOSSES)
    rotation: float = _opt(
        0.0, "Random rotation range in degrees for training images; 0 lets training compute encoder features once."
    )
    val_fraction: float = _opt(
        0.0, "Hold out this fraction of train images and keep the meta-epoch with the best validation likelihood."
    )
    calibration_fraction: float = _opt(
        0.1, "Hold out this fraction of the defect-free training images, never trained on, to set the image and"
        " pixel decision thresholds at --target-fpr; 0 trains on all and leaves thresholds to 'cflow-ad calibrate'."
    )
    target_fpr: float = _opt(0.01, "False-positive rate on defect-free images that the calibrated thresholds aim at.")
    memory_mb: int = _opt(
        6144, "RAM (MB) for data held across a set: training caches decoded images in a third and encoder features in"
        " two thirds, and test keeps maps for exact pixel metrics in an eighth (sorting them takes ~6x that). Past it"
        " training decodes and encodes again each pass and test bins the map values: memory stays bounded. SPADE's"
        " gallery and PatchCore's training patches must fit in it."
    )
    seed: int = _opt(0, "Random seed: the same seed gives the same model and metrics.")
    # scoring (Eq. 8)
    normalization: str = _opt(
        "log", "log: Eq. 8 in log space with constants fixed from training data (never saturates); stateless: Eq. 8"
        " with those constants (saturates at the offset for strong anomalies); paper: Eq. 8 normalised over the"
        " evaluated set.", NORMALIZATIONS
    )
    image_score: str = _opt(
        "auto", "CFLOW-AD's image score. location: the largest deficit of log-likelihood, in standard deviations of"
        " the training images at the same place and scale, over every place and scale; map: the anomaly map's"
        " maximum (the paper's, and always that of --normalization paper); auto: location, or map with"
        " --keep-aspect (whose padding only the map leaves out).", IMAGE_SCORES
    )

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise CflowInputError(f"invalid config: {msg}")

        size = self.image_size
        size = [size] if _is_int(size) else size
        if not isinstance(size, (list, tuple)) or len(size) not in (1, 2) or not all(map(_is_int, size)):
            bad(f"image_size must be one int or a (height, width) pair, got {self.image_size!r}")
        self.image_size = (int(size[0]), int(size[-1]))  # checkpoints before (H, W) stored one int
        for f in dataclasses.fields(self):  # types first: a model file's JSON may hold anything
            value, kind = getattr(self, f.name), str(f.type)
            if kind == "int" and not _is_int(value):
                bad(f"{f.name} must be an integer, got {value!r}")
            if kind == "float" and not (_is_int(value) or isinstance(value, float)):
                bad(f"{f.name} must be a number, got {value!r}")
            if kind == "bool" and not isinstance(value, bool):
                bad(f"{f.name} must be true or false, got {value!r}")
            if kind.startswith("str") and not (isinstance(value, str) or value is None and "None" in kind):
                bad(f"{f.name} must be a string, got {value!r}")
        for name, (lo, hi) in RANGES.items():
            if not lo <= getattr(self, name) <= hi:  # NaN too
                bad(f"{name} must be from {lo} to {hi}, got {getattr(self, name)}")

        if self.encoder not in ENCODERS:
            bad(f"encoder '{self.encoder}' is not one of {', '.join(ENCODERS)}")
        if self.last_stride not in (8, 16, 32) or self.last_stride >> (self.pool_layers - 1) < 4:
            bad(f"last_stride {self.last_stride} with {self.pool_layers} pool layers needs taps at strides >= 4")
        if self.border_pad % self.last_stride or self.border_pad >= min(self.image_size):
            bad(f"border_pad must be a multiple of last_stride below image_size, got {self.border_pad}")
        if self.condition_dim % 4:
            bad(f"condition_dim must be a positive multiple of 4, got {self.condition_dim}")
        if not 32 <= min(self.image_size) <= max(self.image_size) <= MAX_SIDE or any(v % 32 for v in self.image_size):
            bad(f"image_size must be multiples of 32 from 32 to {MAX_SIDE}, got {self.size_text}")
        if self.tile:
            if self.tile < 32 or self.tile % 32 or self.tile > min(self.image_size):
                bad(f"tile must be a multiple of 32 from 32 to the image size {self.size_text}, got {self.tile}")
            if self.tile_overlap < 0 or self.tile_overlap % self.last_stride or self.tile_overlap >= self.tile:
                bad(f"tile_overlap must be a multiple of last_stride ({self.last_stride}) below tile, got"
                    f" {self.tile_overlap}")
        for name, choices in (("method", METHODS), ("loss", LOSSES), ("normalization", NORMALIZATIONS), ("permutation", PERMUTATIONS),
                              ("whitening", WHITENINGS), ("whitening_shrinkage", SHRINKAGES),
                              ("image_score", IMAGE_SCORES)):
            if getattr(self, name) not in choices:
                bad(f"{name} '{getattr(self, name)}' is not one of {', '.join(choices)}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            bad(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if not 0.0 <= self.val_fraction < 1.0 or not 0.0 <= self.calibration_fraction < 1.0:
            bad(f"val_fraction and calibration_fraction must be in [0, 1), got {self.val_fraction}, {self.calibration_fraction}")
        if self.val_fraction + self.calibration_fraction >= 0.9:
            bad("val_fraction + calibration_fraction must leave at least 10% of the images to train on")
        if self.image_score == "location" and self.keep_aspect:
            bad("image_score location would count the padding of keep_aspect: pass --image-score map (or auto)")
        if not 0.0 < self.target_fpr < 1.0:
            bad(f"target_fpr must be in (0, 1), got {self.target_fpr}")

    @property
    def size_text(self) -> str:
        """The input size as people write it: 256 px for a square, 256x512 px (height x width) otherwise."""
        h, w = self.image_size
        return f"{h} px" if h == w else f"{h}x{w} px"

    @property
    def location_score(self) -> bool:
        """Whether CFLOW-AD scores images by the per-location deficit (`image_score`) in its fixed modes."""
        return self.image_score == "location" or (self.image_score == "auto" and not self.keep_aspect)

    @property
    def strides(self) -> tuple[int, ...]:
        """Tap strides, shallow to deep (e.g. (8, 16, 32))."""
        return tuple(self.last_stride >> i for i in reversed(range(self.pool_layers)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CFlowConfig":
        if not isinstance(data, dict):
            raise CflowInputError(f"invalid config: expected an object of options, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        data = {"image_score": "map", **data}  # checkpoints from before the option scored by the map's maximum
        if data.get("method", "cflow") == "cflow" and "min_steps" not in data:
            data["blur_sigma"] = 0.0  # CFLOW-AD read blur_sigma from the release that added min_steps on
        data.setdefault("whitening_shrinkage", "ridge")  # how checkpoints before the option were whitened
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "CFlowConfig":
        return dataclasses.replace(self, **changes)


def default_text(value: Any) -> str:
    """A default as it is typed on the command line: (256, 256) is `256 256`."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def options_markdown() -> str:
    """The options table of the README, generated from the fields above."""
    lines = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(CFlowConfig):
        flag = f.name.replace("_", "-")
        if f.type in ("bool", bool):
            flag = f"{flag} / --no-{flag}"
        lines.append(f"| `--{flag}` | {default_text(f.default)} | {f.metadata['help']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_markdown())
