"""What several commands share: the config of a checkpoint command, dtype choices."""

from __future__ import annotations

import ml_collections

from detr_jax.config import config_from_args
from detr_jax.models.detr import DTYPES
from detr_jax.restore import checkpoint_config

DTYPE_CHOICES = tuple(DTYPES)


def checkpoint_command_config(args, overrides: dict[str, str]) -> tuple[ml_collections.ConfigDict | None, dict]:
    """(config, overrides of the checkpoint's own config) of a checkpoint command: --config
    with the overrides applied and none left, or None and the overrides, for
    `restore.load_checkpoint(path, overrides=...)` to apply to the config it reads along
    with the variables (so the checkpoint is read once)."""
    if args.config:
        return config_from_args(args.config, overrides), {}
    return None, overrides


def config_for_checkpoint(args, overrides: dict[str, str]) -> ml_collections.ConfigDict | None:
    """The config of a checkpoint command as one object: --config (with overrides), the
    checkpoint's own config with overrides (this reads the checkpoint's meta item, which
    loading it reads again: `checkpoint_command_config` avoids that), or None (the
    checkpoint's own config, read when the checkpoint is loaded)."""
    config, overrides = checkpoint_command_config(args, overrides)
    return checkpoint_config(args.checkpoint, overrides) if overrides else config
