"""Necks: the backbone's output -> feature levels for the encoder, and their flat view.

A neck is a module `(BackboneOutput) -> FeatureLevels`: one or more levels [B, h_l, w_l, E]
with their masks. The detector adds each level's position encoding and hands the encoder
the flat view (`flatten_levels`): every level's positions in one sequence, with the static
`spatial_shapes` and `level_start_index` that multi-scale attention indexes by, and the
per-image `valid_ratios` of each level. A neck is called with the backbone's output and
the pixel mask [B, H, W] (the masks of levels the backbone did not make are resized from
it). DETR's `input_proj` (a 1x1 convolution of the last stage) is the one-level neck;
`ChannelMapper` (Deformable DETR's `input_proj`) the multi-level one. NECKS maps
`model.neck` to builders `(model_config, dtype) -> module constructor`: the detector
instantiates the neck under the name its parameters have always had (DETR: "input_proj"),
so checkpoints keep their paths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import linen as nn

from detr_jax.models.resnet import BackboneOutput, PointwiseConv, downsample_mask, pointwise
from detr_jax.models.transformer import torch_linear_bias_init, torch_linear_kernel_init, xavier_uniform


class FeatureLevels(NamedTuple):
    """What a neck returns. features: per level [B, h_l, w_l, E]; masks: per level
    [B, h_l, w_l] bool (True = a position on the image, not padding)."""

    features: tuple[jnp.ndarray, ...]
    masks: tuple[jnp.ndarray, ...]


class FlatLevels(NamedTuple):
    """Every level's positions in one sequence (levels in order, each row-major).

    src [B, S, E], mask [B, S] bool, pos [B, S, E] (or None) with S = sum of h_l * w_l;
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


def flatten_levels(levels: FeatureLevels, pos: tuple[jnp.ndarray, ...] | None = None) -> FlatLevels:
    """The flat view of `levels`, with `pos` the position encoding of each level [B, h_l, w_l, E]
    (None: the levels have none, as RT-DETR's decoder input; FlatLevels.pos is None)."""
    shapes = tuple((f.shape[1], f.shape[2]) for f in levels.features)
    starts = tuple(int(sum(h * w for h, w in shapes[:i])) for i in range(len(shapes)))

    def flat(maps):
        rows = [m.reshape(m.shape[0], m.shape[1] * m.shape[2], *m.shape[3:]) for m in maps]
        return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)

    return FlatLevels(src=flat(levels.features), mask=flat(levels.masks), pos=None if pos is None else flat(pos),
                      spatial_shapes=shapes, level_start_index=starts,
                      valid_ratios=jnp.stack([valid_ratio(m) for m in levels.masks], 1))


class InputProjection(nn.Module):
    """DETR's `input_proj`, the one-level neck: a 1x1 convolution (with PyTorch's Conv2d
    init) of the backbone's features [B, h, w, C] to [B, h, w, hidden_dim]; parameters
    {"kernel": [1, 1, C, E], "bias": [E]}, as nn.Conv's."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, backbone_out: BackboneOutput, pixel_mask: jnp.ndarray | None = None) -> FeatureLevels:
        """pixel_mask: unused (the level's mask is the backbone's)."""
        del pixel_mask
        in_channels = backbone_out.features.shape[-1]
        kernel = self.param("kernel", torch_linear_kernel_init, (1, 1, in_channels, self.hidden_dim))
        bias = self.param("bias", torch_linear_bias_init(in_channels), (self.hidden_dim,))
        src = pointwise(backbone_out.features, kernel, self.dtype) + bias.astype(self.dtype)
        return FeatureLevels((src,), (backbone_out.mask,))


class ChannelMapper(nn.Module):
    """Deformable DETR's multi-scale `input_proj` (detrex's ChannelMapper): `num_levels`
    levels of width hidden_dim from the backbone's `in_stages` (named stages of
    `BackboneOutput.stages`; a ResNet's res3..res5, strides 8 to 32).

    Each stage used, the last `num_levels` of them when there are more, goes through a 1x1
    convolution (conv{l}) and GroupNorm with 32 groups (norm{l}); the levels beyond the
    stages are made by a 3x3 stride-2 convolution (padding 1) + GroupNorm, the first from
    the last stage's raw output, the others from the previous level (as the references).
    Every level's mask is the pixel mask resized to it by nearest neighbour (Hugging Face's
    `F.interpolate(pixel_mask[None].float(), size).bool()`; official Deformable DETR's,
    which resizes the padding mask, is the same), so that the mask of a stage need not come
    from the backbone. Initialized as the references: convolutions xavier-uniform with zero
    bias, GroupNorm scale 1 and bias 0. Parameters conv{l} {kernel [k, k, C, E], bias [E]},
    norm{l} {scale [E], bias [E]} (Hugging Face's `model.input_proj.{l}.0` and `.1`).
    """

    hidden_dim: int
    num_levels: int = 4
    in_stages: tuple[str, ...] = ("res3", "res4", "res5")
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, backbone_out: BackboneOutput, pixel_mask: jnp.ndarray) -> FeatureLevels:
        """backbone_out: its `stages` must hold `in_stages` ([B, h_s, w_s, C_s]); pixel_mask
        [B, H, W] bool (True = real pixel). Returns `num_levels` levels [B, h_l, w_l, E]
        in the compute dtype, finest first, with their masks."""
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be at least 1, got {self.num_levels}")
        missing = [s for s in self.in_stages if s not in backbone_out.stages]
        if missing:
            raise ValueError(f"the backbone has no stage(s) {missing} (it has {sorted(backbone_out.stages)})")
        stages = [backbone_out.stages[s] for s in self.in_stages][-self.num_levels:]

        def norm(level):
            # Two-pass variance (PyTorch's GroupNorm), not E[x^2] - E[x]^2: with one channel
            # per group the fast formula loses the digits parity needs.
            return nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                                name=f"norm{level}")

        features = []
        for level, stage in enumerate(stages):
            conv = PointwiseConv(self.hidden_dim, use_bias=True, kernel_init=xavier_uniform, dtype=self.dtype,
                                 name=f"conv{level}")
            features.append(norm(level)(conv(stage)))
        source = stages[-1]
        for level in range(len(stages), self.num_levels):
            conv = nn.Conv(self.hidden_dim, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                           kernel_init=xavier_uniform, dtype=self.dtype, name=f"conv{level}")
            features.append(norm(level)(conv(source)))
            source = features[-1]
        masks = tuple(downsample_mask(pixel_mask, f.shape[1], f.shape[2]) for f in features)
        return FeatureLevels(tuple(features), masks)


def build_channel_mapper(model_config, dtype: Any) -> Callable[..., nn.Module]:
    """ChannelMapper of width model.hidden_dim with model.neck_args (in_stages; num_levels,
    unless the detector sets it: Deformable DETR's model.transformer_args
    num_feature_levels does)."""
    return functools.partial(ChannelMapper, model_config.hidden_dim, dtype=dtype, **model_config.neck_args)


# model.neck -> builder (model_config, dtype) -> module constructor (called with the
# detector's name for it); its settings come from model.neck_args.
NECKS: dict[str, Callable[[Any, Any], Callable[..., nn.Module]]] = {
    "input_proj": lambda m, dtype: functools.partial(InputProjection, m.hidden_dim, dtype=dtype, **m.neck_args),
    "channel_mapper": build_channel_mapper,
}
