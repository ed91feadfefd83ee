"""How an image of any shape becomes the model's input, and how its map comes back.

- `InputFrame`: the input size (H, W) and whether an image is squashed to it (the paper's way)
  or resized to fit inside it with its aspect ratio kept and the rest filled by reflection
  (`keep_aspect`). Either way the image's place in the input is a box (top, left, height, width).
- `restore`: the maps of the boxes only, resized to the input frame, so that the padding is in
  no map, score, metric or mask. Every other part (masks, metrics, figures, the image's own size
  in `predict`) keeps working in that one frame, as if the image had been squashed.
- `tile_starts`: where the overlapping tiles of `--tile` begin (`encoder.Tiling` encodes them).

numpy and Pillow only: the torch-free scoring runtime restores its maps with this same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import CflowInputError


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an int or (H, W) size so every caller can accept both forms."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif (isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size)):
        hw = (int(size[0]), int(size[1]))
    else:
        raise CflowInputError(f"invalid image size {size!r}: use a positive int or a (height, width) pair")
    if min(hw) <= 0:
        raise CflowInputError(f"invalid image size {size!r}: height and width must be positive")
    return hw


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
        return cls(as_hw(spec))

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


def full_boxes(boxes, size: tuple[int, int]) -> bool:
    """Whether every box of a [B, 4] batch (or None) covers the whole input."""
    if boxes is None:
        return True
    return bool((np.asarray(boxes) == np.array([0, 0, *size])).all())


def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resampling of n_in samples to n_out along one axis, pixel centres aligned (PyTorch's
    align_corners=False, no antialiasing): each output's two source indices and the second's weight."""
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
    lo = np.minimum(src.astype(np.int64), n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[..., h, w] maps resized to [..., H, W] as torch's bilinear `interpolate` (align_corners=False) does."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape[-2:] == tuple(size):
        return maps
    r0, r1, fr = _axis(maps.shape[-2], size[0])
    c0, c1, fc = _axis(maps.shape[-1], size[1])
    rows = maps[..., r0, :] * (1 - fr)[:, None] + maps[..., r1, :] * fr[:, None]
    return rows[..., c0] * (1 - fc) + rows[..., c1] * fc


def restore(maps: np.ndarray, scores: np.ndarray, boxes, rescore: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(maps [B, H, W], scores [B]) with each map's box resized back to the whole frame (bilinear),
    padding left out; with `rescore` the scores become the restored maps' maxima (for models whose
    image score is the map's maximum). Maps of whole-frame boxes come back as they are."""
    size = tuple(maps.shape[-2:])
    if full_boxes(boxes, size):
        return maps, scores
    out = np.array(maps, dtype=np.float32)
    for i, (top, left, h, w) in enumerate(np.asarray(boxes).tolist()):
        if (h, w) != size:
            out[i] = resize_bilinear(maps[i, top : top + h, left : left + w], size)
    return out, (out.reshape(len(out), -1).max(1) if rescore else scores)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: every `tile - overlap` pixels, the last tile flush with the end."""
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


