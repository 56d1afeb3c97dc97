"""Necks: the backbone's output -> feature levels for the encoder, and their flat view.

A neck is a module `(BackboneOutput) -> FeatureLevels`: one or more levels [B, h_l, w_l, E]
with their masks. The detector adds each level's position encoding and hands the encoder
the flat view (`flatten_levels`): every level's positions in one sequence, with the static
`spatial_shapes` and `level_start_index` that multi-scale attention indexes by, and the
per-image `valid_ratios` of each level. DETR's `input_proj` (a 1x1 convolution of the last
stage) is the one-level neck. NECKS maps `model.neck` to builders `(model_config, dtype)
-> module constructor`: the detector instantiates the neck under the name its parameters
have always had (DETR: "input_proj"), so checkpoints keep their paths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import linen as nn

from detr_jax.models.resnet import BackboneOutput, pointwise
from detr_jax.models.transformer import torch_linear_bias_init, torch_linear_kernel_init


class FeatureLevels(NamedTuple):
    """What a neck returns. features: per level [B, h_l, w_l, E]; masks: per level
    [B, h_l, w_l] bool (True = a position on the image, not padding)."""

    features: tuple[jnp.ndarray, ...]
    masks: tuple[jnp.ndarray, ...]


class FlatLevels(NamedTuple):
    """Every level's positions in one sequence (levels in order, each row-major).

    src [B, S, E], mask [B, S] bool, pos [B, S, E] with S = sum of h_l * w_l;
    spatial_shapes: ((h_l, w_l), ...) and level_start_index: (offset of level l in S, ...),
    both static; valid_ratios [B, L, 2] float32: the (width, height) fraction of each level
    that lies on the image (Deformable DETR's `get_valid_ratio`).
    """

    src: jnp.ndarray
    mask: jnp.ndarray
    pos: jnp.ndarray
    spatial_shapes: tuple[tuple[int, int], ...]
    level_start_index: tuple[int, ...]
    valid_ratios: jnp.ndarray


def valid_ratio(mask: jnp.ndarray) -> jnp.ndarray:
    """mask [B, h, w] (bottom/right padding) -> [B, 2]: (valid width / w, valid height / h)."""
    height, width = mask.shape[1:]
    valid_h = mask[:, :, 0].sum(1).astype(jnp.float32)
    valid_w = mask[:, 0, :].sum(1).astype(jnp.float32)
    return jnp.stack([valid_w / width, valid_h / height], axis=-1)


def flatten_levels(levels: FeatureLevels, pos: tuple[jnp.ndarray, ...]) -> FlatLevels:
    """The flat view of `levels`, with `pos` the position encoding of each level [B, h_l, w_l, E]."""
    shapes = tuple((f.shape[1], f.shape[2]) for f in levels.features)
    starts = tuple(int(sum(h * w for h, w in shapes[:i])) for i in range(len(shapes)))

    def flat(maps):
        rows = [m.reshape(m.shape[0], m.shape[1] * m.shape[2], *m.shape[3:]) for m in maps]
        return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)

    return FlatLevels(src=flat(levels.features), mask=flat(levels.masks), pos=flat(pos), spatial_shapes=shapes,
                      level_start_index=starts, valid_ratios=jnp.stack([valid_ratio(m) for m in levels.masks], 1))


class InputProjection(nn.Module):
    """DETR's `input_proj`, the one-level neck: a 1x1 convolution (with PyTorch's Conv2d
    init) of the backbone's features [B, h, w, C] to [B, h, w, hidden_dim]; parameters
    {"kernel": [1, 1, C, E], "bias": [E]}, as nn.Conv's."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, backbone_out: BackboneOutput) -> FeatureLevels:
        in_channels = backbone_out.features.shape[-1]
        kernel = self.param("kernel", torch_linear_kernel_init, (1, 1, in_channels, self.hidden_dim))
        bias = self.param("bias", torch_linear_bias_init(in_channels), (self.hidden_dim,))
        src = pointwise(backbone_out.features, kernel, self.dtype) + bias.astype(self.dtype)
        return FeatureLevels((src,), (backbone_out.mask,))


# model.neck -> builder (model_config, dtype) -> module constructor (called with the
# detector's name for it); its settings come from model.neck_args.
NECKS: dict[str, Callable[[Any, Any], Callable[..., nn.Module]]] = {
    "input_proj": lambda m, dtype: functools.partial(InputProjection, m.hidden_dim, dtype=dtype, **m.neck_args),
}
