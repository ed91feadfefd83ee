"""Where the images of train, test and calibrate come from: one `DataSource` object.

Which layout a root has (MVTec AD, ShanghaiTech Campus video frames, or no root: plain
folders) is decided here only, by `layout`, so every command reads a root the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import data as D
from .errors import CflowInputError
from .stc import stc_dataset, stc_scenes


def layout(root: str | Path | None) -> str:
    """'stc' for a root with training/frames/, 'mvtec' for any other root, 'folders' without one."""
    if root is None:
        return "folders"
    return "stc" if (Path(root) / "training" / "frames").is_dir() else "mvtec"


@dataclass(frozen=True)
class DataSource:
    """An MVTec-layout root and category, an STC root and scene (every `frame_step`-th frame of each
    video), or plain folders: `normal_dir`, and for testing `abnormal_dir` and `mask_dir`. A defect
    image without a mask is kept for the image metrics and left out of the pixel metrics, or with
    `require_masks` is an error naming the missing mask."""

    data: str | Path | None = None
    category: str | None = None
    normal_dir: str | Path | None = None
    abnormal_dir: str | Path | None = None
    mask_dir: str | Path | None = None
    frame_step: int = 1
    require_masks: bool = False

    @property
    def layout(self) -> str:
        return layout(self.data)

    def __str__(self) -> str:
        """Where the images are, for messages."""
        return str(Path(self.data, self.category or "") if self.data is not None else self.normal_dir)

    def categories(self) -> list[str]:
        """The categories of an MVTec-layout root or the scenes of an STC root (none for plain folders)."""
        kind = self.layout
        if kind == "folders":
            return []
        return stc_scenes(self.data) if kind == "stc" else D.mvtec_categories(self.data)

    def has_test(self) -> bool:
        """Whether there is a labelled test split to evaluate on."""
        kind = self.layout
        if kind == "folders":
            return self.abnormal_dir is not None
        if kind == "stc":
            return (Path(self.data) / "testing" / "frames").is_dir()
        return (Path(self.data) / str(self.category) / "test").is_dir()

    def open(self, split: str, size) -> D.AnomalyDataset:
        """The 'train' or 'test' split as a dataset of images brought to `size`: an int, (H, W), an
        `InputFrame`, or a config (its size and aspect handling)."""
        if self.frame_step < 1:
            raise CflowInputError(f"--frame-step must be >= 1, got {self.frame_step}")
        kind = self.layout
        if self.frame_step > 1 and kind != "stc":
            raise CflowInputError(
                "--frame-step picks frames of videos: it needs --data with an STC root (training/frames/)")
        if kind == "stc":
            if not self.category:
                raise CflowInputError(
                    f"no scene given for '{self.data}': pass --category, one of {', '.join(self.categories())}")
            return stc_dataset(self.data, self.category, split, size, self.frame_step)
        if kind == "mvtec":
            if not self.category:
                raise CflowInputError(
                    f"no category given for '{self.data}': pass --category (one of the folders under it)")
            return D.mvtec_dataset(self.data, self.category, split, size, self.require_masks)
        if self.normal_dir is None:
            raise CflowInputError("no data given: pass --data ROOT --category NAME, or --normal-dir DIR")
        if split != "test":
            return D.folder_dataset(self.normal_dir, size)
        return D.folder_dataset(self.normal_dir, size, self.abnormal_dir, self.mask_dir, self.require_masks)
