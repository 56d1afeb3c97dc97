"""Configuration: section defaults and validation (`defaults`, `train_config`, and the data
section's own `detr_jax.data.config`), loading, overriding and restoring (`loading`), and
the error type (`errors`).

A config is a locked `ml_collections.ConfigDict` with sections `model`, `loss`, `data`,
`train` and `eval`; see `defaults.base_config`.
"""

from detr_jax.config.defaults import (
    BACKBONES,
    DTYPES,
    POSITION_EMBEDDINGS,
    base_config,
    loss_config,
    model_config,
    validate,
    validate_loss,
    validate_model,
)
from detr_jax.config.errors import ConfigError
from detr_jax.config.loading import (
    apply_overrides,
    config_from_args,
    config_from_dict,
    load_config,
    parse_value,
    resolve_config_path,
    set_by_path,
)
from detr_jax.config.train_config import eval_config, train_config

__all__ = [
    "BACKBONES", "DTYPES", "POSITION_EMBEDDINGS", "ConfigError", "apply_overrides", "base_config",
    "config_from_args", "config_from_dict", "eval_config", "load_config", "loss_config", "model_config",
    "parse_value", "resolve_config_path", "set_by_path", "train_config", "validate", "validate_loss",
    "validate_model",
]
