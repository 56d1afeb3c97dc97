"""Restoring a model for evaluation or prediction: the variables of a checkpoint (a training
workdir or step, or a params-only checkpoint) and the config to use them with, checked to
fit each other."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping

import ml_collections

from detr_jax.checkpoint import (
    CheckpointError,
    check_fits,
    is_train_checkpoint,
    load_metadata,
    load_train_checkpoint,
    load_train_meta,
    load_variables,
)
from detr_jax.config import config_from_dict
from detr_jax.models import DETR, build_model, variable_shapes

log = logging.getLogger(__name__)

# Model config fields that may differ between a checkpoint and the config it is used with.
FREE_MODEL_FIELDS = ("dtype", "dropout")


def checkpoint_config(path: str | os.PathLike, overrides: Mapping | None = None) -> ml_collections.ConfigDict:
    """The config a checkpoint was made with, plus `overrides` (validated once).

    A training checkpoint holds its run's whole config; a params checkpoint only its model,
    the rest are the defaults (COCO-size evaluation resize). Reads no variables.
    """
    path = pathlib.Path(path)
    if is_train_checkpoint(path):
        _, meta = load_train_meta(path)
        return config_from_dict(meta["config"], source=str(path), overrides=overrides)
    metadata = _detector_metadata(path)
    return config_from_dict({"model": metadata.get("model", {})}, source=str(path), overrides=overrides)


def load_checkpoint(path: str | os.PathLike, config: ml_collections.ConfigDict | None = None):
    """Variables of a checkpoint and the config to use them with.

    Args:
      path: a training workdir, its checkpoints/ or best/ folder or a step folder (the
        newest checkpoint), or a params checkpoint directory (`checkpoint.save_variables`,
        written by `detr-jax convert`).
      config: the config to run with; its `model` section must agree with the checkpoint's
        (compute dtype and dropout may differ). None: the checkpoint's own config
        (`checkpoint_config`).

    Returns:
      (variables {"params", "frozen_bn"} as numpy, config).

    Raises:
      CheckpointError: not a checkpoint, only a backbone, or the variables do not fit the
        model (every problem listed).
    """
    path = pathlib.Path(path)
    if is_train_checkpoint(path):
        variables, saved_config, step = load_train_checkpoint(path)
        if config is None:
            config = config_from_dict(saved_config, source=str(path))
        else:
            _check_model_matches(path, saved_config.get("model", {}), config)
        check_variables_fit(build_model(config.model), variables, str(path))
        log.info("loaded training checkpoint %s (step %d)", path, step)
        return variables, config
    metadata = _detector_metadata(path)
    saved_model = metadata.get("model", {})
    if config is None:
        config = config_from_dict({"model": saved_model}, source=str(path))
    else:
        _check_model_matches(path, saved_model, config)
    variables = load_variables(path)
    check_variables_fit(build_model(config.model), variables, str(path))
    return variables, config


def check_variables_fit(model: DETR, variables: Mapping, source: str = "variables") -> None:
    """Raises CheckpointError unless `variables` has exactly the model's leaves and shapes."""
    check_fits(variable_shapes(model), variables, source)


def _detector_metadata(path: pathlib.Path) -> dict:
    """The metadata of a params checkpoint that holds a whole detector."""
    metadata = load_metadata(path)
    contents = metadata.get("contents", "detr")
    if contents != "detr":
        raise CheckpointError(
            f"{path}: holds only a {contents} (no transformer or heads), so it cannot detect "
            "objects; it is meant for train.init_from"
        )
    return metadata


def _check_model_matches(path, saved_model: dict, config: ml_collections.ConfigDict) -> None:
    mismatches = [
        f"  model.{key}: checkpoint has {value!r}, config has {config.model[key]!r}"
        for key, value in saved_model.items()
        if key in config.model and key not in FREE_MODEL_FIELDS and config.model[key] != value
    ]
    if mismatches:
        raise CheckpointError(f"{path}: the checkpoint's model differs from the config:\n" + "\n".join(mismatches))
