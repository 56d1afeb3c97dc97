"""COCO panoptic PNGs' id encoding: each pixel's RGB holds its segment id,
id = R + 256 G + 256^2 B (panopticapi's rgb2id / id2rgb); 0 is void."""

from __future__ import annotations

import numpy as np

MAX_SEGMENT_ID = 256**3 - 1  # the largest id an RGB pixel holds


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids of a panoptic PNG: uint8 [..., 3] RGB -> uint32 [...]."""
    rgb = np.asarray(rgb, np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_id`: integer ids [...] in 0..MAX_SEGMENT_ID -> uint8 [..., 3]."""
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must lie in [0, 256^3) for an RGB PNG; got {ids.min()}..{ids.max()}")
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)
