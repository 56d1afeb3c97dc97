"""Loading a config, overriding it and restoring it from a saved run: the one place that
turns files, `--config.KEY=VALUE` strings and saved dicts into a validated config.

Every entry point validates once, after the overrides (`apply_overrides`), so a config
handed on is valid; `set_by_path` alone does not validate.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from detr_jax.config.defaults import base_config, validate
from detr_jax.config.errors import ConfigError
from detr_jax.config.moved_keys import moved_keys

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def resolve_config_path(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """A config file path, or the name of one in the repository's `configs/` folder."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (REPO_ROOT / "configs" / f"{path.stem}.py", pathlib.Path("configs") / f"{path.stem}.py"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name_or_path}: no such config file (nor configs/{path.stem}.py)")


def parse_value(text: str, current):
    """Parses an override string into the type of the value it replaces."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"cannot parse {text!r} as a Python literal") from e
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def set_by_path(config: ml_collections.ConfigDict, key: str, value, source: str = "config") -> None:
    """Sets `a.b.c = value` on a locked config; unknown keys raise ConfigError naming them."""
    *parents, leaf = key.split(".")
    node = config
    walked = []
    for part in parents:
        walked.append(part)
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"{source}: unknown config key {'.'.join(walked)!r}")
        node = node[part]
    if leaf not in node:
        known = ", ".join(sorted(node.keys()))
        raise ConfigError(f"{source}: unknown config key {key!r} (known here: {known})")
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad value for {key!r}: {e}") from e


_UNKNOWN = object()


def _current(config: ml_collections.ConfigDict, key: str):
    node = config
    try:
        for part in key.split("."):
            node = node[part]
    except (KeyError, AttributeError, TypeError):
        return _UNKNOWN
    return node


def _untyped(config: ml_collections.ConfigDict, key: str) -> bool:
    """Whether the key holds values of any type (a FieldReference of type object, such as
    model.num_classes: an integer or "auto")."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    return node.get_ref(leaf).get_type() is object


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any] | None,
                    source: str = "overrides") -> ml_collections.ConfigDict:
    """Sets dotted keys ({"model.num_queries": 10} or "10") on `config`, then validates it.

    A string replacing a value that is not a string is parsed to that value's type
    (`parse_value`: "true" for a bool, "(96, 128)" for a tuple); other values are set as
    they are. Unknown keys and bad values raise ConfigError naming them.
    """
    config.lock()
    for key, value in (overrides or {}).items():
        if isinstance(value, str):
            current = _current(config, key)
            if current is not _UNKNOWN and (current is None or _untyped(config, key)):
                # no type to follow: a Python literal, else the string
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass
            elif current is not _UNKNOWN:  # unknown: set_by_path names the key
                try:
                    value = parse_value(value, current)
                except ConfigError as e:
                    raise ConfigError(f"--config.{key}: {e}") from e
        set_by_path(config, key, value, source=source)
    validate(config)
    return config


def load_config(path: str | pathlib.Path, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file and applies dotted-key overrides.

    Args:
      path: a Python file defining `get_config()` (e.g. `configs/synthetic_tiny.py`).
      overrides: {"model.num_queries": 10, ...} (or strings, see `apply_overrides`); each
        key must already exist.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"detr_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: name it in the error
        raise ConfigError(f"{path}: failed to load config: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    try:
        config = module.get_config()
    except (AttributeError, KeyError) as e:  # a locked ConfigDict refuses unknown keys
        raise ConfigError(f"{path}: get_config() failed, unknown config key? {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return apply_overrides(config, overrides, source=str(path))


def config_from_args(config_arg: str | pathlib.Path, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """A config file (path or name in configs/) with overrides (strings from the command line)."""
    path = resolve_config_path(config_arg)
    return load_config(path, overrides)


def config_from_dict(values: Mapping, source: str = "saved config",
                     overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The base config with the values of a saved config dict (a run's config.json, a
    checkpoint's metadata; a partial dict such as {"model": {...}} keeps the other defaults),
    then `overrides`.

    Keys this version does not know are ignored with a warning (an older or newer save).
    """
    config = base_config()
    values = moved_keys(values, source)

    def assign(node, saved, prefix):
        for key, value in saved.items():
            if key not in node:
                log.warning("%s: ignoring unknown config key %s%s", source, prefix, key)
            elif isinstance(node[key], ml_collections.ConfigDict):
                assign(node[key], value, f"{prefix}{key}.")
            else:
                current = node[key]
                node[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value) \
                    if isinstance(current, tuple) and isinstance(value, list) else value

    assign(config, values, "")
    return apply_overrides(config, overrides, source=source)
