"""Tensors and datasets for anomaly detection, on the decoding of `images`.

Images come back as float32 tensors [3, H, W] in [0, 1] (the model does the
ImageNet normalisation), masks as float32 tensors [1, H, W] in {0, 1}.  Every
problem with a user's file or folder is reported as a one-line
:class:`CflowInputError` naming the path, never as a PIL traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import CflowInputError
from .geometry import InputFrame, as_hw
from .images import _images_in, _open, _PathLike, _to_8bit, as_chw, read
from .images import IMAGE_EXTENSIONS, list_images  # noqa: F401  (public here too: datasets are listed with them)

def _to_tensor(im: Image.Image | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(as_chw(im))


def _read_image(path: _PathLike, frame: InputFrame) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int, int, int]]:
    """The model input of an image file, its original (W, H) for mask checks, and its box in the input."""
    im = _open(path, "image")
    original = im.size
    arr, box = frame.place(_to_8bit(im, Path(path), "image"))
    return _to_tensor(arr), original, box


def load_image_and_original(source: _PathLike | bytes, size, name: str | None = None,
                            max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`images.read` as tensors."""
    x, original = read(source, size, name, max_pixels)
    return torch.from_numpy(x), torch.from_numpy(original)


def _read_mask(path: _PathLike, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load a binary mask tensor and also return its original (W, H)."""
    im = _open(path, "mask")
    original = im.size
    im = _to_8bit(im, Path(path), "mask").convert("L")
    im = im.point(lambda v: 255 if v >= 128 else 0)
    im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
    arr = (np.asarray(im) > 0).astype(np.float32)
    return torch.from_numpy(arr[None].copy()), original


def load_image(path: _PathLike, size) -> torch.Tensor:
    """Read an image as float32 RGB [3, H, W] in [0, 1], resized without cropping (`size`: as
    `load_image_and_original`'s)."""
    return _read_image(path, InputFrame.of(size))[0]


def load_mask(path: _PathLike, size: int | Sequence[int]) -> torch.Tensor:
    """Read a defect mask (binarised at 128) as float32 [1, H, W] in {0, 1}."""
    return _read_mask(path, as_hw(size))[0]


class Record(NamedTuple):
    """One dataset entry; plain tuples (path, label, defect_type, mask_path) convert to it."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None

    @property
    def has_mask(self) -> bool:
        """Whether pixel metrics can use this image: a good image's mask is all zero, a defect image
        needs its mask file (sets labelled per image only have none)."""
        return self.label == 0 or self.mask_path is not None


@dataclass
class Sample:
    """One loaded item: image [3,H,W], mask [1,H,W], label 0 good / 1 anomalous; `has_mask` False for a
    defect image without a mask file, whose all-zero `mask` then means nothing (see `Record.has_mask`).
    `box` (top, left, height, width) is where the image is in the input (`geometry.InputFrame`); the
    mask is always in the whole frame, as the maps are once `geometry.restore` has removed the padding."""

    image: torch.Tensor
    mask: torch.Tensor
    label: int
    defect_type: str
    path: str
    has_mask: bool
    box: torch.Tensor


class AnomalyDataset(torch.utils.data.Dataset):
    """Lazily loads records; items are dicts so the default collate_fn batches them."""

    def __init__(self, records: Iterable[Sequence], size):
        self.frame = InputFrame.of(size)
        self.size = self.frame.size
        self.records = [Record(Path(p), int(label), str(kind), Path(m) if m is not None else None)
                        for p, label, kind, m in records]

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int) -> Sample:
        """Load one record, checking that its mask matches its image."""
        rec = self.records[index]
        image, image_size, box = _read_image(rec.path, self.frame)
        if rec.mask_path is None:
            mask = torch.zeros(1, *self.size, dtype=torch.float32)
        else:
            mask, mask_size = _read_mask(rec.mask_path, self.size)
            if mask_size != image_size:
                raise CflowInputError(
                    f"mask '{rec.mask_path}' is {mask_size[0]}x{mask_size[1]} but its image '{rec.path}' is "
                    f"{image_size[0]}x{image_size[1]}: a mask must have the same size as its image")
        return Sample(image=image, mask=mask, label=rec.label, defect_type=rec.defect_type, path=str(rec.path),
                      has_mask=rec.has_mask, box=torch.tensor(box))

    def __getitem__(self, index: int) -> dict:
        return dict(vars(self.sample(index)))


class _Failed(NamedTuple):
    """An item whose file could not be read: its dataset index and its one-line error."""

    index: int
    error: CflowInputError


class _Guarded(torch.utils.data.Dataset):
    """A dataset whose bad files come back as `_Failed` instead of raising: in a worker process an
    exception would reach the user as DataLoader's multi-line traceback, not as its one line."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except CflowInputError as exc:
            return _Failed(i, exc)


class _Collate:
    """Collates a batch's readable items with `collate` and keeps its `_Failed` items apart."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items: list):
        failed = [x for x in items if isinstance(x, _Failed)]
        good = [x for x in items if not isinstance(x, _Failed)]
        return (self.collate(good) if good else None), failed


def image_loader(dataset, compute, batch_size: int = 1, batch_sampler=None,
                 collate=torch.utils.data.default_collate, pin: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` in order, decoding in `compute.loader_workers` processes (kept
    across passes; `shut_down` stops them), into pinned memory when the device is a GPU unless `pin`
    is False (a caller that keeps what it reads must not hold page-locked memory for it). Read it with
    `checked`. It draws from its own generator, so the number of workers changes no random draw of the run."""
    workers = compute.loader_workers
    kw = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return torch.utils.data.DataLoader(
        _Guarded(dataset), num_workers=workers, persistent_workers=workers > 0, pin_memory=pin and compute.pin_memory,
        collate_fn=_Collate(collate), generator=torch.Generator(), **kw)


def shut_down(loader: torch.utils.data.DataLoader) -> None:
    """Stop the persistent worker processes of an `image_loader` now: they otherwise live as long as the
    loader, which a reference cycle can keep until the garbage collector runs."""
    if loader._iterator is not None:  # only a loader with persistent workers keeps its iterator
        loader._iterator._shutdown_workers()
        loader._iterator = None  # read again, it starts new workers


def checked(loader: torch.utils.data.DataLoader, on_error=None):
    """The batches of an `image_loader`. A file that cannot be read raises its one-line
    CflowInputError, or with `on_error(index, error)` is reported there and left out of its batch
    (a batch of only bad files is skipped)."""
    for batch, failed in loader:
        for f in failed:
            if on_error is None:
                raise f.error
            on_error(f.index, f.error)
        if batch is not None:
            yield batch


class ImageFiles(torch.utils.data.Dataset):
    """Image files as (index, model input [3, H, W], the image at its own size [3, H0, W0]): what
    `predict` scores, the original being where its outputs are drawn. `size`: as `load_image`'s."""

    def __init__(self, paths: Sequence[_PathLike], size):
        self.paths, self.size = list(paths), InputFrame.of(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return (i, *load_image_and_original(self.paths[i], self.size))


def collate_files(items: list) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """`ImageFiles` items as (indices, a stacked input batch, the originals, which differ in size)."""
    index, inputs, originals = zip(*items)
    return list(index), torch.stack(inputs), list(originals)


def _refuse(path: Path, error: CflowInputError) -> None:
    """A training or test set stops at an entry named like an image that is no file (a broken link, a
    FIFO), as at an unreadable image: leaving it out would change the set without a word."""
    raise error


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def mvtec_categories(root: _PathLike) -> list[str]:
    """Names of the MVTec-style categories under root (those with train/good)."""
    root = Path(root)
    if not root.is_dir():
        raise CflowInputError(
            f"dataset root '{root}' does not exist: pass the folder that contains the category folders")
    return [p.name for p in _subfolders(root) if (p / "train" / "good").is_dir()]


def mvtec_dataset(root: _PathLike, category: str, split: str, size,
                  require_masks: bool = False) -> AnomalyDataset:
    """Dataset for one category of an MVTec AD style folder tree. A defect image without its
    ground_truth/<type>/<name>_mask.png has no mask (pixel metrics leave it out), or with
    `require_masks` is an error: many inspection sets are labelled per image only."""
    root = Path(root)
    categories = mvtec_categories(root)
    base = root / category
    if not base.is_dir():
        found = ", ".join(categories) if categories else "none (expected <root>/<category>/train/good)"
        raise CflowInputError(f"category '{category}' not found in '{root}': available categories: {found}")
    if split == "train":
        folder = base / "train" / "good"
        if not folder.is_dir():
            raise CflowInputError(
                f"missing folder '{folder}': the MVTec layout needs <category>/train/good with defect-free images")
        images = _images_in(folder, on_skip=_refuse)
        if not images:
            raise CflowInputError(f"no training images in '{folder}': put defect-free images there")
        return AnomalyDataset([(p, 0, "good", None) for p in images], size)
    if split != "test":
        raise CflowInputError(f"unknown split '{split}' for '{base}': use 'train' or 'test'")
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise CflowInputError(
            f"missing folder '{test_dir}': the MVTec layout needs <category>/test/<defect type>/ with test images")
    records = []
    for type_dir in _subfolders(test_dir):
        kind = type_dir.name
        for p in _images_in(type_dir, on_skip=_refuse):
            if kind == "good":
                records.append((p, 0, kind, None))
                continue
            mask = base / "ground_truth" / kind / f"{p.stem}_mask.png"
            if not mask.is_file():
                if require_masks:
                    raise CflowInputError(
                        f"missing mask '{mask}' for test image '{p}': add the mask or move the image out of test/")
                mask = None
            records.append((p, 1, kind, mask))
    if not records:
        raise CflowInputError(f"no test images in '{test_dir}': put them in test/good and test/<defect type>")
    return AnomalyDataset(records, size)


def folder_dataset(normal_dir: _PathLike, size, abnormal_dir: _PathLike | None = None,
                   mask_dir: _PathLike | None = None, require_masks: bool = False) -> AnomalyDataset:
    """Dataset from plain folders: normal images, optional anomalous images and their masks. An
    anomalous image without a mask in `mask_dir` (or without `mask_dir`) has none, or with
    `require_masks` is an error."""
    records = [(p, 0, "good", None) for p in list_images([normal_dir], on_skip=_refuse)]
    if mask_dir is not None:
        mask_dir = Path(mask_dir)
        if abnormal_dir is None:
            raise CflowInputError(f"mask folder '{mask_dir}' given without an abnormal image folder: pass both")
        if not mask_dir.is_dir():
            raise CflowInputError(f"mask folder '{mask_dir}' does not exist: check the path")
    if abnormal_dir is not None:
        for p in list_images([abnormal_dir], on_skip=_refuse):
            mask = None
            if mask_dir is not None:
                candidates = [mask_dir / f"{p.stem}.png", mask_dir / f"{p.stem}_mask.png"]
                mask = next((c for c in candidates if c.is_file()), None)
                if mask is None and require_masks:
                    raise CflowInputError(
                        f"no mask for abnormal image '{p}': expected '{candidates[0]}' or '{candidates[1]}'")
            elif require_masks:
                raise CflowInputError(
                    f"no mask for abnormal image '{p}': masks are required, pass --mask-dir with <stem>.png masks")
            records.append((p, 1, "abnormal", mask))
    return AnomalyDataset(records, size)


def held_out_count(n: int, fraction: float) -> int:
    """How many of `n` images `split_train_val` holds out for `fraction` > 0 (at least one), while n - 1 or
    fewer."""
    return max(round(n * fraction), 1)


def split_train_val(dataset: AnomalyDataset, val_fraction: float,
                    seed: int) -> tuple[AnomalyDataset, AnomalyDataset]:
    """Deterministic random split of the records; both parts keep their original order."""
    if not 0.0 < val_fraction < 1.0:
        raise CflowInputError(f"validation fraction {val_fraction} is invalid: use a value between 0 and 1")
    n = len(dataset)
    if n < 2:
        where = f" in '{Path(dataset.records[0][0]).parent}'" if n else ""
        raise CflowInputError(f"cannot hold out a share of {n} image(s){where} and train on the rest: add images")
    n_val = min(held_out_count(n, val_fraction), n - 1)
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [r for i, r in enumerate(dataset.records) if i not in val_idx]
    val = [r for i, r in enumerate(dataset.records) if i in val_idx]
    return AnomalyDataset(train, dataset.frame), AnomalyDataset(val, dataset.frame)  # the frame: size and aspect handling


# ---------------------------------------------------------------- synthetic data

_DEFECT_TYPES = ("scratch", "spot")
_DEFECT_SHIFT = 0.35  # texture spans [0.3, 0.7], so even after clipping a defect differs by >= 0.3


def _texture(rng: np.random.Generator, waves: np.ndarray, h: int, w: int) -> np.ndarray:
    """Shared periodic texture (fixed frequencies/orientations) with a per-image phase and jitter."""
    v, u = np.mgrid[0:h, 0:w]
    u = u / w
    v = v / h
    t = np.zeros((h, w))
    for freq, theta, amp in waves:
        phase = rng.uniform(0, 2 * np.pi)
        a = amp * (1 + rng.normal(0, 0.05))
        t += a * np.sin(2 * np.pi * freq * (np.cos(theta) * u + np.sin(theta) * v) + phase)
    t /= np.abs(waves[:, 2]).sum() * 1.1  # keeps |t| < 1 despite amplitude jitter
    return 0.5 + 0.2 * np.clip(t, -1, 1)


def _scratch_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Thin straight segment, about 1-2 % of the image."""
    s = min(h, w)
    length = rng.uniform(0.35, 0.7) * s
    half_width = max(2.0, 0.03 * s) / 2
    angle = rng.uniform(0, np.pi)
    dx, dy = np.cos(angle), np.sin(angle)
    mx = abs(dx) * length / 2 + half_width + 1
    my = abs(dy) * length / 2 + half_width + 1
    cx, cy = rng.uniform(mx, w - mx), rng.uniform(my, h - my)
    y, x = np.mgrid[0:h, 0:w]
    along = np.clip((x - cx) * dx + (y - cy) * dy, -length / 2, length / 2)
    dist = np.hypot(x - (cx + along * dx), y - (cy + along * dy))
    return dist <= half_width


def _spot_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Filled rotated ellipse covering 1-4 % of the image."""
    area = rng.uniform(0.01, 0.04) * h * w
    ratio = rng.uniform(0.5, 1.0)
    a = min(math.sqrt(area / (np.pi * ratio)), min(h, w) / 2 - 2)
    b = ratio * a
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(a + 1, w - a - 1), rng.uniform(a + 1, h - a - 1)
    y, x = np.mgrid[0:h, 0:w]
    xr = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    yr = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    return (xr / a) ** 2 + (yr / b) ** 2 <= 1


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def _to_uint8(gray: np.ndarray) -> np.ndarray:
    return np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)


def make_synthetic_mvtec(root: _PathLike, category: str = "synthetic", n_train: int = 40, n_test_good: int = 10,
                         n_test_defect: int = 10, size: int | Sequence[int] = 128, seed: int = 0) -> Path:
    """Write a small deterministic MVTec-layout dataset (grayscale PNGs) and return ``root``.

    Every image is the same periodic texture with a random phase and a little noise;
    defect images carry a 'scratch' or a 'spot' (alternating) whose intensity differs
    by at least 0.3 of the range, with its {0, 255} mask in ground_truth/.  The same
    seed gives byte-identical files.  The category folder must not already hold files,
    so stale images from an earlier run can never mix in.
    """
    h, w = as_hw(size)
    if min(h, w) < 32:
        raise CflowInputError(f"synthetic image size {size!r} is too small: use at least 32 pixels")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise CflowInputError("synthetic dataset needs n_train >= 1 and non-negative test counts")
    root = Path(root)
    base = root / category
    if base.exists() and any(base.iterdir()):
        raise CflowInputError(f"'{base}' already exists and is not empty: choose another root or delete it")

    rng = np.random.default_rng(seed)
    waves = np.stack([rng.uniform(2, 8, 3), rng.uniform(0, np.pi, 3), rng.uniform(0.5, 1.0, 3)], axis=1)

    def normal_image() -> np.ndarray:
        return _texture(rng, waves, h, w)

    def finish(gray: np.ndarray) -> np.ndarray:
        return _to_uint8(gray + rng.normal(0, 0.015, gray.shape))

    for i in range(n_train):
        _save_png(finish(normal_image()), base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save_png(finish(normal_image()), base / "test" / "good" / f"{i:03d}.png")
    counters = dict.fromkeys(_DEFECT_TYPES, 0)
    for i in range(n_test_defect):
        kind = _DEFECT_TYPES[i % len(_DEFECT_TYPES)]
        gray = normal_image()
        mask = _scratch_mask(rng, h, w) if kind == "scratch" else _spot_mask(rng, h, w)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        gray[mask] = np.clip(gray[mask] + sign * _DEFECT_SHIFT, 0, 1)
        name = f"{counters[kind]:03d}"
        counters[kind] += 1
        _save_png(finish(gray), base / "test" / kind / f"{name}.png")
        _save_png(mask.astype(np.uint8) * 255, base / "ground_truth" / kind / f"{name}_mask.png")
    return root


def make_fine_defect_mvtec(root: _PathLike, category: str = "fine", size: int = 256, n_train: int = 16,
                           n_test_good: int = 6, n_test_defect: int = 8, cell: int = 16, seed: int = 0) -> Path:
    """Write an MVTec-layout set of large images whose defects vanish when the image is downscaled, and
    return ``root``: a smooth surface with a little noise, and per defect image a `cell` x `cell`
    checkerboard of 1-px squares (+-0.25) at a place on a 4-px grid. Any 2x2 (or 4x4) average of the
    checkerboard is the surface itself, so a model of the image squashed 4x cannot see it: the case
    tiling is for. Same seed, same files."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size] / size
    base = Path(root) / category
    if base.exists() and any(base.iterdir()):
        raise CflowInputError(f"'{base}' already exists and is not empty: choose another root or delete it")

    def surface() -> np.ndarray:
        t = 0.5 + 0.1 * np.sin(2 * np.pi * (1.5 * u + rng.uniform())) * np.cos(2 * np.pi * (v + rng.uniform()))
        return t + rng.normal(0, 0.01, t.shape)

    for i in range(n_train):
        _save_png(_to_uint8(surface()), base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save_png(_to_uint8(surface()), base / "test" / "good" / f"{i:03d}.png")
    yy, xx = np.mgrid[0:cell, 0:cell]
    for i in range(n_test_defect):
        gray, mask = surface(), np.zeros((size, size), np.uint8)
        r, c = rng.integers(2, size // 4 - cell // 4 - 2, 2) * 4
        gray[r : r + cell, c : c + cell] += 0.25 * np.where((yy + xx) % 2 == 0, 1, -1)
        mask[r : r + cell, c : c + cell] = 255
        _save_png(_to_uint8(gray), base / "test" / "checker" / f"{i:03d}.png")
        _save_png(mask, base / "ground_truth" / "checker" / f"{i:03d}_mask.png")
    return Path(root)
