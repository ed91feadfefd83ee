"""2D sin/cos positional encoding (Section 4.2): the condition c_i of each feature location."""

from __future__ import annotations

import math

import torch


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """A [channels, height, width] map of sin/cos harmonics unique to each (row, column).

    The first half of the channels encodes the column, the second half the row, each as
    interleaved sin/cos pairs over geometrically spaced frequencies (Vaswani et al.).
    """
    if channels % 4:
        raise ValueError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    freqs = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))
    cols = torch.arange(width, dtype=torch.float64)[:, None] * freqs  # [W, half/2]
    rows = torch.arange(height, dtype=torch.float64)[:, None] * freqs  # [H, half/2]
    enc = torch.empty(channels, height, width, dtype=torch.float64)
    enc[0:half:2] = torch.sin(cols).T[:, None, :]
    enc[1:half:2] = torch.cos(cols).T[:, None, :]
    enc[half::2] = torch.sin(rows).T[:, :, None]
    enc[half + 1 :: 2] = torch.cos(rows).T[:, :, None]
    return enc.float()
