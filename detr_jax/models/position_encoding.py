"""2-D positional encodings of a feature map: sine (DETR's default) and learned, RT-DETR's
fixed sin-cos grid (`sincos_2d`); and the sine embedding of normalized coordinates
(reference points, boxes) that the DETR family's decoders use.

A position encoding is any module `mask [B, h, w] bool -> [B, h, w, hidden_dim]`;
POSITION_EMBEDDINGS maps a name to its builder `(model_config, dtype) -> Module`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn


def sin_cos(p: jnp.ndarray) -> jnp.ndarray:
    """[..., F] angles -> [..., F]: the sine of the even channels and the cosine of the odd
    ones, interleaved (sin p0, cos p1, sin p2, ...), as the references write it."""
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(p.shape)


def sine_embedding(coords: jnp.ndarray, num_feats: int, temperature: float = 10000.0) -> jnp.ndarray:
    """The sine embedding of normalized reference coordinates (the references'
    `gen_sineembed_for_position`): coords [..., n] in [0, 1], (x, y) or (x, y, w, h) ->
    [..., n * num_feats] float32, each coordinate's angles c * 2 pi / temperature^(2 floor(i/2)
    / num_feats) through `sin_cos`, in the order (y, x, w, h) as DETR's image encoding
    puts y first."""
    dim_t = jnp.arange(num_feats, dtype=jnp.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    angles = coords.astype(jnp.float32)[..., None] * (2 * math.pi) / dim_t  # [..., n, F]
    order = [1, 0] + list(range(2, coords.shape[-1]))
    return jnp.concatenate([sin_cos(angles[..., i, :]) for i in order], axis=-1)


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """RT-DETR's fixed 2-D sin-cos encoding of a grid (Hugging Face's
    `build_2d_sinusoidal_position_embedding`, the hybrid encoder's AIFI): [height * width, dim]
    float32, positions row-major (as a feature map [h, w, E] flattens), channels
    [sin(y w_k) | cos(y w_k) | sin(x w_k) | cos(x w_k)] with integer cell coordinates (y, x)
    and w_k = temperature^(-k / (dim / 4)), computed in float64 and rounded once. No padding
    mask: the grid is the feature map's.

    For a square grid this is the official lyuwenyu/RT-DETR encoding; on a non-square one the
    official code's meshgrid order gives another assignment of positions (there the first
    half encodes k // h, the second k % h of position k), which transformers 5 replaced by
    this one."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos encoding needs a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    grid_y, grid_x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                                 indexing="ij")
    y, x = np.outer(grid_y.reshape(-1), omega), np.outer(grid_x.reshape(-1), omega)
    return np.concatenate([np.sin(y), np.cos(y), np.sin(x), np.cos(x)], axis=1).astype(np.float32)


class SinePositionEmbedding(nn.Module):
    """The sine/cosine encoding of "Attention is all you need", generalized to images.

    Positions are the cumulative count of real (unpadded) pixels along each axis, so a
    padded image gets exactly the encoding of the unpadded one at its real positions.
    With `normalize`, positions are divided by the real extent and multiplied by `scale`;
    `offset` is subtracted from them first (Deformable DETR's 0.5: the count of real pixels
    up to a pixel's centre rather than its far edge). Channels: the y encoding first, then
    x, each interleaving sin/cos.
    """

    num_pos_feats: int = 128
    temperature: float = 10000.0
    normalize: bool = True
    scale: float = 2 * math.pi
    offset: float = 0.0

    @nn.compact
    def __call__(self, mask: jnp.ndarray) -> jnp.ndarray:
        """mask: [B, h, w] bool (True = real) -> [B, h, w, 2 * num_pos_feats] float32."""
        real = mask.astype(jnp.float32)
        y_embed = jnp.cumsum(real, axis=1)
        x_embed = jnp.cumsum(real, axis=2)
        if self.normalize:
            eps = 1e-6
            y_last, x_last = y_embed[:, -1:, :], x_embed[:, :, -1:]
            if self.offset:
                y_embed, x_embed = y_embed - self.offset, x_embed - self.offset
            y_embed = y_embed / (y_last + eps) * self.scale
            x_embed = x_embed / (x_last + eps) * self.scale
        dim_t = jnp.arange(self.num_pos_feats, dtype=jnp.float32)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        return jnp.concatenate([sin_cos(pos_y), sin_cos(pos_x)], axis=-1)


class LearnedPositionEmbedding(nn.Module):
    """Absolute learned embeddings: a row table and a column table of `max_size` entries each.

    Channels: the x (column) embedding first, then y (row), as official DETR.
    The padding mask is ignored (as in the reference): positions are absolute.
    """

    num_pos_feats: int = 128
    max_size: int = 50

    @nn.compact
    def __call__(self, mask: jnp.ndarray) -> jnp.ndarray:
        """mask: [B, h, w] bool -> [B, h, w, 2 * num_pos_feats] float32."""
        batch, h, w = mask.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"learned position embedding covers at most {self.max_size}x{self.max_size} "
                f"feature positions, got a {h}x{w} feature map; use smaller images or "
                "model.position_embedding='sine'"
            )
        init = nn.initializers.uniform(1.0)  # torch.nn.init.uniform_: U[0, 1)
        row_embed = self.param("row_embed", init, (self.max_size, self.num_pos_feats))
        col_embed = self.param("col_embed", init, (self.max_size, self.num_pos_feats))
        x_emb = jnp.broadcast_to(col_embed[None, :w, :], (h, w, self.num_pos_feats))
        y_emb = jnp.broadcast_to(row_embed[:h, None, :], (h, w, self.num_pos_feats))
        pos = jnp.concatenate([x_emb, y_emb], axis=-1)
        return jnp.broadcast_to(pos[None], (batch, h, w, 2 * self.num_pos_feats))


def build_sine(model_config, dtype: Any) -> SinePositionEmbedding:
    del dtype  # computed in float32; the transformer casts
    return SinePositionEmbedding(num_pos_feats=model_config.hidden_dim // 2)


def build_learned(model_config, dtype: Any) -> LearnedPositionEmbedding:
    del dtype  # float32 parameters
    return LearnedPositionEmbedding(num_pos_feats=model_config.hidden_dim // 2)


# model.position_embedding -> builder (model_config, dtype) -> module
POSITION_EMBEDDINGS: dict[str, Callable[[Any, Any], nn.Module]] = {"sine": build_sine, "learned": build_learned}
