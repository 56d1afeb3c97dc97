"""What several commands share: the config of a checkpoint command, dtype choices."""

from __future__ import annotations

from detr_jax.config import config_from_args
from detr_jax.models.detr import DTYPES
from detr_jax.restore import checkpoint_config

DTYPE_CHOICES = tuple(DTYPES)


def config_for_checkpoint(args, overrides: dict[str, str]):
    """--config (with overrides), the checkpoint's own config with overrides, or None (the
    checkpoint's own config, read when the checkpoint is loaded)."""
    if args.config:
        return config_from_args(args.config, overrides)
    if not overrides:
        return None
    return checkpoint_config(args.checkpoint, overrides)
