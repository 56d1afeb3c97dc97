"""Deformable DETR's transformer parts (Zhu et al., "Deformable DETR", 2021), for Deformable
DETR and the members built on it (DINO, RT-DETR's decoder).

The encoder refines the flat multi-scale levels (`neck.flatten_levels`) with multi-scale
deformable self-attention (`deformable_attention.MultiScaleDeformableAttention`): each
position attends to a few sampled points around itself on every level. The decoder's
layers are self-attention over the queries, deformable cross-attention around each
query's reference (a point or a box) and an FFN. Box refinement runs a box head inside
every layer: its boxes are the next layer's references, detached (DESIGN.md, "The decoder
refines").

DINO's decoder is the same decoder with three switches (`DeformableDecoder`, which lists
RT-DETR's and RT-DETRv2's too):
`position_from_reference` (each layer's query position is `ref_point_head`, an MLP, of the
sine embedding of its reference box: DINO's mixed query selection gives the queries no
learned position), `final_norm` (a LayerNorm `norm` on every layer's output before the
heads) and `look_forward_twice` (each layer's boxes are refined from the un-detached
boxes of the layer before, so their loss trains that layer's box head too; the next
layer still reads them detached). A self-attention mask between the queries (denoising
groups) is honoured.

As the references: post-norm layers, ReLU FFNs; the decoder has no final LayerNorm (its
layers' outputs go to the heads as they are). References are normalized over the padded
map; before each attention they are scaled by the valid ratios of every level
(`neck.FlatLevels.valid_ratios`), so that a point on the image lands on the same image
point on every level whatever the padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from detr_jax.models.conditional_decoder import inverse_sigmoid
from detr_jax.models.deformable_attention import MultiScaleDeformableAttention
from detr_jax.models.detr import MLP
from detr_jax.models.position_encoding import sine_embedding
from detr_jax.models.queries import QueryState
from detr_jax.models.transformer import FeedForward, MultiHeadAttention, layer_norm


# How a decoder derives its query positions from the reference boxes (`DeformableDecoder`).
POSITION_HEADS = ("sine", "box")


def encoder_reference_points(spatial_shapes: tuple[tuple[int, int], ...], valid_ratios: jnp.ndarray) -> jnp.ndarray:
    """The encoder's reference points: every position's pixel centre, normalized by the
    image's real extent on its own level, then scaled by each level's valid ratio (the
    references' `get_reference_points`, in their order of operations).

    spatial_shapes: ((h_l, w_l), ...) static; valid_ratios: [B, L, 2] (width, height)
    fractions. Returns [B, S, L, 2] float32 normalized (x, y) on each level's padded map.
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes):
        ref_y, ref_x = np.meshgrid(np.arange(height, dtype=np.float32) + np.float32(0.5),
                                   np.arange(width, dtype=np.float32) + np.float32(0.5), indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(jnp.stack([ref_x, ref_y], -1))
    return jnp.concatenate(points, 1)[:, :, None] * valid_ratios[:, None]


def scale_references(reference: jnp.ndarray, valid_ratios: jnp.ndarray) -> jnp.ndarray:
    """A query's reference on every level: reference [B, Q, 2] (x, y) or [B, Q, 4] (cx, cy,
    w, h), normalized over the image; valid_ratios [B, L, 2] -> [B, Q, L, 2 or 4], every
    coordinate scaled by its axis's valid ratio."""
    ratios = valid_ratios if reference.shape[-1] == 2 else jnp.concatenate([valid_ratios, valid_ratios], -1)
    return reference[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention (self_attn, the position encoding added to the query) and an
    FFN, each with dropout, a residual and a post-norm (norm1, norm2)."""

    num_heads: int
    dim_feedforward: int
    dropout: float = 0.0
    num_levels: int = 4
    num_points: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, src, pos, reference_points, spatial_shapes, mask, deterministic: bool = True):
        """src, pos: [B, S, E]; reference_points [B, S, L, 2]; mask [B, S] bool (True = real).
        Returns [B, S, E]."""
        drop = nn.Dropout(self.dropout)
        attention = MultiScaleDeformableAttention(src.shape[-1], self.num_heads, self.num_levels, self.num_points,
                                                  dtype=self.dtype, name="self_attn")
        attended = attention(src, reference_points, src, spatial_shapes, mask, query_pos=pos)
        src = layer_norm("norm1", self.dtype)(src + drop(attended, deterministic=deterministic))
        ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
        return layer_norm("norm2", self.dtype)(src + drop(ffn(src, deterministic), deterministic=deterministic))


class DeformableEncoder(nn.Module):
    """`num_layers` DeformableEncoderLayers (layer{i}) over the flat levels, each position
    referring to its own pixel centre (`encoder_reference_points`)."""

    num_layers: int
    num_heads: int
    dim_feedforward: int
    dropout: float = 0.0
    num_points: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, src, pos, mask, spatial_shapes, valid_ratios, deterministic: bool = True):
        """src, pos: [B, S, E] the flat levels and their position (+ level) encodings; mask
        [B, S] bool (True = real); spatial_shapes ((h_l, w_l), ...) static; valid_ratios
        [B, L, 2]. Returns the memory [B, S, E]."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for i in range(self.num_layers):
            layer = DeformableEncoderLayer(self.num_heads, self.dim_feedforward, self.dropout, len(spatial_shapes),
                                           self.num_points, self.dtype, name=f"layer{i}")
            src = layer(src, pos, reference_points, spatial_shapes, mask, deterministic)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention over the queries (self_attn, the query position added to queries and
    keys), deformable cross-attention to the memory around the query's reference
    (cross_attn, the query position added to the query; num_points, offset_scale and
    sampling are its settings, `MultiScaleDeformableAttention`), FFN; each with dropout, a
    residual and a post-norm (norm1, norm2, norm3)."""

    num_heads: int
    dim_feedforward: int
    dropout: float = 0.0
    num_levels: int = 4
    num_points: int | tuple[int, ...] = 4
    offset_scale: float = 0.5
    sampling: str = "bilinear"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tgt, query_pos, reference_points, memory, memory_mask, spatial_shapes,
                 deterministic: bool = True, self_attention_mask=None):
        """tgt, query_pos: [B, Q, E]; reference_points [B, Q, L, 2 or 4] (scaled by the
        valid ratios, `scale_references`); memory [B, S, E]; memory_mask [B, S] bool;
        self_attention_mask [Q, Q] or [B, Q, Q] bool (True = may attend) or None.
        Returns [B, Q, E]."""
        drop = nn.Dropout(self.dropout)
        q = tgt + query_pos
        self_attn = MultiHeadAttention(self.num_heads, self.dropout, self.dtype, name="self_attn")
        attended = self_attn(q, q, tgt, None, deterministic, attention_mask=self_attention_mask)
        tgt = layer_norm("norm1", self.dtype)(tgt + drop(attended, deterministic=deterministic))
        cross_attn = MultiScaleDeformableAttention(tgt.shape[-1], self.num_heads, self.num_levels, self.num_points,
                                                   self.offset_scale, self.sampling, dtype=self.dtype, name="cross_attn")
        attended = cross_attn(tgt, reference_points, memory, spatial_shapes, memory_mask, query_pos=query_pos)
        tgt = layer_norm("norm2", self.dtype)(tgt + drop(attended, deterministic=deterministic))
        ffn = FeedForward(self.dim_feedforward, self.dropout, self.dtype, name="ffn")
        return layer_norm("norm3", self.dtype)(tgt + drop(ffn(tgt, deterministic), deterministic=deterministic))


class DeformableDecoder(nn.Module):
    """Deformable DETR's decoder: `num_layers` DeformableDecoderLayers (layer{i}) refining a
    QueryState, and each layer's boxes from its box head, relative to the reference the
    layer read. With `refine` (box refinement) those boxes are the next layer's references,
    detached: the next layer's sampling does not train the box head that placed it, while
    the loss on the boxes themselves trains both the head and (through the first layer's
    reference) whatever made the queries' references. Without it every layer reads the
    queries' own reference.

    DINO's switches (all off for Deformable DETR; the official IDEA-Research/DINO
    `TransformerDecoder` with `deformable_decoder=True`):
      position_from_reference: the query position of each layer is computed from the
        layer's reference box by `position_head`; the QueryState then has no position.
        position_head "sine" (DINO): `ref_point_head` (MLP 2E -> E -> E) of the sine
        embedding (E/2 features per coordinate, ordered (y, x, w, h)) of the box scaled by
        the first level's valid ratios; "box" (RT-DETR, Hugging Face's `RTDetrDecoder`):
        `query_pos_head` (MLP 4 -> 2E -> E) of the normalized box itself.
      final_norm: a LayerNorm `norm` on every layer's output; the normalized states are
        returned and go to the heads, the next layer reads the raw output.
      look_forward_twice (needs refine): layer i's boxes are its box head on its normalized
        state relative to the un-detached refinement of layer i - 1 (the gradient of layer
        i's box loss reaches layer i - 1's box head); that refinement is the box head on
        the raw output relative to the detached reference the layer read, and is what the
        next layer reads, detached. (DINO's decoder refines the reference from the raw
        output while its detector predicts the boxes from the normalized one.)
      inverse_sigmoid_eps: the clipping of the references' logits (1e-5 Hugging Face's
        Deformable DETR and RT-DETR, 1e-3 DINO's).
    RT-DETR's decoder is position_from_reference with position_head "box", box refinement,
    no final norm; RT-DETRv2's also sets the cross-attention's num_points (per level),
    offset_scale and sampling (`MultiScaleDeformableAttention`).

    No parameters besides the layers' (and ref_point_head or query_pos_head, and norm): the
    box heads are the caller's (per layer, or one shared), since they are also its output
    heads.
    """

    num_layers: int
    num_heads: int
    dim_feedforward: int
    dropout: float = 0.0
    num_points: int | tuple[int, ...] = 4
    offset_scale: float = 0.5
    sampling: str = "bilinear"
    position_from_reference: bool = False
    position_head: str = "sine"
    final_norm: bool = False
    look_forward_twice: bool = False
    inverse_sigmoid_eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, memory, memory_mask, spatial_shapes, valid_ratios, queries: QueryState,
                 box_heads: Sequence[Callable], refine: bool, deterministic: bool = True):
        """memory [B, S, E]; memory_mask [B, S] bool (True = real); spatial_shapes ((h_l,
        w_l), ...) static; valid_ratios [B, L, 2]; queries: content [B, Q, E], position
        [B, Q, E] (or None with position_from_reference), reference [B, Q, 2] (x, y) or
        [B, Q, 4] (cx, cy, w, h) normalized, float32, self_attention_mask [Q, Q] or [B, Q, Q]
        or None (`queries.ReferencePointQueries`, `queries.TopKProposals`, denoising groups
        prepended); box_heads: one per layer, `head(states [B, Q, E], reference=inverse-
        sigmoid reference [B, Q, R]) -> boxes [B, Q, 4]` (a `detr.BoxHead`: offsets from
        the reference's R coordinates).

        Returns (states [L, B, Q, E], each layer's output (normalized with final_norm);
        references: a tuple of L + 1 float32 arrays, the reference each layer read ([B, Q,
        2] or [B, Q, 4]) and last the last layer's refinement (refine) or the queries'
        reference again; boxes [L, B, Q, 4] float32, each layer's predictions). With refine
        and 2-d queries the references change width after the first layer (a point, then
        boxes), hence a tuple.
        """
        if len(box_heads) != self.num_layers:
            raise ValueError(f"{len(box_heads)} box heads for {self.num_layers} decoder layers")
        if self.look_forward_twice and not refine:
            raise ValueError("look_forward_twice needs box refinement (refine=True)")
        if (queries.position is None) != self.position_from_reference:
            raise ValueError("the queries must have a position unless the decoder derives it from the reference "
                             "(position_from_reference), and then not")
        embed = queries.content.shape[-1]
        if self.position_head not in POSITION_HEADS:
            raise ValueError(f"position_head {self.position_head!r}: expected one of {POSITION_HEADS}")
        if self.position_from_reference and self.position_head == "sine":
            ref_point_head = MLP(embed, embed, 2, dtype=self.dtype, name="ref_point_head")
        elif self.position_from_reference:
            query_pos_head = MLP(2 * embed, embed, 2, dtype=self.dtype, name="query_pos_head")
        norm = layer_norm("norm", self.dtype) if self.final_norm else (lambda x: x)

        def logit(x):
            return inverse_sigmoid(x, self.inverse_sigmoid_eps)

        tgt, reference = queries.content, queries.reference
        undetached = reference
        states, references, boxes = [], [reference], []
        for i in range(self.num_layers):
            layer = DeformableDecoderLayer(self.num_heads, self.dim_feedforward, self.dropout, len(spatial_shapes),
                                           self.num_points, self.offset_scale, self.sampling, self.dtype,
                                           name=f"layer{i}")
            scaled = scale_references(reference, valid_ratios)
            if self.position_from_reference and self.position_head == "sine":
                position = ref_point_head(sine_embedding(scaled[:, :, 0], embed // 2).astype(self.dtype))
            elif self.position_from_reference:
                position = query_pos_head(reference.astype(self.dtype))
            else:
                position = queries.position
            tgt = layer(tgt, position, scaled, memory, memory_mask, spatial_shapes, deterministic,
                        queries.self_attention_mask)
            state = norm(tgt)
            states.append(state)
            if self.look_forward_twice:
                boxes.append(box_heads[i](state, reference=logit(undetached)))
                undetached = box_heads[i](tgt, reference=logit(reference))
                reference = jax.lax.stop_gradient(undetached)
            else:
                boxes.append(box_heads[i](state, reference=logit(reference)))
                if refine:
                    # The next layer reads this layer's boxes detached; the loss on them is not.
                    reference = jax.lax.stop_gradient(boxes[-1])
            references.append(reference)
        return jnp.stack(states), tuple(references), jnp.stack(boxes)
