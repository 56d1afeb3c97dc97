"""The decoder's queries as state, and the generators that make them.

Every member's decoder reads a `QueryState` and refines it layer by layer; what differs
between members is where the state comes from:

  learned        DETR, Conditional DETR: content zeros, a learned position per query
                 (`LearnedQueries`, parameter `query_embed` [Q, E]);
  anchor boxes   DAB-DETR: content zeros, learned anchor boxes as the reference
                 (`AnchorBoxQueries`, parameter `refpoint_embed` [Q, 4], logits);
  proposals      two-stage Deformable DETR, DINO's mixed query selection, RT-DETR: the
                 top-k encoder proposals give the reference (and, two-stage, the content);
  denoising      DINO, RT-DETR in training: noised ground truth as extra queries in front
                 of the others, with a self-attention mask that keeps the groups apart.

A generator is a Flax module (or a function inside the detector) returning a QueryState;
denoising prepends its queries with `concat`. A decoder returns (states [L, B, Q, E],
references [L + 1, B, Q, 4] or None, and each layer's boxes), refining the reference
inside each layer on a detached copy (DESIGN.md, "The decoder refines").
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn


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
