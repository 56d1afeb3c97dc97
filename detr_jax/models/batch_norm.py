"""Trainable BatchNorm with PyTorch's semantics (`nn.BatchNorm2d`, eps 1e-5, momentum 0.1).

Scale and bias are parameters (`params`); the running mean and variance live in the
`batch_stats` collection, so a training step that applies the model with
`mutable=["batch_stats"]` gets them back updated and keeps them in its state (the
optimizer never sees them).

  train=True   normalizes with the batch's statistics over every axis but the last
               (biased variance) and updates the running ones as PyTorch does:
               running = (1 - momentum) * running + momentum * batch, the variance
               term unbiased (n / (n - 1)), where Flax's nn.BatchNorm keeps it biased.
  train=False  normalizes with the running statistics.

Synchronized across devices and hosts without asking: the train step is one jit over the
global batch (detr_jax.runtime.sharding), so a mean over the batch axis is the mean of the
whole batch, whatever devices hold its shards (PyTorch's SyncBatchNorm). The statistics
are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

BATCH_STATS = "batch_stats"
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm over the last axis: x [..., C] -> [..., C] in `dtype`. Variables:
    params scale, bias [C]; batch_stats mean, var [C] (Flax's names, so converted PyTorch
    BatchNorms map onto them as onto nn.BatchNorm)."""

    train: bool = False
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPSILON
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable(BATCH_STATS, "mean", lambda: jnp.zeros((c,), jnp.float32))
        running_var = self.variable(BATCH_STATS, "var", lambda: jnp.ones((c,), jnp.float32))
        if self.train and not self.is_initializing():
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            count = x.size // c
            running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
            running_var.value = ((1 - self.momentum) * running_var.value
                                 + self.momentum * var * (count / max(count - 1, 1)))
        else:
            mean, var = running_mean.value, running_var.value
        # Flax nn.BatchNorm's arithmetic order, so inference equals it bit for bit.
        mul = lax.rsqrt(var + self.epsilon) * scale
        y = (x - mean.astype(self.dtype)) * mul.astype(self.dtype) + bias.astype(self.dtype)
        return y.astype(self.dtype)


def batch_norm(channels: int, name: str, dtype: Any = jnp.float32, train: bool = False) -> nn.Module:
    """A norm factory `(channels, name, dtype, train)`: the trainable BatchNorm."""
    del channels
    return BatchNorm(train=train, dtype=dtype, name=name)
