"""Detectors from parts: `build_model(config.model)` is the one place where config meets modules.

`model.arch` picks the detector (`detectors.DETECTORS`, DETR by default), and its class
convention (`build_class_convention(config)`, `class_convention.CLASS_CONVENTIONS`:
the detector's own unless `model.class_convention` names one). Each part's file has a
plain dict of named builders `(model_config, dtype) -> Module`: backbones
(`backbones.BACKBONES`: model.backbone), necks (`neck.NECKS`: model.neck),
`position_encoding.POSITION_EMBEDDINGS` (model.position_embedding), and `backbone.NORMS`
(model.backbone_norm); model.masks wraps
the detector in `segmentation.DETRSegm`. A new variant is one module plus an entry in a
dict (docs/EXTENDING.md).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from detr_jax.criterion.class_convention import CLASS_CONVENTIONS, ClassConvention
from detr_jax.models.resnet import NORMS, RESNET_BACKBONES
from detr_jax.models.backbones import BACKBONES
from detr_jax.models.detectors import DETECTORS, Detector
from detr_jax.models.detr import DETR, DTYPES, init_variables, variable_shapes
from detr_jax.models.neck import NECKS
from detr_jax.models.position_encoding import POSITION_EMBEDDINGS
from detr_jax.models.segmentation import DETRSegm


def resolve_dtype(dtype: str | Any) -> Any:
    """"float32" / "bfloat16" / a jnp dtype -> the jnp dtype; ValueError for anything else."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype)


def class_convention_name(model_config) -> str:
    """The name in CLASS_CONVENTIONS of the model's class convention: `model.class_convention`,
    or the detector's own when that is ""."""
    return model_config.class_convention or DETECTORS[model_config.arch].class_convention


def build_class_convention(config) -> ClassConvention:
    """The class convention of a full config's model, with its `loss` settings."""
    return CLASS_CONVENTIONS[class_convention_name(config.model)].from_config(config.loss)


def build_model(model_config, dtype: str | Any | None = None) -> nn.Module:
    """The `model.arch` detector of the `model` config section (validated at config load),
    wrapped with the mask head when `model.masks` (DETRSegm: the same call, plus
    pred_masks), computing in `dtype` ("float32", "bfloat16", a jnp dtype) instead of
    `model.dtype` when given. Parameters stay float32 either way."""
    m = model_config
    if isinstance(m.num_classes, str):  # "auto" (config.defaults.AUTO) is resolved by training
        raise ValueError(f"model.num_classes={m.num_classes!r}: the number is taken from the training data "
                         "when training starts; a model is built from a trained run's config or a number")
    compute = resolve_dtype(m.dtype if dtype is None else dtype)
    num_logits = CLASS_CONVENTIONS[class_convention_name(m)].num_logits(m.num_classes)
    detector = DETECTORS[m.arch].build(m, compute, num_logits)
    return DETRSegm(detector, num_heads=m.num_heads) if m.masks else detector


__all__ = ["BACKBONES", "DETECTORS", "DETR", "DETRSegm", "Detector", "NECKS", "NORMS", "POSITION_EMBEDDINGS",
           "RESNET_BACKBONES", "build_class_convention", "build_model", "class_convention_name", "init_variables",
           "resolve_dtype", "variable_shapes"]
