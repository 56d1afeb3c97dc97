"""What every data source returns, and the errors the input pipeline raises.

A source is random access (`len(source)`, `source[i]`) and returns `Record`s with boxes as
absolute (x0, y0, x1, y1) pixel coordinates in the frame of the returned image, exactly as
annotated: they may be degenerate or reach outside the image; `transforms.clean_record`
clips and drops those (counted), so every source shares one cleaning rule.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np


class DataError(Exception):
    """Base class of the input pipeline's errors."""


class DatasetFormatError(DataError, ValueError):
    """An annotation file or dataset is not in the expected format (names file and field)."""


class ImageLoadError(DataError, OSError):
    """An image could not be read or decoded (names the file and the reason)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep the fields when the error crosses a worker process boundary
        return (ImageLoadError, (self.path, self.reason))


@dataclasses.dataclass
class Record:
    """One annotated image, as stored in the dataset.

    Attributes:
      image: uint8 [H, W, 3] RGB, or None when only the annotations were asked for.
      boxes: float32 [N, 4] absolute (x0, y0, x1, y1) pixels in the image's frame.
      labels: int32 [N] category ids as in the dataset (COCO: 1..90).
      is_crowd: bool [N].
      image_id: the dataset's image id.
      orig_size: (H, W) of the image.
      name: where the image comes from (file path or dataset[index]), for messages.
      masks: bool [N, H, W], each object's pixels (one per box, in the same order), or
        None when the source was built without masks. Panoptic sources list "stuff"
        segments (sky, grass, ...) as objects too, with their tight boxes.
    """

    image: np.ndarray | None
    boxes: np.ndarray
    labels: np.ndarray
    is_crowd: np.ndarray
    image_id: int
    orig_size: tuple[int, int]
    name: str = ""
    masks: np.ndarray | None = None


@runtime_checkable
class DetectionSource(Protocol):
    """Random-access detection dataset.

    Attributes:
      category_names: {category id: name}, ids as they appear in `Record.labels`.
      num_classes: max category id + 1 (the model's `num_classes`).
      category_isthing: {category id: bool}, on sources that can return masks: True for
        countable "things", False for amorphous "stuff" (panoptic segmentation merges
        stuff of one class into one segment).

    Optional, where cheap (the checks made when a run starts use them, `data.checks`):
    `image_files()` -> [(path, (h, w) or None)] and `box_counts()` -> int [N] non-crowd
    boxes per example (`CocoFolderSource` has both).
    """

    category_names: dict[int, str]

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record:
        """Loads example `index` (0 <= index < len); raises ImageLoadError on a bad image."""
        ...

    def annotations(self, index: int) -> Record:
        """Like `__getitem__` but `image` may be None (cheaper where the source allows)."""
        ...


def empty_annotations() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes float32 [0, 4], labels int32 [0], is_crowd bool [0])."""
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), np.zeros((0,), bool)
