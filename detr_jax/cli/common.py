"""What several commands share: the config of a checkpoint command, dtype choices, and
argument types that reject numbers which make no sense."""

from __future__ import annotations

import argparse

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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value
