"""How an image of any shape becomes the model's input, and how its map comes back.

- `InputFrame`: the input size (H, W) and whether an image is squashed to it (the paper's way)
  or resized to fit inside it with its aspect ratio kept and the rest filled by reflection
  (`keep_aspect`). Either way the image's place in the input is a box (top, left, height, width).
- `restore`: the maps of the boxes only, resized to the input frame, so that the padding is in
  no map, score, metric or mask. Every other part (masks, metrics, figures, the image's own size
  in `predict`) keeps working in that one frame, as if the image had been squashed.
- `Tiling`: an input cut into overlapping tiles at full resolution, each
  encoded alone, their features put back at their place in the whole grid (averaged where tiles
  overlap). The decoders then see one feature map of the whole image, with the positional
  conditions and whitening of the whole image: training, every scoring mode and every method
  work on tiles unchanged, and the ONNX export holds the tiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


@dataclass(frozen=True)
class InputFrame:
    """The model input's (H, W), and whether images keep their aspect ratio in it."""

    size: tuple[int, int]
    keep_aspect: bool = False

    @classmethod
    def of(cls, spec) -> "InputFrame":
        """A frame from a frame, a config (its `image_size` and `keep_aspect`), an int or an (H, W) pair."""
        if isinstance(spec, InputFrame):
            return spec
        if hasattr(spec, "image_size"):
            return cls(tuple(spec.image_size), bool(getattr(spec, "keep_aspect", False)))
        from .data import _as_hw

        return cls(_as_hw(spec))

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of an image of `height` x `width` pixels in the input."""
        hh, ww = self.size
        if not self.keep_aspect:
            return 0, 0, hh, ww
        scale = min(hh / height, ww / width)
        h, w = min(hh, max(1, round(height * scale))), min(ww, max(1, round(width * scale)))
        return (hh - h) // 2, (ww - w) // 2, h, w

    def place(self, im: Image.Image) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """An 8-bit L or RGB image as the uint8 [H, W, 3] model input, and its box there."""
        top, left, h, w = box = self.box(im.height, im.width)
        arr = np.asarray(im.resize((w, h), Image.Resampling.BILINEAR).convert("RGB"))
        if (h, w) != self.size:  # mirror at the edges, repeated as often as the gap needs
            arr = np.pad(arr, ((top, self.size[0] - h - top), (left, self.size[1] - w - left), (0, 0)), "symmetric")
        return arr, box


def full_boxes(boxes: torch.Tensor | None, size: tuple[int, int]) -> bool:
    """Whether every box of a [B, 4] batch (or None) covers the whole input."""
    if boxes is None:
        return True
    whole = torch.tensor([0, 0, *size], dtype=boxes.dtype)
    return bool((boxes.cpu() == whole).all())


def restore(maps: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor | None,
            rescore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [B, H, W], scores [B]) with each map's box resized back to the whole frame (bilinear),
    padding left out; with `rescore` the scores become the restored maps' maxima (for models whose
    image score is the map's maximum). Maps of whole-frame boxes come back as they are."""
    size = tuple(maps.shape[-2:])
    if full_boxes(boxes, size):
        return maps, scores
    out = maps.clone()
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        if (h, w) != size:
            crop = maps[i : i + 1, None, top : top + h, left : left + w].float()
            out[i] = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0, 0].to(maps.dtype)
    return out, (out.flatten(1).amax(1) if rescore else scores)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: every `tile - overlap` pixels, the last tile flush with the end."""
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


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
