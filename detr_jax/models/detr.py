"""DETR: backbone -> 1x1 input projection -> transformer -> class and box heads."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from detr_jax.models.backbone import Backbone, PointwiseConv
from detr_jax.models.position_encoding import build_position_embedding
from detr_jax.models.transformer import Transformer, torch_dense, torch_linear_bias_init, torch_linear_kernel_init

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class BoxHead(nn.Module):
    """3-layer MLP (hidden, hidden, 4) with ReLU between layers, sigmoid at the end."""

    hidden_dim: int
    num_layers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., E] -> [..., 4] normalized (cx, cy, w, h) in (0, 1), float32."""
        fan_in = x.shape[-1]
        for i in range(self.num_layers):
            out = 4 if i == self.num_layers - 1 else self.hidden_dim
            x = torch_dense(out, fan_in, f"layers_{i}", self.dtype)(x)
            fan_in = out
            if i < self.num_layers - 1:
                x = nn.relu(x)
        return jax.nn.sigmoid(x.astype(jnp.float32))


class DETR(nn.Module):
    """The DETR detector.

    Call: `model.apply({"params": ..., "frozen_bn": ...}, images, mask, train=..., rngs=...)`
    with `rngs={"dropout": key}` when `train=True`.
    """

    num_classes: int = 91
    num_queries: int = 100
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    backbone: str = "resnet50"
    dilation: bool = False
    backbone_norm: str = "frozen_bn"
    position_embedding: str = "sine"
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "DETR":
        """Builds the model from the `model` config section (see detr_jax/config.py).

        Raises ConfigError (a ValueError) for an invalid section, as config loading does.
        """
        from detr_jax.config import validate_model

        validate_model(config)
        return cls(
            num_classes=config.num_classes,
            num_queries=config.num_queries,
            hidden_dim=config.hidden_dim,
            num_heads=config.num_heads,
            num_encoder_layers=config.num_encoder_layers,
            num_decoder_layers=config.num_decoder_layers,
            dim_feedforward=config.dim_feedforward,
            dropout=config.dropout,
            pre_norm=config.pre_norm,
            backbone=config.backbone,
            dilation=config.dilation,
            backbone_norm=config.backbone_norm,
            position_embedding=config.position_embedding,
            dtype=DTYPES[config.dtype],
        )

    @nn.compact
    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        """images: [B, H, W, 3] normalized; mask: [B, H, W] bool (True = real pixel).

        Returns float32 predictions of every decoder layer (index -1 is the last):
          pred_logits [L, B, Q, num_classes + 1] (the last class is "no object"),
          pred_boxes  [L, B, Q, 4] normalized (cx, cy, w, h) relative to the unpadded image.
        """
        # Padded pixels are zero in the reference; zeroing them here makes the output
        # independent of whatever values the padding holds.
        images = jnp.where(mask[..., None], images, 0).astype(self.dtype)
        features, feature_mask = Backbone(self.backbone, self.dilation, self.backbone_norm, self.dtype, name="backbone")(images, mask)
        pos = build_position_embedding(self.position_embedding, self.hidden_dim)(feature_mask)

        in_channels = features.shape[-1]
        src = PointwiseConv(
            self.hidden_dim, use_bias=True, kernel_init=torch_linear_kernel_init,
            bias_init=torch_linear_bias_init(in_channels), dtype=self.dtype, name="input_proj",
        )(features)
        batch, h, w, _ = src.shape
        query_embed = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, self.hidden_dim))
        hs, _ = Transformer(
            num_heads=self.num_heads,
            num_encoder_layers=self.num_encoder_layers,
            num_decoder_layers=self.num_decoder_layers,
            dim_feedforward=self.dim_feedforward,
            dropout=self.dropout,
            pre_norm=self.pre_norm,
            dtype=self.dtype,
            name="transformer",
        )(
            src.reshape(batch, h * w, self.hidden_dim),
            feature_mask.reshape(batch, h * w),
            query_embed,
            pos.reshape(batch, h * w, self.hidden_dim),
            deterministic=not train,
        )
        logits = torch_dense(self.num_classes + 1, self.hidden_dim, "class_embed", self.dtype)(hs)
        boxes = BoxHead(self.hidden_dim, dtype=self.dtype, name="bbox_embed")(hs)
        return {"pred_logits": logits.astype(jnp.float32), "pred_boxes": boxes}


def init_variables(model: DETR, rng: jax.Array, image_size: tuple[int, int] = (64, 64)) -> dict:
    """Initial variables {"params": ..., "frozen_bn": ...} for a batch of one image.

    "frozen_bn" is always present ({} with backbone_norm="group_norm"), so code that
    carries both collections need not ask which backbone it has.
    """
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    mask = jnp.ones((1, *image_size), bool)
    variables = jax.jit(lambda r: model.init({"params": r}, images, mask, train=False))(rng)
    return {"frozen_bn": {}, **variables}


def variable_shapes(model: DETR) -> dict:
    """Shapes and dtypes of the model's variables (no computation)."""
    return jax.eval_shape(lambda r: init_variables(model, r), jax.random.PRNGKey(0))
