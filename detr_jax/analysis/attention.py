"""Attention weights from a DETR on request: encoder self-attention and decoder attention
of chosen layers, per head or averaged over heads; for deformable attention, which has no
map over the keys, its sampling locations and their weights.

The transformer sows every attention's softmax weights into Flax's "intermediates"
collection (`detr_jax.models.transformer`); a plain `apply` drops them (sowing is a no-op),
so a model that is not asked keeps nothing. Here they are asked for: under `jax.jit`, the
layers not selected are dead code that XLA removes from the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from detr_jax.models.deformable_attention import sampling_points
from detr_jax.models.transformer import attention_maps


def _layer_indices(layers: Sequence[int] | None, count: int, what: str) -> tuple[int, ...]:
    """`layers` (None = all; negative counts from the last) as indices in [0, count)."""
    if layers is None:
        return tuple(range(count))
    indices = []
    for layer in layers:
        if not -count <= int(layer) < count:
            raise ValueError(f"{what} layer {layer} does not exist: the model has {count} (indices "
                             f"{-count}..{count - 1})")
        indices.append(int(layer) % count)
    return tuple(indices)


def forward_with_attention(
    model,
    variables: Mapping,
    images: jax.Array,
    mask: jax.Array,
    *,
    encoder_layers: Sequence[int] | None = None,
    decoder_layers: Sequence[int] | None = None,
    average_heads: bool = False,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """The model's outputs (with intermediates) and its attention weights (eval mode).

    Args:
      model: a detector whose attention modules sow their weights (DETR, Conditional
        DETR, DAB-DETR); variables: {"params", "frozen_bn"}.
      images: [B, H, W, 3] uint8 pixels (or normalized floats, as the model takes); mask: [B, H, W] bool (True = real pixel).
      encoder_layers, decoder_layers: the layers to return (None: all; -1: the last).
      average_heads: average over the heads axis of the dense maps (the mean of the
        per-head maps); sampling points keep their heads.

    Returns (outputs, attention):
      outputs: `model(..., intermediates=True)`: pred_logits [L, B, Q, K+1], pred_boxes
        [L, B, Q, 4], memory_mask [B, h, w] (the feature map's real cells), ...
      attention, float32, softmax over keys (rows sum to 1, masked keys weigh 0), with
        S = h * w feature cells in row-major order and n the number of selected layers:
        encoder_self  [n, B, heads, S, S]  (absent when the model has no encoder layer)
        decoder_self  [n, B, heads, Q, Q]
        decoder_cross [n, B, heads, Q, S]
        and without the heads axis when `average_heads`. Deformable attention sows no
        map but where each head samples (`deformable_attention.sampling_points`), with
        L_v feature levels and P points per level:
        encoder_self_locations  [n, B, S, heads, L_v, P, 2]  normalized (x, y)
        encoder_self_weights    [n, B, S, heads, L_v, P]     softmax over L_v x P
        decoder_cross_locations [n, B, Q, heads, L_v, P, 2]
        decoder_cross_weights   [n, B, Q, heads, L_v, P]
        Which keys there are says what the model's attention is, whatever its name.
    """
    outputs, state = model.apply(variables, images, mask, train=False, intermediates=True,
                                 mutable=["intermediates"])
    maps = attention_maps(state["intermediates"])
    selected = {}
    for name, weights in maps.items():
        layers = encoder_layers if name.startswith("encoder") else decoder_layers
        indices = _layer_indices(layers, weights.shape[0], name.split("_")[0])
        weights = weights[jnp.asarray(indices, jnp.int32)]
        selected[name] = weights.mean(axis=2) if average_heads else weights
    for name, (locations, weights) in sampling_points(state["intermediates"]).items():
        layers = encoder_layers if name.startswith("encoder") else decoder_layers
        index = jnp.asarray(_layer_indices(layers, weights.shape[0], name.split("_")[0]), jnp.int32)
        selected[f"{name}_locations"], selected[f"{name}_weights"] = locations[index], weights[index]
    return outputs, selected
