"""What several commands share: the config of a checkpoint command, dtype choices, and
argument types that reject numbers which make no sense."""

from __future__ import annotations

import argparse

import ml_collections

from detr_jax.config import config_from_args
from detr_jax.models.detr import DTYPES

DTYPE_CHOICES = tuple(DTYPES)


def checkpoint_command_config(args, overrides: dict[str, str]) -> tuple[ml_collections.ConfigDict | None, dict]:
    """(config, overrides of the checkpoint's own config) of a checkpoint command: --config
    with the overrides applied and none left, or None and the overrides, for
    `restore.load_checkpoint(path, overrides=...)` to apply to the config it reads along
    with the variables (so the checkpoint is read once)."""
    if args.config:
        return config_from_args(args.config, overrides), {}
    return None, overrides


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option in its error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value
