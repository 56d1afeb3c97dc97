"""Restoring a model for evaluation or prediction: the variables of a checkpoint (a training
workdir or step, or a params-only checkpoint) and the config to use them with, checked to
fit each other."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping

import ml_collections
from flax import linen as nn

from detr_jax.checkpoints.checkpointer import (
    METADATA_FILE,
    CheckpointError,
    check_fits,
    is_train_checkpoint,
    load_metadata,
    load_train_checkpoint,
    load_train_meta,
    load_variables,
)
from detr_jax.config import config_from_dict
from detr_jax.config.defaults import AUTO
from detr_jax.models import build_model, variable_shapes

log = logging.getLogger(__name__)

# Model config fields that may differ between a checkpoint and the config it is used with.
FREE_MODEL_FIELDS = ("dtype", "dropout")


def checkpoint_config(path: str | os.PathLike, overrides: Mapping | None = None) -> ml_collections.ConfigDict:
    """The config a checkpoint was made with, plus `overrides` (validated once).

    A training checkpoint holds its run's whole config (that of its newest step whose meta
    item reads); a params checkpoint only its model, the rest are the defaults (COCO-size
    evaluation resize). Reads no variables; to load them too, use `load_checkpoint(path,
    overrides=...)`, which reads the checkpoint once.
    """
    path = pathlib.Path(path)
    if _is_train_checkpoint(path):
        _, meta = load_train_meta(path)
        return config_from_dict(meta["config"], source=str(path), overrides=overrides)
    metadata = _detector_metadata(path)
    return config_from_dict({"model": metadata.get("model", {})}, source=str(path), overrides=overrides)


def load_checkpoint(path: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
                    overrides: Mapping | None = None):
    """Variables of a checkpoint and the config to use them with.

    Args:
      path: a training workdir, its checkpoints/ or best/ folder (the newest readable step:
        damaged newer steps are skipped with a warning) or a step folder, or a params
        checkpoint directory (`checkpoint.save_variables`, written by `detr-jax convert`).
      config: the config to run with; its `model` section must agree with the checkpoint's
        (compute dtype and dropout may differ). None: the checkpoint's own config.
      overrides: applied to the checkpoint's own config (only with `config` None), e.g.
        `{"eval.batch_size": "2"}` from the command line.

    Returns:
      (variables {"params", "frozen_bn"} as numpy, config).

    Raises:
      CheckpointError: not a checkpoint, unreadable, only a backbone, or the variables do
        not fit the model (every problem listed).
    """
    path = pathlib.Path(path)
    if config is not None and overrides:
        raise ValueError("load_checkpoint: overrides apply to the checkpoint's own config (config=None)")
    if _is_train_checkpoint(path):
        variables, saved_config, step = load_train_checkpoint(path)
        config = _config_to_use(path, saved_config, config, overrides)
        log.info("loaded training checkpoint %s (step %d)", path, step)
    else:
        metadata = _detector_metadata(path)
        config = _config_to_use(path, {"model": metadata.get("model", {})}, config, overrides)
        variables = load_variables(path)
    check_variables_fit(build_model(config.model), variables, str(path))
    return variables, config


def checkpoint_variables(path: str | os.PathLike) -> dict:
    """The variables of any checkpoint `load_checkpoint` reads (a training run or a params
    checkpoint, a backbone-only one included), unchecked against a model: what
    `train.init_from` lays over fresh variables."""
    path = pathlib.Path(path)
    if _is_train_checkpoint(path):
        return load_train_checkpoint(path)[0]
    return load_variables(path)


def check_variables_fit(model: nn.Module, variables: Mapping, source: str = "variables") -> None:
    """Raises CheckpointError unless `variables` has exactly the model's leaves and shapes."""
    check_fits(variable_shapes(model), variables, source)


def _is_train_checkpoint(path: pathlib.Path) -> bool:
    """Whether `path` is a training checkpoint (else a params checkpoint); CheckpointError
    saying what was expected if it is neither."""
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if is_train_checkpoint(path):
        return True
    if (path / METADATA_FILE).is_file():
        return False
    raise CheckpointError(
        f"{path}: not a checkpoint (expected a training workdir with checkpoints/<step>/, its "
        "checkpoints/ or best/ folder, a step folder with state/, or a folder written by "
        f"`detr-jax convert` with {METADATA_FILE})")


def _config_to_use(path: pathlib.Path, saved_config: dict, config: ml_collections.ConfigDict | None,
                   overrides: Mapping | None) -> ml_collections.ConfigDict:
    """`config`, checked to agree with the checkpoint's model, or the checkpoint's own config
    with `overrides`."""
    if config is None:
        return config_from_dict(saved_config, source=str(path), overrides=overrides)
    saved_model = saved_config.get("model", {})
    if config.model.num_classes == AUTO and "num_classes" in saved_model:  # the number the run resolved
        config.model.num_classes = saved_model["num_classes"]
    _check_model_matches(path, saved_model, config)
    return config


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
