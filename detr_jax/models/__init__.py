"""DETR from parts: `build_model(config.model)` is the one place where config meets modules."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from detr_jax.models.detr import DETR, DTYPES, init_variables, variable_shapes


def build_model(model_config, dtype: str | Any | None = None) -> DETR:
    """DETR of the `model` config section, with compute dtype `dtype` ("float32",
    "bfloat16", a jnp dtype) instead of `model.dtype` when given. Parameters stay float32."""
    model = DETR.from_config(model_config)
    if dtype is None:
        return model
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return model.clone(dtype=jnp.dtype(dtype))


__all__ = ["DETR", "build_model", "init_variables", "variable_shapes"]
