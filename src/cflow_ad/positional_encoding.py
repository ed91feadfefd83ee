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


class PositionalCondition:
    """The conditions c_i of every location of an h x w map, kept as their column and row halves.

    The encoding is separable (first half: column only, second half: row only), so a linear map
    of all conditions, W c_i + b, is the sum of a per-column and a per-row term: (h + w) x C/2
    multiply-adds per output instead of h x w x C. Training projects the conditions at every
    step, and this makes that projection a negligible cost (it was most of the work at stride 8).
    """

    def __init__(self, channels: int, height: int, width: int):
        enc = positional_encoding_2d(channels, height, width)
        self.half = channels // 2
        self.cols = enc[: self.half, 0, :].T.contiguous()  # [w, C/2]
        self.rows = enc[self.half :, :, 0].T.contiguous()  # [h, C/2]
        self.shape = (height * width, channels)

    def dense(self) -> torch.Tensor:
        """All conditions as [h*w, C], row-major."""
        h, w = self.rows.shape[0], self.cols.shape[0]
        return torch.cat([self.cols.repeat(h, 1), self.rows.repeat_interleave(w, 0)], 1)

    def project(self, linear: torch.nn.Linear, product=torch.matmul) -> torch.Tensor:
        """linear(c_i) for every location, [h*w, out], through the row/column factors, each factor's
        matrix product computed by `product` (the flows' precision: `flow_decoder.matmul`)."""
        weight = linear.weight
        col = product(self.cols.to(weight), weight[:, : self.half].T)  # [w, out]
        row = product(self.rows.to(weight), weight[:, self.half :].T)  # [h, out]
        out = (row[:, None, :] + col[None, :, :]).flatten(0, 1)
        return out if linear.bias is None else out + linear.bias

    def to(self, device: torch.device | str) -> "PositionalCondition":
        self.cols, self.rows = self.cols.to(device), self.rows.to(device)
        return self
