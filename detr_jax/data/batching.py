"""Batching: padding images to a few bucket shapes and targets to `max_boxes`.

A batch (what the pipeline yields; B = per-host batch size, M = max_boxes):
  image     uint8   [B, H, W, 3]  RGB pixels, zero-padded bottom/right to a bucket (the model
                                  normalizes them on device: image_statistics.normalize)
  mask      bool    [B, H, W]     True on real pixels (added by `with_pixel_mask` after the
                                  batch leaves the worker processes: it follows from `size`)
  labels    int32   [B, M]        category ids; 0 where not valid
  boxes     float32 [B, M, 4]     (cx, cy, w, h) relative to the unpadded image; 0 where not valid
  valid     bool    [B, M]
  image_id  int64   [B]           -1 for filler examples
  orig_size int32   [B, 2]        (h, w) of the stored image
  size      int32   [B, 2]        (h, w) after resizing, before padding
  is_real   bool    [B]           False for filler examples (eval's last batch)
  masks     bool    [B, M, H, W]  only with data.masks: each object's pixels in the resized
                                  image, aligned with labels/boxes/valid; False on padding
                                  pixels and on slots that are not valid

(H, W) is the smallest-area bucket holding every image of the batch, so XLA compiles one
program per bucket, not per batch. uint8 pixels and no mask are a quarter of the bytes of
normalized float32 images: what worker processes hand over and what goes to the device.
`BATCH_KEYS` are the keys every batch has; "masks" is optional, and large (B * M * H * W
bytes: with masks, keep data.max_boxes near the largest number of objects an image has).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BATCH_KEYS = ("image", "mask", "labels", "boxes", "valid", "image_id", "orig_size", "size", "is_real")
STATS_KEY = "stats"  # per-batch counters; removed from the batch by the pipeline's iterator


def round_up(value: int, step: int) -> int:
    return int(math.ceil(value / step) * step)


def make_buckets(shapes: Sequence[Sequence[int]], max_side: int, step: int) -> tuple[tuple[int, int], ...]:
    """The bucket shapes (h, w), smallest area first.

    Args:
      shapes: explicit (h, w) buckets; if empty, every (h, w) whose sides are multiples of
        `step` below `max_side`, or `max_side` itself rounded up to 32 (the backbone's
        stride): at most (max_side / step + 1)^2 shapes. For COCO (1333, step 128) the
        sides are 128, 256, ..., 1280 and 1344.
      max_side: the longest image side the transforms produce.
      step: side granularity of derived buckets, and of the fallback for a batch that fits
        no bucket.
    """
    if step <= 0:
        raise ValueError(f"bucket step must be positive, got {step}")
    if shapes:
        buckets = {(int(h), int(w)) for h, w in shapes}
    else:
        top = round_up(max_side, min(step, 32))
        sides = [*range(step, top, step), top]
        buckets = {(h, w) for h in sides for w in sides}
    return tuple(sorted(buckets, key=lambda s: (s[0] * s[1], s)))


def choose_bucket(buckets: Sequence[tuple[int, int]], height: int, width: int, step: int):
    """Smallest-area bucket holding a height x width image.

    Returns:
      ((h, w), overflow): overflow is True when no bucket fits and the shape is the image
      size rounded up to `step` instead (a new compiled shape; counted and logged).
    """
    for bh, bw in buckets:  # sorted by area
        if bh >= height and bw >= width:
            return (bh, bw), False
    return (round_up(height, step), round_up(width, step)), True


def collate(examples: Sequence[dict], buckets, max_boxes: int, step: int) -> dict:
    """Stacks transformed examples into a padded batch (see the module docstring), without
    the mask (`with_pixel_mask` adds it).

    Each example: image uint8 [h, w, 3], boxes float32 [n, 4] normalized cxcywh, labels
    int32 [n], image_id, orig_size (h, w), is_real, name (`Record.name`; "" for fillers),
    skipped_files (names of the unreadable images it stands in for), the counter
    num_degenerate, and optionally masks bool [n, h, w] (the batch has "masks" when its
    examples have them). Boxes beyond `max_boxes` are dropped (the first max_boxes are kept)
    and counted in the batch's stats.

    The batch's STATS_KEY entry holds int64 counters (examples, degenerate_boxes,
    truncated_boxes, bucket_overflows: 0 or 1) and two tuples of strings, which travel with
    the batch out of worker processes: skipped_files (the examples' skipped_files
    concatenated, repeats included) and overflow_images ("name (h=.., w=..)" with the
    resized size, for each image that fits no bucket by itself; empty when only the batch's
    combined extent fits none).
    """
    sizes = np.array([ex["image"].shape[:2] for ex in examples], np.int32).reshape(-1, 2)
    (bh, bw), overflow = choose_bucket(buckets, int(sizes[:, 0].max()), int(sizes[:, 1].max()), step)
    n = len(examples)
    batch = {
        "image": np.zeros((n, bh, bw, 3), np.uint8),
        "labels": np.zeros((n, max_boxes), np.int32),
        "boxes": np.zeros((n, max_boxes, 4), np.float32),
        "valid": np.zeros((n, max_boxes), bool),
        "image_id": np.array([ex["image_id"] for ex in examples], np.int64),
        "orig_size": np.array([ex["orig_size"] for ex in examples], np.int32).reshape(-1, 2),
        "size": sizes,
        "is_real": np.array([ex["is_real"] for ex in examples], bool),
    }
    with_masks = "masks" in examples[0]
    if with_masks:
        batch["masks"] = np.zeros((n, max_boxes, bh, bw), bool)
    truncated = 0
    for i, ex in enumerate(examples):
        h, w = sizes[i]
        batch["image"][i, :h, :w] = ex["image"]
        k = min(len(ex["labels"]), max_boxes)
        truncated += len(ex["labels"]) - k
        batch["labels"][i, :k] = ex["labels"][:k]
        batch["boxes"][i, :k] = ex["boxes"][:k]
        batch["valid"][i, :k] = True
        if with_masks:
            batch["masks"][i, :k, :h, :w] = ex["masks"][:k]
    batch[STATS_KEY] = {
        "examples": np.int64(int(batch["is_real"].sum())),
        "degenerate_boxes": np.int64(sum(ex["num_degenerate"] for ex in examples)),
        "truncated_boxes": np.int64(truncated),
        "bucket_overflows": np.int64(overflow),
        "skipped_files": tuple(name for ex in examples for name in ex["skipped_files"]),
        "overflow_images": tuple(
            f"{ex['name']} (h={h}, w={w})"
            for ex, (h, w) in zip(examples, sizes.tolist())
            if overflow and choose_bucket(buckets, h, w, step)[1]
        ),
    }
    return batch


def with_pixel_mask(batch: dict) -> dict:
    """The batch with `mask` bool [B, H, W]: True on each image's top-left `size` pixels."""
    height, width = batch["image"].shape[1:3]
    rows = np.arange(height)[None, :, None] < batch["size"][:, 0, None, None]
    cols = np.arange(width)[None, None, :] < batch["size"][:, 1, None, None]
    return dict(batch, mask=rows & cols)


def repad(batch: dict, shape: tuple[int, int]) -> dict:
    """The batch (without its mask) with `image`, and `masks` when present, padded (or
    trimmed of padding) to shape (H, W).

    Used to agree on one shape across hosts. Raises if real pixels would be cut off.
    """
    height, width = shape
    if batch["size"].size and (batch["size"][:, 0].max() > height or batch["size"][:, 1].max() > width):
        raise ValueError(f"cannot repad to {shape}: images up to {batch['size'].max(0)} (h, w)")
    out = dict(batch)
    out["image"] = _pad_axes(batch["image"], 1, height, width)
    if "masks" in batch:
        out["masks"] = _pad_axes(batch["masks"], 2, height, width)
    return out


def _pad_axes(array: np.ndarray, axis: int, height: int, width: int) -> np.ndarray:
    """`array` zero-padded or trimmed at the end of axes (axis, axis + 1) to (height, width)."""
    shape = list(array.shape)
    h, w = shape[axis : axis + 2]
    shape[axis : axis + 2] = height, width
    out = np.zeros(shape, array.dtype)
    keep = (slice(None),) * axis + (slice(min(h, height)), slice(min(w, width)))
    out[keep] = array[keep]
    return out
