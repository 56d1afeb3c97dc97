"""Mask-head predictions -> instance masks and panoptic segments, on host, one image at a time.

Inputs are numpy arrays fetched from the device: `pred_masks` logits [Q, h, w] on the padded
batch's stride-4 grid, `pred_logits` [Q, K + 1], the image's `size` (h, w before padding)
and `orig_size` (h, w of the original image).

- `instance_masks`: official DETR's `PostProcessSegm` (a binary mask per query, for segm AP).
- `panoptic_segmentation(..., method=...)`: one id map per image, by one of
  `PANOPTIC_METHODS`: "official" (DETR's `PostProcessPanoptic`, the paper's results) or
  "huggingface" (`DetrImageProcessor.post_process_panoptic_segmentation`, MaskFormer-style).
  Both keep the same queries (the most probable of all K + 1 classes is not "no object" and
  its probability is above a threshold) and read the masks through the same resampling, so
  they live together here.

Padding: official DETR interpolates the padded grid straight to the target size, which
stretches the batch's padding into the image (its `PostProcessSegm` avoids that only because
its batches are padded exactly to the largest image). Our batches are padded to buckets, so
every method here reads only the image's part of the grid: bilinear resampling of the grid
region [0, size / 4) as if the whole grid had been upsampled x4 to the padded size and then
cropped to `size` (neighbours beyond the region are still read from the grid, as in that
upsampling). The result does not depend on how far the image was padded.

Segment ids are 1..n, 0 = void (COCO panoptic convention); official DETR numbers its segments
0..n-1, Hugging Face 1..n with -1 everywhere when no query is kept.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image
from scipy.special import expit as sigmoid  # no overflow warning for large negative logits

from detr_jax.ops.nearest import nearest_indices
from detr_jax.data.panoptic_png import id_to_rgb

# `pred_masks` lies on the stride-4 grid of the padded input (the backbone's res2 stage).
MASK_STRIDE = 4


@dataclasses.dataclass
class PanopticSegmentation:
    """One image's panoptic segmentation.

    Attributes:
      id_map: int32 [H, W] at the original image size: segment id per pixel, 0 = void.
      segments_info: one dict per segment, ids ascending: {"id": 1..n, "category_id",
        "isthing": bool, "area": pixels in id_map}.
    """

    id_map: np.ndarray
    segments_info: list[dict]


# ---------------------------------------------------------------------------------------
# Resampling (the reference implementations' index and weight arithmetic, in numpy)


def _linear_taps(extent: float, in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 weights of torch's bilinear interpolation
    (align_corners=False) from the first `extent` cells of an axis of `in_size` cells to
    `out_size` pixels: source position scale * (i + 0.5) - 0.5 (clamped at 0) with
    scale = extent / out_size, float32 as in torch; the right neighbour is clamped to the
    axis, not to the extent."""
    scale = np.float32(extent) / np.float32(out_size)
    source = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    left = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    right = np.minimum(left + 1, in_size - 1)
    right_weight = np.clip(source - left, 0, 1).astype(np.float32)
    taps = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(taps, (rows, left), 1 - right_weight)
    np.add.at(taps, (rows, right), right_weight)
    return taps


def _region_taps(grid_shape: tuple[int, ...], size: tuple[int, int], out_size: tuple[int, int]):
    """(rows [H, h], cols [W, w]) bilinear weights from a [..., h, w] stride-4 grid's region
    covering the image of `size` (h, w in input pixels) to out_size (H, W)."""
    return (_linear_taps(size[0] / MASK_STRIDE, grid_shape[-2], out_size[0]),
            _linear_taps(size[1] / MASK_STRIDE, grid_shape[-1], out_size[1]))


def _resize_image_region(grid: np.ndarray, size: tuple[int, int], out_size: tuple[int, int]) -> np.ndarray:
    """[N, h, w] stride-4 grid -> float32 [N, H, W] (H, W = out_size): the region covering
    the image of `size` resized bilinearly (see the module docstring)."""
    rows, cols = _region_taps(grid.shape, size, out_size)
    return rows @ (grid.astype(np.float32) @ cols.T)


def _pil_nearest(in_size: int, out_size: int) -> np.ndarray:
    """Source index per output pixel of PIL's `resize(resample=NEAREST)`: pixel centres, the
    position accumulated step by step in float64 as Pillow does (cumsum adds in order), so
    exact ties land where Pillow's rounding puts them."""
    step = in_size / out_size
    position = np.cumsum(np.concatenate([[step * 0.5], np.full(out_size - 1, step)]))
    return np.minimum(position.astype(np.int64), in_size - 1)


# ---------------------------------------------------------------------------------------
# Shared steps


def _checked_sizes(mask_logits: np.ndarray, size, orig_size, class_logits: np.ndarray | None = None):
    """(size, orig_size) as (int, int) tuples, after checking the shapes of one image's inputs."""
    if mask_logits.ndim != 3:
        raise ValueError(f"mask logits must be [Q, h, w] (one image); got shape {mask_logits.shape}")
    if class_logits is not None and (class_logits.ndim != 2 or class_logits.shape[0] != mask_logits.shape[0]):
        raise ValueError(f"class logits must be [Q, K + 1] with the masks' Q = {mask_logits.shape[0]}; "
                         f"got shape {class_logits.shape}")
    size, orig_size = (int(size[0]), int(size[1])), (int(orig_size[0]), int(orig_size[1]))
    padded = (MASK_STRIDE * mask_logits.shape[1], MASK_STRIDE * mask_logits.shape[2])
    if not (0 < size[0] <= padded[0] and 0 < size[1] <= padded[1]):
        raise ValueError(f"image size {size} does not fit the padded size {padded} of the mask grid")
    if min(orig_size) <= 0:
        raise ValueError(f"orig_size must be positive; got {orig_size}")
    return size, orig_size


def _confident_queries(class_logits: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries whose most probable class of all K + 1 is not "no object" (the last) and whose
    probability is above `threshold`, as both references select them.

    Returns (indices int [n], scores float32 [n], labels int [n])."""
    logits = class_logits.astype(np.float32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    scores, labels = probs.max(-1), probs.argmax(-1)
    keep = np.flatnonzero((labels != class_logits.shape[-1] - 1) & (scores > threshold))
    return keep, scores[keep], labels[keep]


def _isthing(category_isthing: Mapping[int, bool], label: int) -> bool:
    """Whether `label` is a thing; a class `category_isthing` does not list (an unused id that
    a barely trained model predicts) counts as a thing, so it is never merged."""
    return bool(category_isthing.get(label, True))


def _segmentation(id_map: np.ndarray, categories: list[int], category_isthing: Mapping[int, bool]):
    """PanopticSegmentation of an id map whose segment i (1-based) has category categories[i - 1]."""
    areas = np.bincount(id_map.ravel(), minlength=len(categories) + 1)
    info = [
        {"id": i, "category_id": int(c), "isthing": _isthing(category_isthing, int(c)), "area": int(areas[i])}
        for i, c in enumerate(categories, start=1)
    ]
    return PanopticSegmentation(id_map.astype(np.int32), info)


# ---------------------------------------------------------------------------------------
# Instance masks


def instance_masks(mask_logits: np.ndarray, size, orig_size, threshold: float = 0.5) -> np.ndarray:
    """Official DETR's `PostProcessSegm`: one binary mask per query.

    The logits are upsampled bilinearly x4 (align_corners=False), thresholded after a sigmoid,
    cropped to `size` and resized (torch's "nearest") to `orig_size`. Official upsamples to
    the batch's largest image, which is its padded size; ours are padded to buckets, so this
    upsamples to the padded size before cropping: the same masks, independent of padding.
    Only the crop is computed.

    Args:
      mask_logits: [Q, h, w] logits on the padded image's stride-4 grid.
      size: (h, w) of the image before padding; orig_size: (H, W) of the original image.

    Returns:
      bool [Q, H, W].
    """
    mask_logits = np.asarray(mask_logits)
    size, orig_size = _checked_sizes(mask_logits, size, orig_size)
    rows, cols = _region_taps(mask_logits.shape, size, size)
    nearest_rows, nearest_cols = nearest_indices(size[0], orig_size[0]), nearest_indices(size[1], orig_size[1])
    masks = np.empty((mask_logits.shape[0], *orig_size), bool)
    for q, logits in enumerate(mask_logits.astype(np.float32)):  # one query at a time: full-size floats are large
        binary = sigmoid(rows @ (logits @ cols.T)) > threshold
        masks[q] = binary[nearest_rows][:, nearest_cols]
    return masks


# ---------------------------------------------------------------------------------------
# Panoptic: official DETR


def _official_id_map(masks: np.ndarray, orig_size, merge: np.ndarray | None) -> np.ndarray:
    """Official `get_ids_area`'s id map: per-pixel argmax over the queries' masks [n, h, w]
    (0-based query index; all 0 when n = 0), queries renamed by `merge`, resized as PIL's
    NEAREST to orig_size. int [H, W]."""
    if len(masks) == 0:
        return np.zeros(orig_size, np.int64)
    ids = masks.argmax(0)  # argmax of the logits = argmax of official's softmax over queries
    if merge is not None:
        ids = merge[ids]
    return ids[_pil_nearest(ids.shape[0], orig_size[0])][:, _pil_nearest(ids.shape[1], orig_size[1])]


def official_panoptic(class_logits: np.ndarray, mask_logits: np.ndarray, size, orig_size,
                      category_isthing: Mapping[int, bool], threshold: float = 0.85) -> PanopticSegmentation:
    """Official DETR's `PostProcessPanoptic`, quirks included.

    1. Keep the confident queries (see the module docstring), threshold 0.85.
    2. Their mask logits, resampled bilinearly to `size` (the image's part of the grid: the
       deliberate deviation described in the module docstring; official stretches the
       padded grid to `size`).
    3. Each pixel goes to the query with the largest logit; the stuff queries of one class
       all become the class's first such query; the map is resized NEAREST (as PIL) to
       `orig_size`.
    4. While a segment has an area <= 4 pixels, those queries are dropped and the map is
       recomputed from the rest, WITHOUT the stuff merge (as official): a dropped duplicate's
       pixels go to whichever remaining query has the largest logit there.

    Args:
      class_logits: [Q, K + 1] (last = "no object"); mask_logits: [Q, h, w] on the padded
        stride-4 grid; size: (h, w) before padding; orig_size: (H, W) of the output.
      category_isthing: {category id: True for things, False for stuff}.

    Returns:
      PanopticSegmentation; ids 1..n are official's 0..n-1 plus one; all void when no query
      is kept.
    """
    class_logits, mask_logits = np.asarray(class_logits), np.asarray(mask_logits)
    size, orig_size = _checked_sizes(mask_logits, size, orig_size, class_logits)
    keep, _, labels = _confident_queries(class_logits, threshold)
    masks = _resize_image_region(mask_logits[keep], size, size)
    merge = np.arange(len(keep))
    for label in {int(c) for c in labels if not _isthing(category_isthing, int(c))}:
        same = np.flatnonzero(labels == label)
        merge[same] = same[0]
    ids = _official_id_map(masks, orig_size, merge)
    areas = np.bincount(ids.ravel(), minlength=len(labels))[: len(labels)]
    while (small := areas <= 4).any():
        masks, labels = masks[~small], labels[~small]
        ids = _official_id_map(masks, orig_size, None)
        areas = np.bincount(ids.ravel(), minlength=len(labels))[: len(labels)]
    id_map = ids + 1 if len(labels) else ids  # with no query left every pixel is void
    return _segmentation(id_map, labels.tolist(), category_isthing)


# ---------------------------------------------------------------------------------------
# Panoptic: Hugging Face


def huggingface_panoptic(class_logits: np.ndarray, mask_logits: np.ndarray, size, orig_size,
                         category_isthing: Mapping[int, bool], threshold: float = 0.5, mask_threshold: float = 0.5,
                         overlap_mask_area_threshold: float = 0.8,
                         label_ids_to_fuse: set[int] | None = None) -> PanopticSegmentation:
    """Hugging Face's `DetrImageProcessor.post_process_panoptic_segmentation` (transformers 5).

    1. Keep the confident queries (see the module docstring), threshold 0.5.
    2. Their mask probabilities (sigmoid), resampled bilinearly straight to `orig_size` (the
       image's part of the grid; HF resizes the whole padded grid), times the query's score.
    3. Each pixel goes to the query with the largest product. A query becomes a segment if
       it owns pixels and owns more than `overlap_mask_area_threshold` of its "original
       area" (its products >= mask_threshold); pixels of rejected queries stay void.
    4. Segments of a class in `label_ids_to_fuse` share one id.

    Deliberate differences from HF: `label_ids_to_fuse` defaults to the stuff categories
    (HF: none); after reusing a fused class's id HF counts on from THAT id, so a later
    segment can get an id already taken by another (a bug), while new segments here always
    get the next unused id; a fused segment is listed once (HF lists it once per query);
    with no query kept the map is void (0; HF: -1).

    Args and returns as `official_panoptic`.
    """
    class_logits, mask_logits = np.asarray(class_logits), np.asarray(mask_logits)
    size, orig_size = _checked_sizes(mask_logits, size, orig_size, class_logits)
    if label_ids_to_fuse is None:
        label_ids_to_fuse = {c for c, thing in category_isthing.items() if not thing}
    keep, scores, labels = _confident_queries(class_logits, threshold)
    probs = _resize_image_region(sigmoid(mask_logits[keep].astype(np.float32)), size, orig_size)
    probs *= scores[:, None, None]
    owner = probs.argmax(0) if len(keep) else None
    id_map = np.zeros(orig_size, np.int64)
    categories: list[int] = []
    fused_ids: dict[int, int] = {}
    for k, label in enumerate(labels.tolist()):
        owned = owner == k
        area, original_area = int(owned.sum()), int((probs[k] >= mask_threshold).sum())
        # The ratio rounded to float32 (HF's torch division), compared in float64 (HF's .item()):
        # 4/5 passes a 0.8 threshold there, and so here.
        if area == 0 or original_area == 0:
            continue
        if not float(np.float32(area) / np.float32(original_area)) > overlap_mask_area_threshold:
            continue
        if label not in fused_ids:
            categories.append(label)
        segment_id = fused_ids.get(label, len(categories))
        id_map[owned] = segment_id
        if label in label_ids_to_fuse:
            fused_ids[label] = segment_id
    return _segmentation(id_map, categories, category_isthing)


PANOPTIC_METHODS: dict[str, Callable[..., PanopticSegmentation]] = {
    "official": official_panoptic,
    "huggingface": huggingface_panoptic,
}


def panoptic_segmentation(class_logits: np.ndarray, mask_logits: np.ndarray, size, orig_size,
                          category_isthing: Mapping[int, bool], method: str = "official",
                          **options) -> PanopticSegmentation:
    """One image's panoptic segmentation by `PANOPTIC_METHODS[method]`; `options` are that
    method's thresholds. Arguments and result as `official_panoptic`."""
    if method not in PANOPTIC_METHODS:
        raise ValueError(f"unknown panoptic post-processing method {method!r}; choose from {sorted(PANOPTIC_METHODS)}")
    return PANOPTIC_METHODS[method](class_logits, mask_logits, size, orig_size, category_isthing, **options)


# ---------------------------------------------------------------------------------------
# COCO panoptic format


def to_coco_panoptic(segmentation: PanopticSegmentation, image_id: int, file_name: str) -> tuple[bytes, dict]:
    """(PNG file bytes, annotation entry) of one image in the COCO panoptic format.

    The PNG holds the RGB-encoded id map; the entry is {"image_id", "file_name",
    "segments_info"} for the predictions JSON's "annotations" list (file_name: the PNG's
    name in the predictions folder).
    """
    with io.BytesIO() as out:
        Image.fromarray(id_to_rgb(segmentation.id_map)).save(out, format="PNG")
        png = out.getvalue()
    entry = {"image_id": int(image_id), "file_name": file_name,
             "segments_info": [dict(s) for s in segmentation.segments_info]}
    return png, entry
