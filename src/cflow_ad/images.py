"""Image files as numpy arrays: decoding any file a user may have, listing folders, model inputs.

numpy and Pillow only, with no PyTorch, so the scoring runtime reads images with exactly the code
that training and `test` use (`data` builds its tensors and datasets on it). Every problem with a
file or folder is a one-line `CflowInputError` naming the path, never a Pillow traceback.
"""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .errors import CflowInputError, ImageFormatError, ImageTooLargeError
from .geometry import InputFrame

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Refuse larger images ourselves (instead of relying on Pillow's global
# MAX_IMAGE_PIXELS, which we must not change for the whole process): a
# decompression bomb would otherwise exhaust memory before any resize.
MAX_PIXELS = 100_000_000

# Everything Pillow's decoders raise for a bad file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)

# What a service takes (Pillow's format names): a format decoded only to be refused is attack surface.
UPLOAD_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP")

_PathLike = str | os.PathLike


def _one_line(exc: BaseException) -> str:
    """Collapse an exception text to one line so user messages stay single-line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _denied(p: Path) -> bool:
    """Whether stat() is refused (a folder on the way without search permission): exists(), is_dir() and
    is_file() raise PermissionError then, which must become a clear error, not escape."""
    try:
        p.stat()
    except PermissionError:
        return True
    except OSError:  # missing, a loop of links: told apart by the callers
        return False
    return False


def _open(path: _PathLike | bytes, kind: str, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """Fully decode an image file, or the bytes of one called `name` (an upload), with EXIF
    orientation applied, or explain what is wrong with it. `max_pixels` defaults to MAX_PIXELS."""
    return _decode(path, kind, name, max_pixels)[0]


def _decode(path: _PathLike | bytes, kind: str, name: str | None = None, max_pixels: int | None = None,
            max_side: int | None = None, formats: Sequence[str] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """`_open`, and the image's (height, width) as stored and oriented. With `max_side`, an image longer than
    that comes back shrunk to it, in 8-bit L or RGB (`_to_8bit`), so that nothing past the decoder holds the
    full size: a JPEG is decoded at 1/2 to 1/8 scale (`draft`), others are reduced by Pillow after decoding.
    `formats`: the Pillow formats taken (`ImageFormatError` for others, told apart by their content)."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(path, bytes):
        p, source = name or "upload", io.BytesIO(path)
        if not path:
            raise CflowInputError(f"cannot read {kind} '{p}': it is empty (0 bytes); send an image file")
    else:
        p = source = Path(path)
        if _denied(p):
            raise CflowInputError(f"cannot read {kind} '{p}': permission denied; fix the permissions of its folders")
        if not p.exists():
            if p.is_symlink():  # exists() follows the link: a missing target or a loop of links
                raise CflowInputError(f"{kind} file '{p}' is a broken symbolic link (missing target or a loop): "
                                      "fix or remove it")
            raise CflowInputError(f"{kind} file '{p}' does not exist: check the path")
        if not p.is_file():
            raise CflowInputError(f"{kind} path '{p}' is not a file: pass an image file")
        if p.stat().st_size == 0:
            raise CflowInputError(f"cannot read {kind} '{p}': file is empty (0 bytes); replace or remove it")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces Pillow's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                if formats is not None and im.format not in formats:
                    raise ImageFormatError(f"{kind} '{p}' is a {im.format} image, which is not taken here: "
                                           "send a PNG, JPEG, BMP, TIFF or WebP")
                width, height = im.size
                if width * height > limit:
                    raise ImageTooLargeError(
                        f"{kind} '{p}' is {width}x{height} pixels, above the limit of "
                        f"{limit / 1_000_000:g} megapixels: downscale it first")
                shrink = max_side is not None and max(width, height) > max_side
                if shrink:
                    scale = max_side / max(width, height)
                    im.draft(im.mode, (math.ceil(width * scale), math.ceil(height * scale)))  # JPEG only
                im.load()
                orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
                stored = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
                if not shrink:
                    return ImageOps.exif_transpose(im), stored
                small = _shrink(_to_8bit(im, Path(p), kind), max_side)
        small.getexif()[ExifTags.Base.Orientation] = orientation  # the copy lacks a TIFF's tags
        return ImageOps.exif_transpose(small), stored
    except CflowInputError:
        raise
    except PermissionError:
        raise CflowInputError(f"cannot read {kind} '{p}': permission denied; fix the file permissions") from None
    except Image.UnidentifiedImageError:
        raise CflowInputError(
            f"cannot read {kind} '{p}': not a recognised image format; convert it to PNG or JPEG or remove it"
        ) from None
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"{kind} '{p}' is too large (possible decompression bomb): downscale it first") from None
    except _DECODE_ERRORS as exc:
        raise CflowInputError(
            f"cannot read {kind} '{p}': file is truncated or corrupt ({_one_line(exc)}); replace or remove it"
        ) from None
    except Exception as exc:  # noqa: BLE001
        # Pillow picks the decoder from the content, not the extension, and its plugins raise more than
        # the types above on hostile files (tests/test_fuzz.py found TypeError from a TIFF tag of the
        # wrong type, RuntimeError from a corrupt AVIF, NotImplementedError from a BLP). Only Pillow
        # runs in this block, so any other exception is still a problem with this one file.
        raise CflowInputError(
            f"cannot decode {kind} '{p}': corrupt or unsupported variant ({type(exc).__name__}: {_one_line(exc)}); "
            "replace or remove it") from None


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    """`im` with its longest side `max_side` (if longer): integer box reduction first, which costs memory
    for the small image only, then bilinear as `InputFrame.place` resizes."""
    scale = max_side / max(im.size)
    if scale >= 1:
        return im
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _to_8bit(im: Image.Image, path: Path, kind: str) -> Image.Image:
    """Bring any Pillow mode to 8-bit 'L' or 'RGB' so resizing works on real intensities.

    16-bit data ('I;16*', and 'I' which Pillow uses for some 16-bit files) is scaled
    from 0..65535 to 0..255 rather than clipped; alpha channels are dropped and the
    stored colour kept; palettes are expanded before any interpolation.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im)
        out = np.empty(arr.shape, dtype=np.uint8)
        for r in range(0, len(arr), 256):  # in blocks of rows: temporaries of a few MB at any image size
            v = np.clip(arr[r : r + 256], 0, 65535).astype(np.uint32)
            out[r : r + 256] = (2 * v + 257) // 514  # round(v / 257), exactly: v / 257 is never a half
        return Image.fromarray(out)
    if im.mode in ("L", "RGB"):
        return im
    target = "L" if im.mode in ("1", "LA", "F") else "RGB"
    try:
        return im.convert(target)
    except ValueError as exc:
        raise CflowInputError(
            f"cannot read {kind} '{path}': unsupported colour mode {im.mode} ({_one_line(exc)}); "
            "save it as 8-bit RGB or grayscale") from None


def as_chw(arr: np.ndarray | Image.Image) -> np.ndarray:
    """An 8-bit L / RGB image or uint8 [H, W, 3] array as float32 [3, H, W] in [0, 1] (scaled in place: one
    float copy fewer at a service's largest drawing size)."""
    arr = np.array(arr.convert("RGB") if isinstance(arr, Image.Image) else arr, dtype=np.float32)
    arr /= 255.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def read(source: _PathLike | bytes, size, name: str | None = None,
         max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model input [3, H, W] and the image at its own size [3, H0, W0], float32 in [0, 1], from a
    file or from the bytes of an upload called `name`: predictions are drawn on the original. `size`:
    an int, (H, W), an `InputFrame` or a config (then its aspect handling too)."""
    return read_scaled(source, size, name, max_pixels)[:2]


def read_scaled(source: _PathLike | bytes, size, name: str | None = None, max_pixels: int | None = None,
                max_side: int | None = None, formats: Sequence[str] | None = None
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """`read`, and the image's (height, width) as stored. With `max_side`, the memory of a service's request:
    a longer image is decoded shrunk to that side (`_decode`), and both arrays come from the shrunk image, so
    none is the upload's full size in float32. `formats`: as `_decode`'s."""
    label = Path(name or "upload") if isinstance(source, bytes) else Path(source)
    im, stored = _decode(source, "image", name, max_pixels, max_side, formats)
    im = _to_8bit(im, label, "image")
    return as_chw(InputFrame.of(size).place(im)[0]), as_chw(im), stored


def read_batches(files: Sequence[Path], size, batch_size: int, threads: int = 0,
                 on_error: Callable[[int, CflowInputError], None] | None = None
                 ) -> Iterator[tuple[list[int], np.ndarray, list[np.ndarray]]]:
    """(indices, inputs [B, 3, H, W], originals) batches of `files` in order, decoded `threads` at a
    time ahead of the consumer (Pillow decodes outside the GIL). A file that cannot be read goes to
    `on_error(index, error)` and is left out of its batch; without `on_error` it raises."""
    frame = InputFrame.of(size)

    def load(i: int):
        try:
            return i, *read(files[i], frame)
        except CflowInputError as exc:
            if on_error is None:
                raise
            return i, exc

    def batched(items):
        batch = []
        for item in items:
            if isinstance(item[1], CflowInputError):
                on_error(item[0], item[1])
                continue
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    pool = ThreadPoolExecutor(threads) if threads > 0 else None
    try:
        items = pool.map(load, range(len(files))) if pool else map(load, range(len(files)))
        for batch in batched(items):
            index, inputs, originals = zip(*batch)
            yield list(index), np.stack(inputs), list(originals)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def _is_hidden(path: Path, base: Path) -> bool:
    """Hidden entries ('._x.png' macOS sidecars, '.ipynb_checkpoints') are not user images."""
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def _not_a_file(p: Path) -> CflowInputError:
    """Why a path with an image's name is neither a regular file nor a folder, as a one-line error."""
    what = "a broken symbolic link (missing target or a loop)" if not p.exists() else "a FIFO, socket or device"
    return CflowInputError(f"path '{p}' is not a regular file or folder but {what}: replace or remove it")


def _images_in(folder: Path, exclude: Path | None = None,
               on_skip: Callable[[Path, CflowInputError], None] | None = None) -> list[Path]:
    """All image files below a folder, recursive and sorted, hidden entries and the folder `exclude` (an
    output folder inside it, whose PNGs are no inputs) left out. An entry named like an image that is
    no file (a broken link, a FIFO) goes to `on_skip(path, error)` where given."""
    inner = None
    if exclude is not None and Path(exclude).resolve().is_relative_to(folder.resolve()):
        inner = Path(exclude).resolve().relative_to(folder.resolve()).parts
    found = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or _is_hidden(p, folder):
            continue
        if inner is not None and p.relative_to(folder).parts[:len(inner)] == inner:
            continue
        if _denied(p) or p.is_file():  # denied: reported on load
            found.append(p)
        elif on_skip is not None and not p.is_dir():
            on_skip(p, _not_a_file(p))
    return found


def list_images(paths: _PathLike | Iterable[_PathLike], exclude: _PathLike | None = None,
                on_skip: Callable[[Path, CflowInputError], None] | None = None) -> list[Path]:
    """Expand files and folders into image files, keeping the order of the arguments. `exclude` (the
    run's output folder) is left out of the folders, and may not be one of them; `on_skip` as in
    `_images_in`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if _denied(p):
            raise CflowInputError(f"cannot read '{p}': permission denied; fix the permissions of its folders")
        if p.is_dir():
            if exclude is not None and p.resolve() == Path(exclude).resolve():
                raise CflowInputError(f"--output '{exclude}' is the input folder '{p}': write the outputs to another"
                                      " folder, or a subfolder, which is then left out of the inputs")
            found = _images_in(p, exclude, on_skip)
            if not found:
                raise CflowInputError(
                    f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder '{p}': add images or pass another folder")
            result.extend(found)
        elif p.is_file():
            result.append(p)
        elif p.exists() or p.is_symlink():  # a FIFO or device, or a broken or looping link: don't say "missing"
            raise _not_a_file(p)
        else:
            raise CflowInputError(f"path '{p}' does not exist: check the spelling")
    return result


