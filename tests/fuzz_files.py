"""Malformed and unusual image files for the bad-data-at-scale test (issue #6), and the worker
that feeds them to the loader with a hang guard.

`make_corpus(folder, seed)` writes a few hundred files, deterministic for a seed, and returns one
`Case` per path: what it is (`group`), what the loader must do with it (`expect`: "ok", "error",
"too_large" or "any") and, for valid unusual images, the reference pixels [H, W, 3] in [0, 1]
that the loaded original must match within `tol` (the mean difference for lossy formats).

Run as a script (`python tests/fuzz_files.py LIST.json START`), it takes the [call, path] items of
LIST from index START on, loads each path with `load_image`, `load_image_and_original` and
`load_mask` (or lists it with `list_images`), and prints one JSON line per item: the parent kills
it when an item takes too long (a hang) or notes a dead worker (a crash), and restarts after that item.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
FUZZ_EXTENSIONS = (".png", ".jpg", ".bmp", ".tif", ".webp")
TOO_LARGE_WORDS = ("megapixels", "too large")


@dataclass
class Case:
    path: Path
    group: str
    expect: str  # "ok", "error", "too_large" or "any" (a correct result or a clear error)
    reference: np.ndarray | None = None  # [H, W, 3] float in [0, 1] for "ok" cases with known pixels
    tol: float = 1.5 / 255  # on the largest difference, or on the mean one for lossy formats
    lossy: bool = False
    call: str = "load"  # "load": the three loaders on the file; "list": list_images on the path


# ---------------------------------------------------------------- encoders

def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None,
            level: int = 9) -> bytes:
    """A PNG with a correct IHDR CRC; `rows` are the filtered scanlines (None: a tiny IDAT only)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 16, level)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _gif_bomb(width: int, height: int) -> bytes:
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + image + b";"


def _tiff_bomb(width: int, height: int) -> bytes:
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, value in entries:
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + b"\x00" * 16


def _bmp_bomb(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x00" * 64
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(pixels), 0, 0, 14 + 40) + info + pixels


def _jpeg_resized_header(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF frame header claiming another size (no pixel data added)."""
    i = 2
    while i < len(jpeg):
        marker, length = jpeg[i + 1], struct.unpack(">H", jpeg[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return jpeg[:i + 5] + struct.pack(">HH", height, width) + jpeg[i + 9:]
        i += 2 + length
    raise ValueError("no SOF marker")


def _webp_bomb(lossless: bytes, width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header claims width x height (at most 16384 each)."""
    pos = lossless.index(b"VP8L") + 8
    assert lossless[pos] == 0x2F
    bits = struct.unpack("<I", lossless[pos + 1:pos + 5])[0]
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    return lossless[:pos + 1] + struct.pack("<I", bits) + lossless[pos + 5:]


def _png_rows(arr: np.ndarray) -> bytes:
    """Filter-type-0 scanlines of a big-endian array [H, W*(channels*bytes)]."""
    return b"".join(b"\x00" + row.tobytes() for row in arr)


# ---------------------------------------------------------------- the corpus

def _base_rgb(h: int = 40, w: int = 48) -> np.ndarray:
    """Smooth colour gradients (JPEG keeps them well) with a bright square."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), (x + y) * 255 / (h + w - 2)], -1)
    arr[8:16, 8:16] = (250, 250, 30)
    return np.round(arr).astype(np.uint8)


def _f(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] as a float reference [H, W, 3]."""
    arr = arr.astype(np.float64) / 255
    return np.repeat(arr[..., None], 3, -1) if arr.ndim == 2 else arr


def _valid_unusual(rng: np.random.Generator) -> list[tuple[str, bytes, np.ndarray | None, float]]:
    """(name, file bytes, reference pixels or None, tolerance) for images that must load correctly."""
    out = []
    base = _base_rgb()
    gray = base[..., 0]
    rgb = Image.fromarray(base)

    exact = 0.5 / 255
    for name, fmt, kw, tol in (("base.png", "PNG", {}, exact), ("base.bmp", "BMP", {}, exact),
                               ("base.tif", "TIFF", {}, exact),
                               ("base_lzw.tif", "TIFF", {"compression": "tiff_lzw"}, exact),
                               ("base_deflate.tif", "TIFF", {"compression": "tiff_adobe_deflate"}, exact),
                               ("base_lossless.webp", "WEBP", {"lossless": True}, exact),
                               ("base.jpg", "JPEG", {"quality": 95, "subsampling": 0}, 0.02),
                               ("base_progressive.jpg", "JPEG", {"quality": 95, "subsampling": 0, "progressive": True},
                                0.02),
                               ("base_lossy.webp", "WEBP", {"quality": 95}, 0.02)):
        out.append((name, encode(rgb, fmt, **kw), _f(base), tol))

    # 16-bit grayscale: 0..65535 scaled to 0..255, not clipped.
    g16 = np.array([0, 257, 257 * 64, 257 * 128, 257 * 200, 65535, 1000, 40000], np.uint16)
    g16 = np.tile(g16, (6, 2))
    ref16 = _f(np.round(g16 / 257.0).astype(np.uint8))
    out.append(("gray16.png", encode(Image.fromarray(g16), "PNG"), ref16, 0.5 / 255))
    out.append(("gray16.tif", encode(Image.fromarray(g16), "TIFF"), ref16, 0.5 / 255))
    out.append(("gray16_raw.png", raw_png(g16.shape[1], g16.shape[0], 16, 0, _png_rows(g16.astype(">u2"))),
                ref16, 0.5 / 255))
    # 16 bits per channel colour: Pillow keeps the high byte.
    c16 = np.stack([g16, g16[:, ::-1], np.full_like(g16, 65535)], -1)
    out.append(("rgb48.png", raw_png(c16.shape[1], c16.shape[0], 16, 2,
                                     _png_rows(c16.astype(">u2").reshape(c16.shape[0], -1))),
                np.stack([ref16[..., 0], ref16[:, ::-1, 0], np.ones(g16.shape)], -1), 1.5 / 255))
    # 32-bit int and float TIFF: 'I' is read as 16-bit data, 'F' on Pillow's 0..255 scale.
    i32 = np.array([[-5, 0, 257 * 10, 65535, 70000, 257 * 99]], np.int32).repeat(3, 0)
    out.append(("int32.tif", encode(Image.fromarray(i32), "TIFF"),
                _f(np.round(np.clip(i32, 0, 65535) / 257.0).astype(np.uint8)), 0.5 / 255))
    f32 = np.array([[0.0, 10.0, 100.4, 254.6, 255.0, 300.0, -3.0]], np.float32).repeat(3, 0)
    out.append(("float32.tif", encode(Image.fromarray(f32), "TIFF"),
                _f(np.clip(np.round(f32), 0, 255).astype(np.uint8)), 1.0 / 255))
    # NaN / inf pixels: no reference, but the tensor must stay finite and in [0, 1].
    fnan = np.array([[np.nan, np.inf, -np.inf, 128.0]], np.float32).repeat(2, 0)
    out.append(("float_nan.tif", encode(Image.fromarray(fnan), "TIFF"), None, 0.0))

    # 1-bit.
    bits = (np.indices((12, 20)).sum(0) % 2 * 255).astype(np.uint8)
    one = Image.fromarray(bits).convert("1")
    for name, fmt in (("bilevel.png", "PNG"), ("bilevel.tif", "TIFF"), ("bilevel.bmp", "BMP")):
        out.append((name, encode(one, fmt), _f(bits), 0.5 / 255))

    # Palette images, with and without transparency; colours come from the palette.
    palette = rng.integers(0, 256, (16, 3)).astype(np.uint8)
    idx = (np.arange(12 * 16).reshape(12, 16) % 16).astype(np.uint8)
    pim = Image.fromarray(idx, "P")
    pim.putpalette(palette.tobytes())
    pref = palette[idx].astype(np.float64) / 255
    out.append(("palette.png", encode(pim, "PNG"), pref, 0.5 / 255))
    out.append(("palette_4bit.png", encode(pim, "PNG", bits=4), pref, 0.5 / 255))
    out.append(("palette_transparent.png", encode(pim, "PNG", transparency=3), pref, 0.5 / 255))
    alpha = bytes(range(0, 256, 16))
    out.append(("palette_alpha.png", encode(pim, "PNG", transparency=alpha), pref, 0.5 / 255))
    out.append(("palette.bmp", encode(pim, "BMP"), pref, 0.5 / 255))
    out.append(("palette.gif", encode(pim, "GIF"), pref, 0.5 / 255))
    out.append(("palette.tif", encode(pim, "TIFF"), pref, 0.5 / 255))

    # Alpha: dropped, stored colour kept (even where fully transparent).
    a = np.tile(np.array([0, 1, 128, 255], np.uint8), (40, 12))
    la = Image.fromarray(np.stack([gray, a], -1), "LA")
    out.append(("gray_alpha.png", encode(la, "PNG"), _f(gray), 0.5 / 255))
    rgba = Image.fromarray(np.concatenate([base, a[..., None]], -1), "RGBA")
    for name, fmt, kw in (("rgba.png", "PNG", {}), ("rgba.tif", "TIFF", {}),
                          ("rgba_lossless.webp", "WEBP", {"lossless": True, "exact": True}),
                          ("rgba.bmp", "BMP", {})):
        out.append((name, encode(rgba, fmt, **kw), _f(base), 0.5 / 255))

    # CMYK: flat blocks of cyan, magenta, yellow, black and white.
    cmyk = np.zeros((16, 80, 4), np.uint8)
    for k, value in enumerate(((255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0))):
        cmyk[:, 16 * k:16 * (k + 1)] = value
    cref = np.zeros((16, 80, 3))
    for k, value in enumerate(((0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 0), (1, 1, 1))):
        cref[:, 16 * k:16 * (k + 1)] = value
    cim = Image.fromarray(cmyk, "CMYK")
    out.append(("cmyk.jpg", encode(cim, "JPEG", quality=95), cref, 0.02))
    out.append(("cmyk.tif", encode(cim, "TIFF"), cref, 0.5 / 255))

    # Grayscale JPEG, tiny and elongated images.
    out.append(("gray.jpg", encode(Image.fromarray(gray), "JPEG", quality=95), _f(gray), 0.02))
    out.append(("pixel_1x1.png", encode(Image.fromarray(np.array([[[200, 30, 90]]], np.uint8)), "PNG"),
                _f(np.array([[[200, 30, 90]]], np.uint8)), 0.5 / 255))
    line = np.round(np.linspace(0, 255, 5000)).astype(np.uint8)[None]
    out.append(("line_1x5000.png", encode(Image.fromarray(line), "PNG"), _f(line), 0.5 / 255))
    out.append(("line_5000x1.png", encode(Image.fromarray(line.T.copy()), "PNG"), _f(line.T), 0.5 / 255))

    # EXIF orientation: stored 32 wide x 16 high, red left half, blue right half.
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    for orientation, shown in ((3, np.rot90(stored, 2)), (6, np.rot90(stored, -1)), (8, np.rot90(stored, 1)),
                               (2, stored[:, ::-1])):
        exif = Image.Exif()
        exif[0x0112] = orientation
        jpeg = encode(Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
        out.append((f"exif_orientation{orientation}.jpg", jpeg, _f(shown), 0.02))

    # Several frames: the first one is used.
    frames = [Image.fromarray(np.full((10, 14, 3), c, np.uint8)) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    out.append(("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
                _f(np.full((10, 14, 3), (255, 0, 0), np.uint8)), 0.5 / 255))
    out.append(("animated.png", encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
                _f(np.full((10, 14, 3), (255, 0, 0), np.uint8)), 0.5 / 255))
    out.append(("animated.webp", encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
                _f(np.full((10, 14, 3), (255, 0, 0), np.uint8)), 0.5 / 255))
    gframes = [Image.fromarray(np.full((9, 11), v, np.uint8)) for v in (50, 200)]
    out.append(("multipage.tif", encode(gframes[0], "TIFF", save_all=True, append_images=gframes[1:]),
                _f(np.full((9, 11), 50, np.uint8)), 0.5 / 255))
    return out


def _bombs() -> list[tuple[str, bytes]]:
    """Files whose header claims far more pixels than the file holds, and one just above MAX_PIXELS."""
    jpeg = encode(Image.fromarray(_base_rgb()), "JPEG")
    lossless = encode(Image.fromarray(_base_rgb()), "WEBP", lossless=True)
    out = [("bomb_60000.png", raw_png(60000, 60000, 8, 0)),
           ("bomb_60000_rgba16.png", raw_png(60000, 60000, 16, 6)),
           ("bomb_1x4e9.png", raw_png(1, 4_000_000_000, 8, 0)),
           ("bomb_60000.gif", _gif_bomb(60000, 60000)),
           ("bomb_60000.tif", _tiff_bomb(60000, 60000)),
           ("bomb_60000.bmp", _bmp_bomb(60000, 60000)),
           ("bomb_60000.jpg", _jpeg_resized_header(jpeg, 60000, 60000)),
           ("bomb_16384.webp", _webp_bomb(lossless, 16384, 16384)),
           # 100,010,000 pixels: above MAX_PIXELS (1e8) but below twice Pillow's own limit, so only
           # our check stops it; a complete, valid PNG of zeros (about 100 kB compressed).
           ("just_above_limit.png", raw_png(10001, 10000, 8, 0, b"\x00" * (10000 * 10002), level=6)),
           ("just_above_limit.gif", _gif_bomb(10001, 10000)),
           ("just_above_limit.tif", _tiff_bomb(10001, 10000)),
           ("just_above_limit.bmp", _bmp_bomb(10001, 10000)),
           ("just_above_limit.jpg", _jpeg_resized_header(jpeg, 10001, 10000))]
    return out


def _other_formats() -> list[tuple[str, bytes, np.ndarray | None]]:
    """Valid files of the other formats Pillow reads, saved under image extensions: Pillow picks the
    decoder from the content, so a '.png' may reach any of these plugins. Lossless ones carry references."""
    base = _base_rgb()
    rgb = Image.fromarray(base)
    out = []
    formats = (("PPM", "RGB", "png", True), ("PCX", "RGB", "jpg", True), ("SGI", "RGB", "bmp", True),
               ("TGA", "RGB", "tif", True), ("IM", "RGB", "webp", True), ("QOI", "RGB", "png", True),
               ("DDS", "RGB", "jpg", False), ("ICO", "RGB", "bmp", False), ("XBM", "1", "tif", False),
               ("SPIDER", "F", "webp", False), ("MSP", "1", "png", False), ("BLP", "P", "jpg", False),
               ("JPEG2000", "RGB", "bmp", False), ("AVIF", "RGB", "tif", False))
    for fmt, mode, ext, lossless in formats:
        try:
            payload = encode(rgb.convert(mode), fmt)
        except (OSError, KeyError, ValueError):  # a codec this Pillow was built without
            continue
        out.append((f"content_{fmt.lower()}.{ext}", payload, _f(base) if lossless else None))
    tga_rle = encode(rgb, "TGA", compression="tga_rle")
    out.append(("content_tga_rle.png", tga_rle, _f(base)))
    return out


def _decoder_exceptions() -> list[tuple[str, bytes]]:
    """Files that made Pillow raise outside its documented exception types (regressions for _open)."""
    rgb = Image.fromarray(_base_rgb())
    tif = bytearray(encode(rgb, "TIFF"))
    ifd = struct.unpack("<I", tif[4:8])[0]
    for k in range(struct.unpack("<H", tif[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack("<H", tif[entry:entry + 2])[0] == 273:  # StripOffsets typed RATIONAL: TypeError
            tif[entry + 2:entry + 4] = struct.pack("<H", 5)
    blp = encode(rgb.convert("P"), "BLP")
    out = [("tiff_rational_strip_offsets.tif", bytes(tif)),
           ("blp_bad_compression.png", blp[:4] + b"\x07" + blp[5:]),  # NotImplementedError subclass
           ("blp_bad_encoding.png", blp[:8] + b"\x05" + blp[9:])]
    try:
        avif = encode(rgb, "AVIF")
    except (OSError, KeyError, ValueError):
        return out
    mdat = avif.index(b"mdat") + 4
    out += [("avif_zero_planes.png", avif[:mdat] + bytes(len(avif) - mdat)),  # RuntimeError
            ("avif_no_item.png", avif.replace(b"pitm", b"pitx"))]
    return out


def _ico_bomb() -> bytes:
    """An ICO whose one entry says 256x256 but holds a 12000x12000 PNG (zeros, about 140 kB)."""
    png = raw_png(12000, 12000, 8, 0, b"\x00" * (12000 * 12001), level=9)
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff\xe0", ".bmp": b"BM",
         ".tif": b"II*\x00", ".webp": b"RIFF\x00\x10\x00\x00WEBPVP8 "}


def make_corpus(folder: Path, seed: int = 0) -> list[Case]:
    """Write the fuzz files under `folder` (created) and describe each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, payload: bytes, group: str, expect: str, reference=None, tol: float = 0.5 / 255) -> None:
        path = folder / name
        path.write_bytes(payload)
        cases.append(Case(path, group, expect, reference, tol, lossy=tol > 2 / 255))  # JPEG, lossy WebP

    valid = _valid_unusual(rng)
    for name, payload, ref, tol in valid:
        add(name, payload, "valid unusual", "ok", ref, tol)
    by_name = {name: payload for name, payload, _, _ in valid}

    # Random bytes with image extensions, random lengths; then random bytes behind a real signature.
    for k in range(80):
        ext = FUZZ_EXTENSIONS[k % 5]
        n = int(rng.integers(1, 5000)) if k % 4 else int(rng.integers(1, 64))
        add(f"random_{k:03d}{ext}", rng.integers(0, 256, n, dtype=np.uint8).tobytes(), "random bytes", "any")
    for k in range(30):
        ext = FUZZ_EXTENSIONS[k % 5]
        payload = MAGIC[ext] + rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
        add(f"magic_random_{k:03d}{ext}", payload, "random bytes", "any")

    # Valid files truncated inside the header, in the data and just before the end.
    sources = ["base.png", "base.jpg", "base.bmp", "base.tif", "base_lzw.tif", "base_lossless.webp", "base_lossy.webp",
               "gray16.png", "cmyk.jpg", "exif_orientation6.jpg", "animated.gif", "palette.png"]
    for src in sources:
        raw = by_name[src]
        n = len(raw)
        cuts = sorted({1, 2, 4, 8, 12, 16, 24, 33, 50, 100, n // 4, n // 2, 3 * n // 4, n - 12, n - 2, n - 1}
                      if src.startswith("base") else {8, 33, n // 2, n - 2})
        for cut in cuts:
            if 0 < cut < n:
                stem, ext = src.rsplit(".", 1)
                add(f"trunc_{stem}_{cut:05d}.{ext}", raw[:cut], "truncated", "any")

    # Corrupted copies: flipped bits, overwritten spans, in the header or anywhere.
    for src in sources[:7]:
        raw = by_name[src]
        stem, ext = src.rsplit(".", 1)
        for k in range(14):
            buf = bytearray(raw)
            span = 64 if k % 2 == 0 else len(buf)  # even k: corrupt the header region only
            if k < 10:
                for _ in range(int(rng.choice([1, 4, 16, 64]))):
                    buf[int(rng.integers(0, min(span, len(buf))))] ^= 1 << int(rng.integers(0, 8))
            else:
                start = int(rng.integers(0, len(buf) - 8))
                buf[start:start + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
            add(f"corrupt_{stem}_{k:02d}.{ext}", bytes(buf), "corrupted", "any")

    # Other formats under image names, valid and with a corrupted header.
    for name, payload, ref in _other_formats():
        add(name, payload, "other formats", "ok", ref)
        stem, ext = name.rsplit(".", 1)
        for k in range(5):
            buf = bytearray(payload)
            for _ in range(int(rng.choice([1, 4, 16]))):
                buf[int(rng.integers(0, min(400, len(buf))))] = int(rng.integers(0, 256))
            add(f"{stem}_corrupt_{k}.{ext}", bytes(buf), "other formats", "any")
    for name, payload in _decoder_exceptions():
        add(name, payload, "other formats", "error")

    for ext in FUZZ_EXTENSIONS + (".jpeg", ".tiff"):
        add(f"empty{ext}", b"", "zero size", "error")
    add("text.png", b"this is not an image\n" * 3, "random bytes", "error")

    for name, payload in _bombs():
        add(name, payload, "decompression bomb", "too_large")
    # Pillow decodes an ICO's image while opening it, so this one is refused only after decoding
    # (memory stays bounded by Pillow's own limit of twice Image.MAX_IMAGE_PIXELS).
    add("bomb_in_ico.png", _ico_bomb(), "decompression bomb", "too_large")
    return cases


PERMISSION_CASES = ("unreadable.png", "inside.png", "seen.png")


def make_fs_oddities(folder: Path, permissions_apply: bool) -> list[Case]:
    """Symlink loops, a dangling link, a directory named like an image, a FIFO, and files made unreadable
    by their mode or their folder's (PERMISSION_CASES), unreadable only where `permissions_apply` to the
    process that loads them; plus list_images calls on these paths."""
    cases: list[Case] = []
    good = folder / "base.png"
    (folder / "loop_a.png").symlink_to("loop_b.png")
    (folder / "loop_b.png").symlink_to("loop_a.png")
    (folder / "self_loop.png").symlink_to("self_loop.png")
    (folder / "dangling.png").symlink_to("no_such_file.png")
    (folder / "link_to_base.png").symlink_to(good.name)
    (folder / "dir_named.png").mkdir()
    (folder / "subdir").mkdir()
    (folder / "subdir" / "loop").symlink_to("..", target_is_directory=True)  # a directory loop
    (folder / "subdir" / "up.png").symlink_to("..", target_is_directory=True)
    os.mkfifo(folder / "pipe.png")
    unreadable = folder / "unreadable.png"
    unreadable.write_bytes(good.read_bytes())
    unreadable.chmod(0)
    for name in ("loop_a.png", "loop_b.png", "self_loop.png", "dangling.png", "dir_named.png", "subdir/up.png",
                 "pipe.png"):
        cases.append(Case(folder / name, "file system", "error"))
    cases.append(Case(folder / "link_to_base.png", "file system", "ok"))
    locked = folder / "locked_dir"  # mode 000: not even stat() of what is inside
    locked.mkdir()
    (locked / "inside.png").write_bytes(good.read_bytes())
    unsearchable = folder / "readonly_dir"  # mode 444: names can be listed, files not reached
    unsearchable.mkdir()
    (unsearchable / "seen.png").write_bytes(good.read_bytes())
    locked.chmod(0)
    unsearchable.chmod(0o444)
    denied = "error" if permissions_apply else "ok"
    for path in (unreadable, locked / "inside.png", unsearchable / "seen.png"):
        cases.append(Case(path, "file system", denied))
    for path, expect in ((folder, "ok"), (unsearchable, "ok"), (locked / "inside.png", denied),
                         (folder / "pipe.png", "error"), (folder / "loop_a.png", "error"),
                         (folder / "dangling.png", "error"), (folder / "no_such.png", "error")):
        cases.append(Case(path, "folder listing", expect, call="list"))
    return cases


# ---------------------------------------------------------------- the worker

def _status_mb(field: str) -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


def _reset_peak_rss() -> float:
    """Reset the peak RSS (Linux: clear_refs 5) so each file's own peak is seen; returns the RSS now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS:")


def _limit_memory(extra_bytes: int) -> None:
    """Cap the address space at what is mapped now plus `extra_bytes`, so a decoder that did
    try to allocate a bomb's pixels fails with MemoryError (seen as a crash), not the machine."""
    try:
        import resource
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, resource.RLIM_INFINITY))
    except (OSError, ValueError, StopIteration):
        pass


def classify(path: Path) -> dict:
    """Load one file three ways; the outcome is 'ok', 'error' (clear) or a failure kind."""
    import torch

    from cflow_ad.data import load_image, load_image_and_original, load_mask
    from cflow_ad.errors import CflowInputError, ImageTooLargeError

    name = path.name
    results = []
    t0 = time.perf_counter()
    rss0 = _reset_peak_rss()
    for fn in ("load_image", "load_image_and_original", "load_mask"):
        try:
            if fn == "load_image":
                tensors = [(load_image(path, SIZE), (3, SIZE, SIZE))]
            elif fn == "load_mask":
                tensors = [(load_mask(path, SIZE), (1, SIZE, SIZE))]
            else:
                x, original = load_image_and_original(path, SIZE)
                tensors = [(x, (3, SIZE, SIZE)), (original, (3, *original.shape[1:]))]
        except CflowInputError as exc:
            msg = str(exc)
            clear = "\n" not in msg and name in msg
            results.append({"fn": fn, "outcome": "error" if clear else "unclear error", "message": msg,
                            "too_large": isinstance(exc, ImageTooLargeError)})
            continue
        except BaseException as exc:  # noqa: BLE001 - anything else is what the fuzzing looks for
            results.append({"fn": fn, "outcome": "crash", "message": f"{type(exc).__name__}: {exc}"})
            continue
        bad = [f"{tuple(t.shape)} {t.dtype}" for t, shape in tensors
               if tuple(t.shape) != shape or t.dtype != torch.float32 or not bool(torch.isfinite(t).all())
               or float(t.min()) < 0 or float(t.max()) > 1]
        results.append({"fn": fn, "outcome": "bad tensor" if bad else "ok", "message": "; ".join(bad)})
    outcomes = {r["outcome"] for r in results}
    failure = sorted(outcomes - {"ok", "error"})
    if failure:
        outcome = failure[0]
    elif len(outcomes) > 1:
        outcome = "inconsistent"  # loaded by one function, refused by another
    else:
        outcome = outcomes.pop()
    return {"outcome": outcome, "seconds": time.perf_counter() - t0, "rss_growth_mb": _status_mb("VmHWM:") - rss0,
            "too_large": any(r.get("too_large") for r in results),
            "message": next((r["message"] for r in results if r["message"]), "")}


def classify_listing(path: Path) -> dict:
    """list_images on one path: 'ok' with the names found, 'error' (clear) or a failure kind."""
    from cflow_ad.data import list_images
    from cflow_ad.errors import CflowInputError

    t0 = time.perf_counter()
    try:
        found = list_images([path])
        result = {"outcome": "ok", "message": "", "listed": [str(p) for p in found]}
    except CflowInputError as exc:
        clear = "\n" not in str(exc) and path.name in str(exc)
        result = {"outcome": "error" if clear else "unclear error", "message": str(exc)}
    except BaseException as exc:  # noqa: BLE001
        result = {"outcome": "crash", "message": f"{type(exc).__name__}: {exc}"}
    return {**result, "seconds": time.perf_counter() - t0}


def _worker(list_file: str, start: int) -> None:
    import torch

    torch.set_num_threads(1)
    from cflow_ad import data  # noqa: F401 - imported before the memory cap

    items = json.loads(Path(list_file).read_text())
    _limit_memory(3 << 30)
    print("READY", flush=True)
    for i in range(start, len(items)):
        call, path = items[i]
        result = classify_listing(Path(path)) if call == "list" else classify(Path(path))
        print(json.dumps({"index": i, **result}), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
