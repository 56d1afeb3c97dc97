"""Box format conversions, areas, IoU and generalized IoU.

Formats:
  cxcywh: (center x, center y, width, height), what the model predicts and targets hold
          (normalized to [0, 1] by the unpadded image size).
  xyxy:   (x0, y0, x1, y1), corners; what IoU is computed on.

Every function takes arrays with any number of leading dimensions (the last one is the 4
box coordinates); "pairwise" functions compare every box of one set with every box of
the other ([..., N, 4] x [..., M, 4] -> [..., N, M], leading dims broadcast), "paired"
functions compare boxes position by position ([..., 4] x [..., 4] -> [...]).

Degenerate boxes (zero or negative width/height, single points) are legal inputs: an
extent below zero counts as zero (an empty box), and every division is guarded, so the
results and their gradients are finite. Official DETR asserts valid boxes instead; for
valid boxes (x1 >= x0, y1 >= y0, non-empty union) the values are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Smallest union / enclosing area used as a divisor. Real normalized boxes are larger (one
# pixel of a 1333x1333 image has area 5.6e-7), so their values are exact; for degenerate
# boxes it bounds the gradients (1 / _MIN_AREA) where a smaller value would let them explode.
_MIN_AREA = 1e-7


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) * 0.5, (y0 + y1) * 0.5, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """[..., 4] xyxy -> [...] area; a negative width or height counts as zero."""
    return _area(*_corners(boxes))


def _corners(boxes: jax.Array) -> tuple[jax.Array, ...]:
    """[..., 4] -> four [...] arrays. Pairwise terms are computed on these separate
    coordinate arrays: ops on [..., N, M, 4] intermediates were ~10x slower on XLA CPU."""
    return tuple(boxes[..., i] for i in range(4))


def _area(x0, y0, x1, y1):
    return jnp.maximum(x1 - x0, 0.0) * jnp.maximum(y1 - y0, 0.0)


def _iou_union_enclosure(a: tuple, b: tuple):
    """IoU, union and enclosing-box area of corner tuples `a` and `b` (they broadcast)."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    inter = _area(
        jnp.maximum(ax0, bx0), jnp.maximum(ay0, by0), jnp.minimum(ax1, bx1), jnp.minimum(ay1, by1)
    )
    union = _area(*a) + _area(*b) - inter
    iou = inter / jnp.maximum(union, _MIN_AREA)
    enclosure = _area(
        jnp.minimum(ax0, bx0), jnp.minimum(ay0, by0), jnp.maximum(ax1, bx1), jnp.maximum(ay1, by1)
    )
    return iou, union, enclosure


def _giou_from_terms(iou, union, enclosure):
    return iou - (enclosure - union) / jnp.maximum(enclosure, _MIN_AREA)


def _pairwise_corners(boxes1, boxes2):
    """Corner tuples of [..., N, 4] and [..., M, 4] shaped to broadcast to [..., N, M]."""
    a = tuple(c[..., :, None] for c in _corners(boxes1))
    b = tuple(c[..., None, :] for c in _corners(boxes2))
    return a, b


def paired_iou(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """IoU and union of boxes at matching positions.

    Args:
      boxes1, boxes2: [..., 4] xyxy; leading dims broadcast against each other.
    Returns:
      (iou, union), each [...]; iou in [0, 1], 0 where the union is empty.
    """
    iou, union, _ = _iou_union_enclosure(_corners(boxes1), _corners(boxes2))
    return iou, union


def paired_generalized_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Generalized IoU (Rezatofighi et al. 2019) of boxes at matching positions.

    Args:
      boxes1, boxes2: [..., 4] xyxy; leading dims broadcast against each other.
    Returns:
      [...] GIoU in [-1, 1].
    """
    return _giou_from_terms(*_iou_union_enclosure(_corners(boxes1), _corners(boxes2)))


def pairwise_iou(boxes1: jax.Array, boxes2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """IoU and union of every box of `boxes1` with every box of `boxes2`.

    Args:
      boxes1: [..., N, 4] xyxy.
      boxes2: [..., M, 4] xyxy; leading dims broadcast with those of boxes1.
    Returns:
      (iou, union), each [..., N, M].
    """
    iou, union, _ = _iou_union_enclosure(*_pairwise_corners(boxes1, boxes2))
    return iou, union


def pairwise_generalized_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Generalized IoU of every box of `boxes1` with every box of `boxes2`.

    Args:
      boxes1: [..., N, 4] xyxy.
      boxes2: [..., M, 4] xyxy; leading dims broadcast with those of boxes1.
    Returns:
      [..., N, M] GIoU in [-1, 1].
    """
    return _giou_from_terms(*_iou_union_enclosure(*_pairwise_corners(boxes1, boxes2)))
