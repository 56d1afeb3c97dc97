"""Instance masks <-> COCO run-length encodings (pycocotools), as COCO JSON holds them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils


def encode_masks(masks: np.ndarray) -> list[dict]:
    """bool [N, H, W] -> N COCO RLEs ({"size": [H, W], "counts": str}, JSON-ready)."""
    masks = np.asarray(masks, np.uint8)
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # pycocotools wants [H, W, N], Fortran
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def decode_masks(rles: Sequence[dict]) -> np.ndarray:
    """The inverse of `encode_masks`: N RLEs of one size -> bool [N, H, W]."""
    if not rles:
        raise ValueError("decode_masks needs at least one RLE (it takes the size from them)")
    return mask_utils.decode([dict(rle) for rle in rles]).transpose(2, 0, 1).astype(bool)
