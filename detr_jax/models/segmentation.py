"""DETR's mask head (the paper's panoptic segmentation): a wrapper around a detector.

`DETRSegm(detr, num_heads)` runs the detector with its intermediates and adds, for every
query, a mask at 1/4 of the input resolution, built as official DETR's `DETRsegm` and
Hugging Face's `DetrForSegmentation`:

  1. `AttentionMap`: multi-head attention weights of each last-layer decoder state over
     the encoder memory (no values; one softmax over heads and positions together);
  2. `MaskHead`: those maps, concatenated with the input projection of the backbone
     features, through 3x3 conv + GroupNorm + ReLU blocks, upsampled (nearest) three
     times and added to 1x1-adapted backbone stages res4, res3, res2 (an FPN-like path),
     then one 3x3 conv to a mask logit per pixel.

The detector's parameters stay where they are in a plain DETR (`nn.share_scope`): a
detection checkpoint initializes the detector part as it is, and parameter rules such as
`(("(bbox_attention|mask_head)/.*", 1.0), (".*", None))` freeze the detector.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.resnet import PointwiseConv, resize_nearest
from detr_jax.models.detr import DETR
from detr_jax.models.transformer import torch_dense

# Official DETR initializes the mask head's convolutions with kaiming_uniform_(a=1):
# U(+-sqrt(3 / fan_in)), and their biases with zeros.
_conv_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class AttentionMap(nn.Module):
    """Attention weights of queries over a feature map, per head (official `MHAttentionMap`)."""

    hidden_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: jnp.ndarray, memory: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        """queries [B, Q, E], memory [B, h, w, E], mask [B, h, w] bool (True = real) ->
        weights [B, Q, h, w, heads], summing to 1 over (h, w, heads) for each query."""
        head_dim = self.hidden_dim // self.num_heads
        xavier = nn.initializers.xavier_uniform()
        q = torch_dense(self.hidden_dim, self.hidden_dim, "q_proj", self.dtype, kernel_init=xavier)(queries)
        k = torch_dense(self.hidden_dim, self.hidden_dim, "k_proj", self.dtype, kernel_init=xavier)(memory)
        q = q.reshape(*q.shape[:-1], self.num_heads, head_dim) * head_dim**-0.5
        k = k.reshape(*k.shape[:-1], self.num_heads, head_dim)
        logits = jnp.einsum("bqnd,bhwnd->bqhwn", q, k).astype(jnp.float32)
        logits = jnp.where(mask[:, None, :, :, None], logits, jnp.finfo(jnp.float32).min)
        batch, queries_n = logits.shape[:2]
        weights = jax.nn.softmax(logits.reshape(batch, queries_n, -1), axis=-1)
        return weights.reshape(logits.shape).astype(self.dtype)


class ConvBlock(nn.Module):
    """3x3 convolution, GroupNorm (min(8, C) groups) and ReLU: [N, h, w, C_in] -> [N, h, w, features]."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Conv(self.features, (3, 3), padding=1, kernel_init=_conv_init, dtype=self.dtype, name="conv")(x)
        x = nn.GroupNorm(num_groups=min(8, self.features), epsilon=1e-5, dtype=self.dtype, name="norm")(x)
        return nn.relu(x)


class MaskHead(nn.Module):
    """Official DETR's `MaskHeadSmallConv`: per-query mask logits from attention maps.

    Channels narrow as the maps grow: E + heads -> E + heads -> E/2, then E/4, E/8, E/16
    after fusing res4, res3, res2 (E = hidden_dim), then 1.
    """

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, projected: jnp.ndarray, attention: jnp.ndarray, stages: list[jnp.ndarray]) -> jnp.ndarray:
        """projected [B, h, w, E] (the input projection of the backbone features),
        attention [B, Q, h, w, heads] (AttentionMap), stages [res4, res3, res2] each
        [B, H_i, W_i, C_i] -> mask logits [B, Q, H_2, W_2] float32 (res2's grid: 1/4 of
        the padded input)."""
        batch, queries, h, w, heads = attention.shape
        features = jnp.broadcast_to(projected[:, None], (batch, queries, *projected.shape[1:]))
        x = jnp.concatenate([features, attention.astype(features.dtype)], axis=-1)
        x = x.reshape(batch * queries, h, w, -1)
        x = ConvBlock(x.shape[-1], self.dtype, name="conv1")(x)
        x = ConvBlock(self.hidden_dim // 2, self.dtype, name="conv2")(x)
        widths = (self.hidden_dim // 4, self.hidden_dim // 8, self.hidden_dim // 16)
        for i, (stage, width) in enumerate(zip(stages, widths)):
            # The adapter is per image: applied before repeating the stage for every query.
            adapted = PointwiseConv(x.shape[-1], use_bias=True, kernel_init=_conv_init, dtype=self.dtype,
                                    name=f"adapter{i + 1}")(stage)
            adapted = jnp.repeat(adapted, queries, axis=0)  # [B * Q, H_i, W_i, C]: image-major, as torch's expand
            x = adapted + resize_nearest(x, *adapted.shape[1:3])
            x = ConvBlock(width, self.dtype, name=f"refine{i + 1}")(x)
        x = nn.Conv(1, (3, 3), padding=1, kernel_init=_conv_init, dtype=self.dtype, name="out")(x)
        return x.reshape(batch, queries, *x.shape[1:3]).astype(jnp.float32)


class DETRSegm(nn.Module):
    """A detector with a mask head: DETR's outputs plus `pred_masks` [B, Q, H/4, W/4]
    (float32 logits on the padded input's grid at stride 4).

    detr: the detector (a ResNet backbone: the head reads its res2..res4 stages).
    num_heads: heads of the attention maps (official: the transformer's, 8).
    Same call as DETR: `apply(variables, images, mask, train=..., intermediates=...)`.
    """

    detr: DETR
    num_heads: int = 8

    @property
    def dtype(self):
        """The detector's compute dtype (the heads compute in it too)."""
        return self.detr.dtype

    @property
    def num_queries(self) -> int:
        return self.detr.num_queries

    def setup(self):
        nn.share_scope(self, self.detr)  # the detector's parameters at the top level, as in DETR
        hidden, dtype = self.detr.hidden_dim, self.dtype
        if (hidden + self.num_heads) % 8 or hidden % self.num_heads:
            raise ValueError(f"the mask head needs hidden_dim + num_heads divisible by 8 (its first GroupNorm has 8 "
                             f"groups) and hidden_dim divisible by num_heads; got {hidden} and {self.num_heads}")
        self.bbox_attention = AttentionMap(hidden, self.num_heads, dtype)
        self.mask_head = MaskHead(hidden, dtype)

    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False,
                 intermediates: bool = False, targets: dict | None = None) -> dict[str, Any]:
        out = self.detr(images, mask, train, intermediates=True, targets=targets)
        stages = out["backbone_stages"]
        missing = [name for name in ("res2", "res3", "res4") if name not in stages]
        if missing:
            raise ValueError(f"the mask head needs the backbone stages res2, res3 and res4; this backbone has "
                             f"{sorted(stages)}")
        attention = self.bbox_attention(out["decoder_states"][-1], out["memory"], out["memory_mask"])
        masks = self.mask_head(out["projected"], attention, [stages["res4"], stages["res3"], stages["res2"]])
        if not intermediates:
            out = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
        return {**out, "pred_masks": masks}
