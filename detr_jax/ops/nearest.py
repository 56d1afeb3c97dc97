"""PyTorch's nearest-neighbour resampling rule (`F.interpolate(mode="nearest")`), which
official DETR uses for padding masks, target masks and predicted instance masks."""

from __future__ import annotations

import numpy as np


def nearest_indices(in_size, out_size, xp=np):
    """Source index of each of `out_size` output pixels along an axis of `in_size` pixels:
    min(floor(i * in / out), in - 1), with PyTorch's float32 scale, so results are
    identical to the reference. `xp`: numpy, or jax.numpy for symbolic sizes (an export
    with a dynamic image size)."""
    scale = xp.asarray(in_size, xp.float32) / xp.asarray(out_size, xp.float32)
    src = xp.floor(xp.arange(out_size, dtype=xp.float32) * scale).astype(int)
    return xp.minimum(src, in_size - 1)
