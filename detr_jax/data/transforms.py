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
them (`detr_jax.ops.image_statistics.normalize`).

Instance masks (bool [N, H, W], one per box) are optional everywhere: every transform takes
them as a last argument `masks` and, when given, returns them transformed as a last
result, so the calls without masks keep their form. They are flipped and cropped with the
image and resized by PyTorch's nearest rule (`resize_masks`), as official DETR; a crop that
empties a box drops its mask with it.

Randomness comes only from the `np.random.Generator` passed in (grain seeds one per
example), so a seed fixes every augmentation whatever the number of workers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from detr_jax.data.records import DatasetFormatError, Record
from detr_jax.ops.nearest import nearest_indices

COCO_TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)


def clean_record(record: Record, drop_crowd: bool = True, with_masks: bool = False):
    """Targets of a record, with crowd objects removed and boxes clipped to the image.

    Args:
      with_masks: also return the kept objects' masks; an object whose mask is empty is
        dropped and counted with the degenerate boxes.

    Returns:
      boxes float32 [N, 4] xyxy pixels inside the image, labels int32 [N], the number of
      non-crowd objects dropped as degenerate (box of zero or negative size after clipping,
      NaN, or with masks an empty mask), and with masks their masks bool [N, H, W].

    Raises:
      DatasetFormatError (naming `record.name`): with masks, the record has none, or they
        are not one [H, W] mask of the image's size per box.
    """
    h, w = record.image.shape[:2] if record.image is not None else record.orig_size
    boxes = np.asarray(record.boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(record.labels, np.int32).reshape(-1)
    keep = ~np.asarray(record.is_crowd, bool).reshape(-1) if drop_crowd else np.ones(len(boxes), bool)
    boxes = np.clip(boxes[keep], 0, [w, h, w, h]).astype(np.float32)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # False for NaN too
    if not with_masks:
        return boxes[valid], labels[keep][valid], int(np.sum(~valid))
    masks = _checked_masks(record, len(keep), h, w)[keep]
    valid &= masks.any(axis=(1, 2))
    return boxes[valid], labels[keep][valid], int(np.sum(~valid)), masks[valid]


def _checked_masks(record: Record, num_objects: int, height: int, width: int) -> np.ndarray:
    """The record's masks as bool [num_objects, height, width], or DatasetFormatError."""
    if record.masks is None:
        raise DatasetFormatError(f"{record.name}: the record has no masks (its source was built without masks)")
    masks = np.asarray(record.masks)
    if masks.shape != (num_objects, height, width):
        raise DatasetFormatError(
            f"{record.name}: masks of shape {list(masks.shape)}, expected [{num_objects}, {height}, {width}] "
            f"(one mask per box, each of the image's size)"
        )
    return masks.astype(bool, copy=False)


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


def resize(image: np.ndarray, boxes: np.ndarray, out_size: tuple[int, int], masks: np.ndarray | None = None):
    """Bilinear resize of uint8 [H, W, 3] to out_size (h, w); boxes scaled with it, and masks
    [N, H, W] when given (`resize_masks`)."""
    h, w = image.shape[:2]
    oh, ow = out_size
    if (oh, ow) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((ow, oh), Image.BILINEAR))
    scale = np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
    out = image, (boxes * scale).astype(np.float32)
    return out if masks is None else (*out, resize_masks(masks, out_size))


def resize_masks(masks: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """bool [N, H, W] -> bool [N, h, w] by official DETR's rule, PyTorch's
    `F.interpolate(mode="nearest")`: output pixel i reads input pixel floor(i * H / h).

    (PIL's NEAREST samples pixel centres instead, and picks other pixels.)
    """
    rows = nearest_indices(masks.shape[1], out_size[0])
    cols = nearest_indices(masks.shape[2], out_size[1])
    return np.asarray(masks, bool).take(rows, axis=1).take(cols, axis=2)


def hflip(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None = None):
    """Mirrors the image (and masks [N, H, W] when given) left-right; boxes (x0, y0, x1, y1)
    -> (w - x1, y0, w - x0, y1)."""
    w = image.shape[1]
    flipped = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32)
    out = image[:, ::-1], flipped + np.array([w, 0, w, 0], np.float32)
    return out if masks is None else (*out, masks[:, :, ::-1])


def crop(image, boxes, labels, top: int, left: int, height: int, width: int, masks=None):
    """Crops a region; boxes are clipped to it and dropped when they become empty, with their
    labels and (when given) their masks [N, H, W], which are cropped too.

    As official DETR, a box that keeps an area keeps its mask even where the crop leaves it
    no pixel.
    """
    image = image[top : top + height, left : left + width]
    boxes = boxes - np.array([left, top, left, top], np.float32)
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = image, boxes[keep], labels[keep]
    return out if masks is None else (*out, masks[keep, top : top + height, left : left + width])


def random_size_crop(image, boxes, labels, rng: np.random.Generator, min_size: int, max_size: int, masks=None):
    """Crop of random size (each side in [min_size, min(side, max_size)]) and position."""
    h, w = image.shape[:2]
    crop_w = _randint(rng, min(min_size, w, max_size), min(w, max_size))
    crop_h = _randint(rng, min(min_size, h, max_size), min(h, max_size))
    top = _randint(rng, 0, h - crop_h)
    left = _randint(rng, 0, w - crop_w)
    return crop(image, boxes, labels, top, left, crop_h, crop_w, masks)


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

    def __call__(self, image, boxes, labels, rng: np.random.Generator, masks=None):
        """uint8 [H, W, 3], xyxy boxes [N, 4], labels [N] (and masks bool [N, H, W]) -> the
        same, augmented (masks returned only when given; the randomness does not depend on them)."""
        extra = () if masks is None else (masks,)  # the optional last argument and result
        if rng.random() < self.hflip_prob:
            image, boxes, *extra = hflip(image, boxes, *extra)
        if rng.random() < self.crop_prob:
            h, w = image.shape[:2]
            size = self.crop_scales[rng.integers(len(self.crop_scales))]
            image, boxes, *extra = resize(image, boxes, resized_size(h, w, size), *extra)
            image, boxes, labels, *extra = random_size_crop(image, boxes, labels, rng, *self.crop_size, *extra)
        h, w = image.shape[:2]
        size = self.scales[rng.integers(len(self.scales))]
        image, boxes, *extra = resize(image, boxes, resized_size(h, w, size, self.max_size), *extra)
        return np.ascontiguousarray(image), boxes, labels, *map(np.ascontiguousarray, extra)


@dataclasses.dataclass(frozen=True)
class EvalResize:
    """Evaluation resize: shorter side `scale`, longer side at most `max_size`."""

    scale: int = 800
    max_size: int = 1333

    def __call__(self, image, boxes, labels, rng=None, masks=None):
        """As `TrainAugmentation`, without randomness (`rng` is not used)."""
        h, w = image.shape[:2]
        extra = () if masks is None else (masks,)
        image, boxes, *extra = resize(image, boxes, resized_size(h, w, self.scale, self.max_size), *extra)
        return image, boxes, labels, *extra


def to_normalized_cxcywh(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Absolute xyxy [N, 4] -> (cx, cy, w, h) [N, 4] relative to a height x width image."""
    x0, y0, x1, y1 = np.asarray(boxes, np.float32).reshape(-1, 4).T
    out = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)
    return (out / np.array([width, height, width, height], np.float32)).astype(np.float32)

