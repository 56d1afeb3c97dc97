"""Conditional DETR's decoder parts, shared by Conditional DETR and DAB-DETR.

Conditional cross-attention (Meng et al., "Conditional DETR for Fast Training
Convergence", 2021) splits each attention head's query and key into a content half and a
position half and concatenates them, so the dot product is content.content +
position.position: the queries' position half is the sine embedding of a reference point
(a 2-d point in Conditional DETR, a 4-d anchor box in DAB-DETR) transformed by the
decoder state; the keys' is the image position encoding. The self-attention projects
content and query position separately and adds them. Only the first layer (or every layer
with `use_query_pos`) also adds the query position to the cross-attention's content query
and the key position to its content key, as DETR does.

As in the references, every layer is post-norm (no pre-norm variant) and the layers'
inputs are the raw outputs of the previous layer; the decoder's LayerNorm makes the
normalized copies the heads read.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from detr_jax.models.detr import MLP
from detr_jax.models.queries import QueryState
from detr_jax.models.position_encoding import sine_embedding
from detr_jax.models.transformer import FeedForward, attend, layer_norm, torch_dense, xavier_uniform


def inverse_sigmoid(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    """The references' log(x / (1 - x)), with x clipped to [0, 1] and both terms to >= eps."""
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
    """A projection initialized as the references' transformers (xavier-uniform kernel)."""
    return torch_dense(features, features, name, dtype, xavier_uniform)


class ConditionalSelfAttention(nn.Module):
    """Self-attention over queries with separate content and position projections:
    q = q_content(x) + q_pos(query_pos), k = k_content(x) + k_pos(query_pos), v = v(x).

    Parameters: q_content_proj, q_pos_proj, k_content_proj, k_pos_proj, v_proj, out_proj.
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, query_pos: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        """x, query_pos: [B, Q, E] -> [B, Q, E]."""
        embed = x.shape[-1]
        head_dim = embed // self.num_heads

        def heads(name_content, name_pos, input_pos):  # -> [B, Q, H, D]
            y = _dense(embed, name_content, self.dtype)(x)
            if name_pos is not None:
                y = y + _dense(embed, name_pos, self.dtype)(input_pos)
            return y.reshape(y.shape[:-1] + (self.num_heads, head_dim))

        q = heads("q_content_proj", "q_pos_proj", query_pos) * jnp.asarray(head_dim**-0.5, self.dtype)
        k = heads("k_content_proj", "k_pos_proj", query_pos)
        v = heads("v_proj", None, None)
        out = attend(self, q, k, v, None, self.dropout, deterministic)
        return _dense(embed, "out_proj", self.dtype)(out)


class ConditionalCrossAttention(nn.Module):
    """Conditional cross-attention: each head's query is [content | position] with content
    q_content(x) (+ q_pos(query_pos) with `use_query_pos`) and position
    q_pos_sine(query_sine_embed); each head's key is [k_content(memory) (+ k_pos(pos) with
    `use_query_pos`) | k_pos(pos)]; values v(memory). Heads are 2 E / H wide for q and k
    (scaled by (2 E / H)^-0.5), E / H for values.

    Parameters: q_content_proj, q_pos_proj (only with use_query_pos), k_content_proj,
    k_pos_proj, v_proj, q_pos_sine_proj, out_proj.
    """

    num_heads: int
    use_query_pos: bool
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, memory, pos, query_pos, query_sine_embed, memory_mask, deterministic: bool = True):
        """x, query_pos, query_sine_embed: [B, Q, E]; memory, pos: [B, S, E]; memory_mask:
        [B, S] bool (True = real). Returns [B, Q, E]."""
        embed = x.shape[-1]
        head_dim = embed // self.num_heads

        def split(y):  # [B, L, E] -> [B, L, H, E / H]
            return y.reshape(y.shape[:-1] + (self.num_heads, head_dim))

        q = _dense(embed, "q_content_proj", self.dtype)(x)
        k = _dense(embed, "k_content_proj", self.dtype)(memory)
        v = _dense(embed, "v_proj", self.dtype)(memory)
        k_pos = _dense(embed, "k_pos_proj", self.dtype)(pos)
        if self.use_query_pos:
            q = q + _dense(embed, "q_pos_proj", self.dtype)(query_pos)
            k = k + k_pos
        q_pos = _dense(embed, "q_pos_sine_proj", self.dtype)(query_sine_embed)
        q = jnp.concatenate([split(q), split(q_pos)], axis=-1) * jnp.asarray((2 * head_dim) ** -0.5, self.dtype)
        k = jnp.concatenate([split(k), split(k_pos)], axis=-1)
        out = attend(self, q, k, split(v), memory_mask, self.dropout, deterministic)
        return _dense(embed, "out_proj", self.dtype)(out)


class ConditionalDecoderLayer(nn.Module):
    """Conditional self-attention, conditional cross-attention, FFN (with a PReLU:
    `prelu`); each with dropout, a residual and a post-norm (norm1, norm2, norm3)."""

    num_heads: int
    dim_feedforward: int
    dropout: float
    use_query_pos: bool
    dtype: Any = jnp.float32
    prelu: bool = False

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, query_sine_embed, memory_mask, deterministic: bool = True):
        """tgt, query_pos, query_sine_embed: [B, Q, E]; memory, pos: [B, S, E]; memory_mask:
        [B, S] bool. Returns [B, Q, E]."""
        drop = nn.Dropout(self.dropout)
        self_attn = ConditionalSelfAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")
        tgt = layer_norm("norm1", self.dtype)(
            tgt + drop(self_attn(tgt, query_pos, deterministic), deterministic=deterministic))
        cross_attn = ConditionalCrossAttention(self.num_heads, self.use_query_pos, self.dropout, self.dtype,
                                               name="cross_attn")
        attended = cross_attn(tgt, memory, pos, query_pos, query_sine_embed, memory_mask, deterministic)
        tgt = layer_norm("norm2", self.dtype)(tgt + drop(attended, deterministic=deterministic))
        ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, self.prelu, name="ffn")
        return layer_norm("norm3", self.dtype)(tgt + drop(ffn(tgt, deterministic), deterministic=deterministic))


class ConditionalDecoder(nn.Module):
    """Conditional DETR's decoder: 2-d reference points from the query position embeddings
    (ref_point_head, an MLP, then a sigmoid); the query position of each layer's
    cross-attention is the sine embedding of the reference point, multiplied element-wise by
    query_scale(the previous layer's raw output) from the second layer on (by 1 in the
    first). Contents start from the queries' (zeros for the learned queries).

    Parameters: layer{i} (ConditionalDecoderLayer, the first with q_pos_proj), norm (the
    final LayerNorm), query_scale and ref_point_head (2-layer MLPs).
    """

    num_layers: int
    num_heads: int
    dim_feedforward: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, memory, pos, memory_mask, queries: QueryState, deterministic: bool = True):
        """memory, pos: [B, S, E]; memory_mask: [B, S] bool (True = real); queries: content
        [B, Q, E] and position [B, Q, E] (`queries.LearnedQueries`).

        Returns (states [L, B, Q, E] each layer's output through the final LayerNorm, in the
        compute dtype; reference points [B, Q, 2] normalized (x, y), float32).
        """
        query_pos = queries.position
        embed = query_pos.shape[-1]
        reference = jax.nn.sigmoid(
            MLP(embed, 2, 2, self.dtype, name="ref_point_head")(query_pos).astype(jnp.float32))
        sine = sine_embedding(reference, embed // 2).astype(self.dtype)
        query_scale = MLP(embed, embed, 2, self.dtype, name="query_scale")
        norm = layer_norm("norm", self.dtype)
        tgt = queries.content
        states = []
        for i in range(self.num_layers):
            query_sine_embed = sine if i == 0 else sine * query_scale(tgt)
            layer = ConditionalDecoderLayer(self.num_heads, self.dim_feedforward, self.dropout,
                                            use_query_pos=i == 0, dtype=self.dtype, name=f"layer{i}")
            tgt = layer(tgt, memory, pos, query_pos, query_sine_embed, memory_mask, deterministic)
            states.append(norm(tgt))
        return jnp.stack(states), reference
