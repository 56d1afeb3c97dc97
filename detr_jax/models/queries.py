"""The decoder's queries as state, and the generators that make them.

Every member's decoder reads a `QueryState` and refines it layer by layer; what differs
between members is where the state comes from:

  learned        DETR, Conditional DETR: content zeros, a learned position per query
                 (`LearnedQueries`, parameter `query_embed` [Q, E]);
  anchor boxes   DAB-DETR: content zeros, learned anchor boxes as the reference
                 (`AnchorBoxQueries`, parameter `refpoint_embed` [Q, 4], logits);
  learned with   Deformable DETR: learned content and position, a 2-d reference point
  reference      predicted from the position (`ReferencePointQueries`, `query_embed`
                 [Q, 2E], `reference_points`);
  proposals      two-stage Deformable DETR, DINO's mixed query selection, RT-DETR: the
                 top-k encoder proposals give the reference (and, two-stage, the content
                 and position; mixed selection: learned content `tgt_embed`, no position:
                 `TopKProposals`);
  denoising      DINO, RT-DETR in training: noised ground truth as extra queries in front
                 of the others, with a self-attention mask that keeps the groups apart.

A generator is a Flax module (or a function inside the detector) returning a QueryState;
denoising prepends its queries with `concat`. A decoder returns (states [L, B, Q, E],
references [L + 1, B, Q, 4] or None, and each layer's boxes), refining the reference
inside each layer on a detached copy (DESIGN.md, "The decoder refines").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from detr_jax.models.position_encoding import sine_embedding
from detr_jax.models.transformer import layer_norm, torch_dense, xavier_uniform


@flax.struct.dataclass
class QueryState:
    """The queries a decoder starts from.

    content: [B, Q, E] the content queries (the decoder's input "tgt").
    position: [B, Q, E] a learned positional query, or None (the decoder derives its query
      positions from the reference).
    reference: [B, Q, 4] normalized cxcywh boxes or [B, Q, 2] normalized (x, y) points,
      float32, or None (DETR: no reference).
    self_attention_mask: [Q, Q] bool, True where query i may attend to query j, or None (all
      may): denoising groups see neither each other nor, for the matching queries, any group;
      or [B, Q, Q] per image (`denoising.hide_padded_slots`, for a decoder that takes one).
    """

    content: jnp.ndarray
    position: jnp.ndarray | None = None
    reference: jnp.ndarray | None = None
    self_attention_mask: jnp.ndarray | None = None

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


def concat(first: QueryState, second: QueryState, self_attention_mask: jnp.ndarray | None) -> QueryState:
    """`first`'s queries then `second`'s along Q (both with the same fields given), with the
    [Q1 + Q2, Q1 + Q2] mask of the whole (the caller's: only it knows which may see which)."""

    def both(a, b):
        if (a is None) != (b is None):
            raise ValueError("concat: a field is given in one QueryState and not in the other")
        return None if a is None else jnp.concatenate([a, b], axis=1)

    return QueryState(content=both(first.content, second.content), position=both(first.position, second.position),
                      reference=both(first.reference, second.reference), self_attention_mask=self_attention_mask)


class LearnedQueries(nn.Module):
    """DETR's and Conditional DETR's queries: a learned position per query (`query_embed`
    [Q, E], N(0, 1) as nn.Embedding), content zeros, no reference (Conditional DETR's
    decoder derives its 2-d reference points from the position)."""

    num_queries: int
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, batch_size: int) -> QueryState:
        query_embed = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, self.hidden_dim))
        position = jnp.broadcast_to(query_embed.astype(self.dtype)[None], (batch_size,) + query_embed.shape)
        return QueryState(content=jnp.zeros_like(position), position=position)


class AnchorBoxQueries(nn.Module):
    """DAB-DETR's queries: learned anchor boxes (`refpoint_embed` [Q, 4], their logits,
    N(0, 1) as nn.Embedding) as the reference, sigmoid -> normalized cxcywh float32;
    content zeros [B, Q, hidden_dim]; no learned position."""

    num_queries: int
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, batch_size: int) -> QueryState:
        refpoint_embed = self.param("refpoint_embed", nn.initializers.normal(1.0), (self.num_queries, 4))
        reference = jax.nn.sigmoid(jnp.broadcast_to(refpoint_embed[None], (batch_size, self.num_queries, 4)))
        return QueryState(content=jnp.zeros((batch_size, self.num_queries, self.hidden_dim), self.dtype),
                          reference=reference.astype(jnp.float32))


class ReferencePointQueries(nn.Module):
    """Deformable DETR's queries: a learned embedding `query_embed` [Q, 2E] (N(0, 1), as
    nn.Embedding) split into the position [:E] and the content [E:], and a 2-d reference
    point per query, sigmoid(reference_points(position)) (a Dense E -> 2, xavier-uniform
    kernel and zero bias as the reference; computed in float32 whatever the compute dtype,
    as it places the deformable attention's samples)."""

    num_queries: int
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, batch_size: int, count: int | None = None) -> QueryState:
        """-> content, position [B, Q, E] (compute dtype), reference [B, Q, 2] normalized
        (x, y), float32, of the first Q = `count` (default num_queries) rows of the
        embedding (hybrid matching reads all rows in training, the one-to-one ones else)."""
        query_embed = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, 2 * self.hidden_dim))
        count = self.num_queries if count is None else count
        query_embed = query_embed[:count]
        shape = (batch_size, count, self.hidden_dim)
        position = jnp.broadcast_to(query_embed[None, :, :self.hidden_dim], shape)
        content = jnp.broadcast_to(query_embed[None, :, self.hidden_dim:], shape)
        head = nn.Dense(2, kernel_init=xavier_uniform, bias_init=nn.initializers.zeros, dtype=jnp.float32,
                        name="reference_points")
        return QueryState(content=content.astype(self.dtype), position=position.astype(self.dtype),
                          reference=jax.nn.sigmoid(head(position)))


def encoder_proposals(memory_mask: jnp.ndarray, spatial_shapes: tuple[tuple[int, int], ...]):
    """Two-stage Deformable DETR's proposals, one box per encoder position (the references'
    `gen_encoder_output_proposals`): centred on the position's pixel, normalized by the
    image's real extent on its level, 0.05 * 2^level wide and high.

    memory_mask: [B, S] bool (True = real) over the flat levels of `spatial_shapes`.
    Returns (proposals [B, S, 4] float32, the inverse sigmoid of cxcywh, +inf where the
    position is padding or the box not within (0.01, 0.99) in every coordinate; valid
    [B, S] bool, the latter test alone).
    """
    batch = memory_mask.shape[0]
    proposals, start = [], 0
    for level, (height, width) in enumerate(spatial_shapes):
        mask = memory_mask[:, start:start + height * width].reshape(batch, height, width)
        start += height * width
        valid_h = mask[:, :, 0].sum(1).astype(jnp.float32)
        valid_w = mask[:, 0, :].sum(1).astype(jnp.float32)
        grid_y, grid_x = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32),
                                     indexing="ij")
        grid = np.stack([grid_x, grid_y], -1)[None] + np.float32(0.5)  # [1, h, w, 2] (x, y) pixel centres
        centre = grid / jnp.stack([valid_w, valid_h], -1)[:, None, None, :]
        size = jnp.full_like(centre, np.float32(0.05) * np.float32(2.0**level))
        proposals.append(jnp.concatenate([centre, size], -1).reshape(batch, height * width, 4))
    proposals = jnp.concatenate(proposals, axis=1)
    valid = jnp.all((proposals > 0.01) & (proposals < 0.99), axis=-1)
    logits = jnp.log(proposals / (1 - proposals))
    return jnp.where((memory_mask & valid)[..., None], logits, jnp.inf), valid


class TopKProposals(nn.Module):
    """Two-stage Deformable DETR's queries: every encoder position is a proposal, scored
    and boxed by the detector's proposal heads; the `num_queries` best by their first
    class's logit become the queries, their boxes (detached) the references and the sine
    embedding of those boxes, through pos_trans and pos_trans_norm, the position [:E] and
    the content [E:] (the references' two-stage, Hugging Face's
    `DeformableDetrModel.forward`).

    DINO's switches (IDEA-Research/DINO `two_stage_type="standard"`, `embed_init_tgt=True`):
      select_by_max: rank the proposals by their largest class logit (DINO), not the first
        class's (Deformable DETR, whose proposals are trained class-agnostically);
      mixed: mixed query selection: the top-k boxes are the references, the content is
        learned (`tgt_embed` [Q, E], N(0, 1) as nn.Embedding, the first k rows when fewer
        proposals than queries exist), and there is no position (the decoder derives it from
        the reference); no pos_trans, pos_trans_norm.
    RT-DETR's switch (with select_by_max; Hugging Face's `RTDetrModel.forward` with
    `learn_initial_query=False`, official lyuwenyu/RT-DETR `_get_decoder_input`):
      memory_content: the content is the selected proposals' features (the projected and
        normalized memory the heads read), detached, and there is no position; no
        pos_trans, pos_trans_norm, tgt_embed.

    Parameters: enc_output [E, E] and enc_output_norm (the proposals' features: the memory,
    zeroed at padding and at invalid proposals, projected and normalized), pos_trans
    [2E, 2E] and pos_trans_norm (neither mixed nor memory_content) or tgt_embed (mixed);
    initialized as the reference's transformer (xavier-uniform kernels, PyTorch's Linear
    bias).
    """

    num_queries: int
    dtype: Any = jnp.float32
    select_by_max: bool = False
    mixed: bool = False
    memory_content: bool = False

    @nn.compact
    def __call__(self, memory: jnp.ndarray, memory_mask: jnp.ndarray, spatial_shapes: tuple[tuple[int, int], ...],
                 class_head: Callable, box_head: Callable, count: int | None = None) -> tuple[QueryState, dict]:
        """memory [B, S, E]; memory_mask [B, S] bool (True = real); class_head: [B, S, E]
        -> [B, S, K] logits; box_head: (features [B, S, E], reference=inverse-sigmoid
        boxes [B, S, 4]) -> boxes [B, S, 4] (a `detr.BoxHead`); count: the proposals to
        keep, at most num_queries (default num_queries; hybrid matching keeps all
        num_queries in training and the one-to-one ones, the best, else).

        Returns (queries: content [B, Q, E], position [B, Q, E] (None when mixed or
        memory_content),
        reference [B, Q, 4] normalized cxcywh float32 (no gradient), Q = min(count,
        S); proposals: {"pred_logits" [B, S, K] float32, "pred_boxes" [B, S, 4] float32 (1
        where the proposal is +inf: padding or invalid), "indices" [B, Q] int32 the positions
        chosen, best first}).
        """
        if self.mixed and self.memory_content:
            raise ValueError("TopKProposals: mixed (learned content) and memory_content exclude each other")
        embed = memory.shape[-1]
        proposals, valid = encoder_proposals(memory_mask, spatial_shapes)
        features = jnp.where((memory_mask & valid)[..., None], memory, 0)
        features = torch_dense(embed, embed, "enc_output", self.dtype, xavier_uniform)(features)
        features = layer_norm("enc_output_norm", self.dtype)(features)
        logits = class_head(features).astype(jnp.float32)
        boxes = box_head(features, reference=proposals)
        # min: a map of fewer positions than queries (an image far smaller than any trained
        # on, such as `init_variables`' 64x64: no parameter depends on Q) gives them all.
        count = min(self.num_queries if count is None else count, logits.shape[1])
        scores = logits.max(-1) if self.select_by_max else logits[..., 0]
        _, indices = jax.lax.top_k(scores, count)
        reference = jax.lax.stop_gradient(jnp.take_along_axis(boxes, indices[..., None], axis=1))
        found = {"pred_logits": logits, "pred_boxes": boxes, "indices": indices.astype(jnp.int32)}
        if self.memory_content:
            content = jax.lax.stop_gradient(jnp.take_along_axis(features, indices[..., None], axis=1))
            return QueryState(content=content, reference=reference), found
        if self.mixed:
            tgt_embed = self.param("tgt_embed", nn.initializers.normal(1.0), (self.num_queries, embed))
            content = jnp.broadcast_to(tgt_embed[None, :count], (memory.shape[0], count, embed))
            return QueryState(content=content.astype(self.dtype), reference=reference), found
        # sine_embedding orders a box (y, x, w, h); the references embed it (x, y, w, h).
        sine = sine_embedding(reference[..., [1, 0, 2, 3]], embed // 2).astype(self.dtype)
        queries = torch_dense(2 * embed, 2 * embed, "pos_trans", self.dtype, xavier_uniform)(sine)
        queries = layer_norm("pos_trans_norm", self.dtype)(queries)
        state = QueryState(content=queries[..., embed:], position=queries[..., :embed], reference=reference)
        return state, found
