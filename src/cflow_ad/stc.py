"""Video frames in the ShanghaiTech Campus (STC) layout: one model per scene.

    ROOT/training/frames/<scene>_<video>/000.jpg, 001.jpg, ...     defect-free frames
    ROOT/testing/frames/<scene>_<video>/000.jpg, ...                test frames
    ROOT/testing/test_pixel_mask/<scene>_<video>.npy                [n_frames, H, W] 0/1 masks
    ROOT/testing/test_frame_mask/<scene>_<video>.npy                [n_frames] 0/1 labels (optional)

The scene is the part of a video folder's name before the first '_' ('01_0014' -> '01'),
and it plays the role of the MVTec category (`--category 01`). Frames are ordered by their
number (so '1000.jpg' follows '999.jpg'), the order the masks use.

Memory: a dataset holds only paths, labels and mask frame indices (about 300 bytes a frame,
~80 MB for STC's 274,515 training frames). Listing is one directory scan per video and one
sort per video, O(n) in the number of frames. Pixel masks are never read whole: a sample
maps its video's .npy with ``np.load(..., mmap_mode="r")`` and copies one frame; frame
labels come from test_frame_mask when present, else from a scan of the mapped pixel mask in
chunks of a few MB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import data as D
from .errors import CflowInputError
from .geometry import InputFrame, as_hw
from .images import IMAGE_EXTENSIONS, _one_line

_MASK_CHUNK_BYTES = 8 << 20  # label scan of a pixel mask: this much mapped at a time


def _frames_dir(root: Path, split: str) -> Path:
    folder = root / ("training" if split == "train" else "testing") / "frames"
    if not folder.is_dir():
        raise CflowInputError(
            f"missing folder '{folder}': the STC layout needs training/frames/<scene>_<video>/ and "
            "testing/frames/<scene>_<video>/ with the frames as images")
    return folder


def _videos(folder: Path) -> dict[str, list[Path]]:
    """Video folders under a frames folder, grouped by scene, each group sorted by name."""
    scenes: dict[str, list[Path]] = {}
    with os.scandir(folder) as entries:
        for e in entries:
            if e.is_dir() and not e.name.startswith("."):
                scenes.setdefault(e.name.partition("_")[0], []).append(Path(e.path))
    return {s: sorted(v) for s, v in sorted(scenes.items())}


def stc_scenes(root: D._PathLike) -> list[str]:
    """Scene ids ('01', '02', ...) with training videos under root/training/frames."""
    root = Path(root)
    if not root.is_dir():
        raise CflowInputError(
            f"dataset root '{root}' does not exist: pass the folder that holds training/ and testing/")
    return list(_videos(_frames_dir(root, "train")))


def _frame_key(name: str) -> tuple:
    stem = name.rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _frame_names(video: Path) -> list[str]:
    """Image file names of one video folder in frame order; one scandir, no per-file stat."""
    with os.scandir(video) as entries:
        names = [e.name for e in entries if not e.name.startswith(".")
                 and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file()]
    if not names:
        raise CflowInputError(f"no frames ({', '.join(IMAGE_EXTENSIONS)}) in video folder '{video}': "
                              "add its frames or remove the folder")
    return sorted(names, key=_frame_key)


def _mask_array(path: Path) -> np.ndarray:
    """A mask .npy mapped read-only (nothing read but its header), or a one-line error."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CflowInputError(f"cannot read mask file '{path}': {_one_line(exc)}; it must be a .npy array") from None


def _labels_from_pixels(path: Path, n: int, frame_bytes: int) -> np.ndarray:
    """Per frame: does its pixel mask have any positive pixel; read in chunks, each mapped only while scanned."""
    out = np.empty(n, dtype=bool)
    step = max(1, _MASK_CHUNK_BYTES // max(frame_bytes, 1))
    for a in range(0, n, step):
        m = _mask_array(path)
        out[a : a + step] = np.asarray(m[a : a + step].reshape(min(step, n - a), -1).any(axis=1))
        del m
    return out


def _frame_labels(path: Path, n: int) -> np.ndarray:
    """The 0/1 labels of test_frame_mask/<video>.npy (a small [n] array, read whole)."""
    try:
        labels = np.asarray(np.load(path, allow_pickle=False)).reshape(-1)
    except (OSError, ValueError, EOFError) as exc:
        raise CflowInputError(
            f"cannot read frame labels '{path}': {_one_line(exc)}; it must be a .npy array") from None
    if labels.shape[0] != n:
        raise CflowInputError(f"frame labels '{path}' have {labels.shape[0]} entries but the video has {n} frames: "
                              "one label per frame is needed")
    return labels != 0


class STCDataset(D.AnomalyDataset):
    """Frames of one STC scene; `records` are plain Records (mask_path: the video's .npy), and
    `mask_frames[i]` is the frame of that .npy that belongs to record i (-1: no mask)."""

    def __init__(self, records: list[D.Record], mask_frames: Sequence[int], size):
        super().__init__([], size)
        self.records = records
        self.mask_frames = np.asarray(mask_frames, dtype=np.int64)

    def sample(self, index: int) -> D.Sample:
        rec = self.records[index]
        if rec.mask_path is None:
            return super().sample(index)
        image, (w, h), box = D._read_image(rec.path, self.frame)
        m = _mask_array(rec.mask_path)
        frame = np.array(m[int(self.mask_frames[index])])  # copies one frame out of the mapping
        del m
        if frame.shape != (h, w):
            raise CflowInputError(
                f"mask '{rec.mask_path}' has frames of {frame.shape[1]}x{frame.shape[0]} but frame '{rec.path}' is "
                f"{w}x{h}: a mask must have the same size as its frames")
        im = Image.fromarray(np.where(frame > 0, 255, 0).astype(np.uint8))
        im = im.resize((self.size[1], self.size[0]), Image.Resampling.NEAREST)
        mask = torch.from_numpy((np.asarray(im) > 0).astype(np.float32)[None].copy())
        return D.Sample(image=image, mask=mask, label=rec.label, defect_type=rec.defect_type, path=str(rec.path),
                        has_mask=True, box=torch.tensor(box))


def stc_dataset(root: D._PathLike, scene: str, split: str, size,
                frame_step: int = 1) -> STCDataset:
    """All frames (every `frame_step`-th) of all videos of one scene. Train frames are 'good'
    (label 0); a test frame is 'anomalous' (1) when test_frame_mask says so or, without that
    file, when its pixel mask has a positive pixel, else 'good'; its mask is its .npy frame."""
    root = Path(root)
    frame = InputFrame.of(size)
    if isinstance(frame_step, bool) or not isinstance(frame_step, (int, np.integer)) or frame_step < 1:
        raise CflowInputError(f"invalid frame_step {frame_step!r}: use a positive int (1 keeps every frame)")
    if split not in ("train", "test"):
        raise CflowInputError(f"unknown split '{split}' for '{root}': use 'train' or 'test'")
    scenes = stc_scenes(root)
    if scene not in scenes:
        found = ", ".join(scenes) if scenes else "none (expected training/frames/<scene>_<video>/)"
        raise CflowInputError(
            f"scene '{scene}' not found in '{root / 'training' / 'frames'}': available scenes: {found}")
    frames_dir = _frames_dir(root, split)
    videos = _videos(frames_dir).get(scene, [])
    if not videos:
        raise CflowInputError(f"no videos of scene '{scene}' in '{frames_dir}': expected folders named {scene}_<video>")
    records: list[D.Record] = []
    mask_frames: list[int] = []
    if split == "train":
        for video in videos:
            records += [D.Record(video / name, 0, "good", None) for name in _frame_names(video)[::frame_step]]
        return STCDataset(records, [-1] * len(records), frame)
    pixel_dir, label_dir = root / "testing" / "test_pixel_mask", root / "testing" / "test_frame_mask"
    if not pixel_dir.is_dir():
        raise CflowInputError(
            f"missing folder '{pixel_dir}': the STC layout needs one <scene>_<video>.npy mask per test video")
    for video in videos:
        names = _frame_names(video)
        mask_path = pixel_dir / f"{video.name}.npy"
        if not mask_path.is_file():
            raise CflowInputError(f"missing mask '{mask_path}' for test video '{video}': add its [frames, H, W] .npy")
        m = _mask_array(mask_path)
        if m.ndim != 3:
            raise CflowInputError(f"mask '{mask_path}' has shape {tuple(m.shape)}: expected [frames, height, width]")
        n, mh, mw = m.shape
        frame_bytes = m.itemsize * mh * mw
        del m
        if n != len(names):
            raise CflowInputError(f"mask '{mask_path}' has {n} frames but video '{video}' has {len(names)}: "
                                  "one mask frame per video frame is needed")
        w, h = D._open(video / names[0], "image").size
        if (mh, mw) != (h, w):
            raise CflowInputError(f"mask '{mask_path}' has frames of {mw}x{mh} but frame '{video / names[0]}' is "
                                  f"{w}x{h}: a mask must have the same size as its frames")
        label_path = label_dir / f"{video.name}.npy"
        labels = (_frame_labels(label_path, n) if label_path.is_file()
                  else _labels_from_pixels(mask_path, n, frame_bytes))
        for i in range(0, n, frame_step):
            bad = bool(labels[i])
            records.append(D.Record(video / names[i], int(bad), "anomalous" if bad else "good", mask_path))
            mask_frames.append(i)
    return STCDataset(records, mask_frames, frame)


# ---------------------------------------------------------------- synthetic data

def _save_jpeg(gray: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(D._to_uint8(gray)).save(path, format="JPEG", quality=95)


def make_synthetic_stc(root: D._PathLike, scenes: Sequence[str] = ("01", "02"), train_videos: int = 2,
                       test_videos: int = 2, frames: int = 6, size: int | Sequence[int] = 64, seed: int = 0,
                       frame_masks: bool = True) -> Path:
    """Write a small deterministic STC-layout tree (grayscale JPEG frames) and return ``root``.

    Each scene has its own periodic texture (the MVTec generator's); in every test video the
    frames of its second half carry a 'spot' or 'scratch' (alternating per video), given in
    test_pixel_mask/<video>.npy as uint8 0/1, and, with `frame_masks`, in test_frame_mask/.
    Training videos are named <scene>_001, ..., test videos <scene>_0001, ..., frames 000.jpg, ...
    """
    h, w = as_hw(size)
    if min(h, w) < 32:
        raise CflowInputError(f"synthetic frame size {size!r} is too small: use at least 32 pixels")
    if train_videos < 1 or test_videos < 1 or frames < 1 or not scenes:
        raise CflowInputError("synthetic STC data needs a scene and at least 1 training video, test video and frame")
    root = Path(root)
    for part in ("training", "testing"):
        if (root / part).exists() and any((root / part).iterdir()):
            raise CflowInputError(f"'{root / part}' already exists and is not empty: choose another root or delete it")
    rng = np.random.default_rng(seed)
    for scene in scenes:
        waves = np.stack([rng.uniform(2, 8, 3), rng.uniform(0, np.pi, 3), rng.uniform(0.5, 1.0, 3)], axis=1)
        for v in range(train_videos):
            for i in range(frames):
                gray = D._texture(rng, waves, h, w) + rng.normal(0, 0.015, (h, w))
                _save_jpeg(gray, root / "training" / "frames" / f"{scene}_{v + 1:03d}" / f"{i:03d}.jpg")
        for v in range(test_videos):
            name = f"{scene}_{v + 1:04d}"
            masks = np.zeros((frames, h, w), dtype=np.uint8)
            for i in range(frames):
                gray = D._texture(rng, waves, h, w)
                if i >= frames // 2:
                    masks[i] = D._spot_mask(rng, h, w) if v % 2 == 0 else D._scratch_mask(rng, h, w)
                    sign = 1.0 if rng.random() < 0.5 else -1.0
                    gray[masks[i] > 0] = np.clip(gray[masks[i] > 0] + sign * D._DEFECT_SHIFT, 0, 1)
                _save_jpeg(gray + rng.normal(0, 0.015, (h, w)), root / "testing" / "frames" / name / f"{i:03d}.jpg")
            outputs = {"test_pixel_mask": masks}
            if frame_masks:
                outputs["test_frame_mask"] = masks.reshape(frames, -1).max(axis=1)
            for folder, array in outputs.items():
                (root / "testing" / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / "testing" / folder / f"{name}.npy", array)
    return root
