"""DETR's data augmentation on numpy images and absolute xyxy boxes.

Follows official DETR (datasets/coco.py `make_coco_transforms`, datasets/transforms.py):
  train: horizontal flip (p 0.5); then with p 0.5 a multi-scale resize (shorter side one of
         480..800 step 32, longer side at most 1333), otherwise resize to 400/500/600,
         random crop of 384..600 px per side, and the multi-scale resize;
  eval:  shorter side 800, longer at most 1333.
Sizes use the official rule (`resized_size`; the longer side is clamped where that rule
overshoots max_size), images are resized with PIL's bilinear filter
(as torchvision on PIL images). Boxes stay absolute (x0, y0, x1, y1) pixels until
`to_normalized_cxcywh`. Images stay uint8 all the way to the device; the model normalizes
them (`detr_jax.image_statistics.normalize`).

Randomness comes only from the `np.random.Generator` passed in (grain seeds one per
example), so a seed fixes every augmentation whatever the number of workers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from detr_jax.data.records import Record
COCO_TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


def clean_record(record: Record, drop_crowd: bool = True):
    """Targets of a record, with crowd objects removed and boxes clipped to the image.

    Returns:
      boxes float32 [N, 4] xyxy pixels inside the image, labels int32 [N], and the number of
      non-crowd boxes dropped as degenerate (zero or negative size after clipping, NaN).
    """
    h, w = record.image.shape[:2] if record.image is not None else record.orig_size
    boxes = np.asarray(record.boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(record.labels, np.int32).reshape(-1)
    if drop_crowd:
        keep = ~np.asarray(record.is_crowd, bool).reshape(-1)
        boxes, labels = boxes[keep], labels[keep]
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # False for NaN too
    return boxes[valid], labels[valid], int(np.sum(~valid))


def resized_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) of official DETR's resize: shorter side `size`, longer side <= max_size.

    Official DETR's rule (datasets/transforms.py `get_size_with_aspect_ratio`): when the
    longer side would exceed max_size, the shorter side becomes round(max_size * short /
    long) and the longer side follows from that rounded side, so it can come out over
    max_size (by up to half the aspect ratio: 320x700 with max_size 128 gives 59x129).
    Deliberate deviation: such a longer side is clamped to max_size (a pixel, for common
    aspect ratios), so that a bucket built from max_size holds every resized image (an
    overflow compiles a new shape mid-run). Wherever the official size is within max_size
    it is returned unchanged.

    Returns:
      (h, w) with min(h, w) <= size and, if max_size is given, max(h, w) <= max_size.
    """
    short, long = float(min(height, width)), float(max(height, width))
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        out_h, out_w = height, width
    elif width < height:
        out_h, out_w = int(size * height / width), size
    else:
        out_h, out_w = size, int(size * width / height)
    if max_size is not None:  # only the longer side can exceed it (by the rounding above)
        out_h, out_w = min(out_h, max_size), min(out_w, max_size)
    return out_h, out_w


def resize(image: np.ndarray, boxes: np.ndarray, out_size: tuple[int, int]):
    """Bilinear resize of uint8 [H, W, 3] to out_size (h, w); boxes scaled with it."""
    h, w = image.shape[:2]
    oh, ow = out_size
    if (oh, ow) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BILINEAR))
    scale = np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
    return image, (boxes * scale).astype(np.float32)


def hflip(image: np.ndarray, boxes: np.ndarray):
    """Mirrors the image left-right; boxes (x0, y0, x1, y1) -> (w - x1, y0, w - x0, y1)."""
    w = image.shape[1]
    flipped = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32)
    return image[:, ::-1], flipped + np.array([w, 0, w, 0], np.float32)


def crop(image, boxes, labels, top: int, left: int, height: int, width: int):
    """Crops a region; boxes are clipped to it and dropped when they become empty."""
    image = image[top : top + height, left : left + width]
    boxes = boxes - np.array([left, top, left, top], np.float32)
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, boxes[keep], labels[keep]


def random_size_crop(image, boxes, labels, rng: np.random.Generator, min_size: int, max_size: int):
    """Crop of random size (each side in [min_size, min(side, max_size)]) and position."""
    h, w = image.shape[:2]
    crop_w = _randint(rng, min(min_size, w, max_size), min(w, max_size))
    crop_h = _randint(rng, min(min_size, h, max_size), min(h, max_size))
    top = _randint(rng, 0, h - crop_h)
    left = _randint(rng, 0, w - crop_w)
    return crop(image, boxes, labels, top, left, crop_h, crop_w)


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(rng.integers(low, high + 1))


@dataclasses.dataclass(frozen=True)
class TrainAugmentation:
    """Official DETR training augmentation (defaults: COCO sizes).

    Attributes:
      scales: shorter-side sizes of the final multi-scale resize.
      max_size: cap on the longer side of the final resize.
      crop_scales: shorter-side sizes of the resize before the crop (no cap).
      crop_size: (min, max) side of the random crop.
      hflip_prob: probability of the horizontal flip.
      crop_prob: probability of the resize-crop-resize branch.
    """

    scales: tuple[int, ...] = COCO_TRAIN_SCALES
    max_size: int = 1333
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    hflip_prob: float = 0.5
    crop_prob: float = 0.5

    def __call__(self, image, boxes, labels, rng: np.random.Generator):
        """uint8 [H, W, 3], xyxy boxes [N, 4], labels [N] -> the same, augmented."""
        if rng.random() < self.hflip_prob:
            image, boxes = hflip(image, boxes)
        if rng.random() < self.crop_prob:
            h, w = image.shape[:2]
            size = self.crop_scales[rng.integers(len(self.crop_scales))]
            image, boxes = resize(image, boxes, resized_size(h, w, size))
            image, boxes, labels = random_size_crop(image, boxes, labels, rng, *self.crop_size)
        h, w = image.shape[:2]
        size = self.scales[rng.integers(len(self.scales))]
        image, boxes = resize(image, boxes, resized_size(h, w, size, self.max_size))
        return np.ascontiguousarray(image), boxes, labels


@dataclasses.dataclass(frozen=True)
class EvalResize:
    """Evaluation resize: shorter side `scale`, longer side at most `max_size`."""

    scale: int = 800
    max_size: int = 1333

    def __call__(self, image, boxes, labels, rng=None):
        h, w = image.shape[:2]
        image, boxes = resize(image, boxes, resized_size(h, w, self.scale, self.max_size))
        return image, boxes, labels


def to_normalized_cxcywh(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Absolute xyxy [N, 4] -> (cx, cy, w, h) [N, 4] relative to a height x width image."""
    x0, y0, x1, y1 = np.asarray(boxes, np.float32).reshape(-1, 4).T
    out = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)
    return (out / np.array([width, height, width, height], np.float32)).astype(np.float32)

