"""The sigmoid focal loss (Lin et al. 2017), per element: the sigmoid class convention's
classification loss and the mask head's mask loss share it."""

from __future__ import annotations

import jax
import optax


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """Per-element focal loss (official DETR's `sigmoid_focal_loss` before its reduction):
    logits and targets (0/1) of one shape -> the same shape."""
    prob = jax.nn.sigmoid(logits)
    ce = optax.sigmoid_binary_cross_entropy(logits, targets)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma
