"""DETR from parts: `build_model(config.model)` is the one place where config meets modules.

Each part's file has a plain dict of named builders `(model_config, dtype) -> Module`:
backbones (`backbone.RESNET_BACKBONES`, `vit.VIT_BACKBONES`, merged into BACKBONES here:
model.backbone), `position_encoding.POSITION_EMBEDDINGS` (model.position_embedding), and
`backbone.NORMS` (model.backbone_norm); model.masks wraps the DETR in
`segmentation.DETRSegm`. A new variant is one module plus an entry in a
dict (docs/EXTENDING.md).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from detr_jax.models.backbone import NORMS, RESNET_BACKBONES
from detr_jax.models.detr import DETR, DTYPES, init_variables, variable_shapes
from detr_jax.models.position_encoding import POSITION_EMBEDDINGS
from detr_jax.models.segmentation import DETRSegm
from detr_jax.models.transformer import build_transformer
from detr_jax.models.vit import VIT_BACKBONES

# model.backbone -> builder (model_config, dtype) -> module; register new backbones here.
BACKBONES = {**RESNET_BACKBONES, **VIT_BACKBONES}


def resolve_dtype(dtype: str | Any) -> Any:
    """"float32" / "bfloat16" / a jnp dtype -> the jnp dtype; ValueError for anything else."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def build_model(model_config, dtype: str | Any | None = None) -> DETR | DETRSegm:
    """DETR of the `model` config section (validated at config load), wrapped with the
    mask head when `model.masks` (DETRSegm: the same call, plus pred_masks), computing in
    `dtype` ("float32", "bfloat16", a jnp dtype) instead of `model.dtype` when given.
    Parameters stay float32 either way."""
    m = model_config
    if isinstance(m.num_classes, str):  # "auto" (config.defaults.AUTO) is resolved by training
        raise ValueError(f"model.num_classes={m.num_classes!r}: the number is taken from the training data "
                         "when training starts; a model is built from a trained run's config or a number")
    compute = resolve_dtype(m.dtype if dtype is None else dtype)
    detr = DETR(
        backbone=BACKBONES[m.backbone](m, compute),
        position_embedding=POSITION_EMBEDDINGS[m.position_embedding](m, compute),
        transformer=build_transformer(m, compute),
        num_classes=m.num_classes,
        num_queries=m.num_queries,
        hidden_dim=m.hidden_dim,
        dtype=compute,
    )
    return DETRSegm(detr, num_heads=m.num_heads) if m.masks else detr


__all__ = ["BACKBONES", "DETR", "DETRSegm", "NORMS", "POSITION_EMBEDDINGS", "RESNET_BACKBONES", "build_model",
           "init_variables", "resolve_dtype", "variable_shapes"]
