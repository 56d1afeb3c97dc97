"""The varifocal loss (Zhang et al., "VarifocalNet", 2021; RT-DETR's "IoU-aware"
classification loss), per element: the sigmoid varifocal class convention's
classification loss."""

from __future__ import annotations

import jax
import optax


def varifocal_loss(logits: jax.Array, onehot: jax.Array, quality: jax.Array, alpha: float = 0.75,
                   gamma: float = 2.0) -> jax.Array:
    """Per-element varifocal loss (Hugging Face's `RTDetrLoss.loss_labels_vfl` and official
    RT-DETR's before their reduction): binary cross-entropy against the soft target
    q = quality * onehot, weighted by q where the target is 1 and by alpha * p^gamma (p the
    predicted probability) where it is 0; the weight carries no gradient.

    logits [..., K]; onehot [..., K] 0/1 (the matched class, none for "no object");
    quality [...] the soft target of the matched class (the IoU of the query's box with its
    target; no gradient flows through it). Returns [..., K]."""
    target = jax.lax.stop_gradient(quality)[..., None] * onehot
    weight = alpha * jax.lax.stop_gradient(jax.nn.sigmoid(logits)) ** gamma * (1 - onehot) + target
    return weight * optax.sigmoid_binary_cross_entropy(logits, target)
