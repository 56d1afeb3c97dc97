"""A run's config is its contract: what a resumed run may change, and the record of it.

Every checkpoint holds the config it was trained with (its meta item). A run that resumes
compares its config with that of the checkpoint it resumes from (`check_resume`), key by
key: dotted keys, values as JSON, model.num_classes resolved, and a key the saved config
lacks (saved by an older version) compared with its default. Each change is of one kind
(`kind_of`):

- STATE: the checkpoints cannot be restored with it. Every `model.*` key but the compute
  dtype and dropout (parameter shapes, the model itself, model.num_classes);
  `train.param_rules` (the optimizer state's groups); `train.grad_accum_steps` across 1
  and `train.clip_max_norm` across 0 (each adds or removes a part of the optimizer state).
  Always refused.
- MEANING: what a training step computes changes. Every key that is neither STATE nor
  FREE: the batch size, the training data and its augmentation, the seed, the learning
  rate and its schedule, the optimizer, the loss, the compute dtype, dropout. Refused
  unless the new config sets `train.allow_config_change=True` (itself no part of the
  contract).
- FREE (FREE_KEYS, FREE_PREFIXES): the run's length, how often it logs, checkpoints and
  evaluates, what it evaluates on, what a run from scratch starts from, how the data is
  loaded and the state laid over the devices. Accepted.

The record, in the workdir:
  config.json           the config the run started with: written by a run that starts from
                        scratch, left as it is by a resumed one
  config_history.json   [{"step": s, "changed": {key: [old, new]}}], the changes accepted on
                        resume, each with the step from which it trained: config.json with
                        them applied in order is the config of the newest training. A
                        resumed run drops the entries at or after its own step (they came
                        with steps that were lost, as metrics.jsonl drops their rows).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from detr_jax.config.defaults import base_config
from detr_jax.config.errors import ConfigError
from detr_jax.config.moved_keys import moved_keys

STATE, MEANING, FREE = "state", "meaning", "free"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.json"
SWITCH = "train.allow_config_change"

FREE_KEYS = frozenset({
    "train.epochs", "train.num_steps", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.eval_every_epochs",
    "train.init_from", "train.init_exclude",  # read only by a run that starts from scratch
    "train.retain_host_memory", "train.param_sharding", "train.fsdp_min_mib",
    "data.num_workers", "data.num_threads", "data.prefetch_batches", "data.skip_bad_images",
    "data.synthetic_eval_examples",
})
FREE_PREFIXES = ("eval.", "data.eval_")
MODEL_MEANING_KEYS = frozenset({"model.dtype", "model.dropout"})  # model keys that shape no parameter
STATE_KEYS = frozenset({"train.param_rules"})
# Keys whose value adds or removes a part of the optimizer state where this predicate
# changes (detr_jax.train.optim.make_optimizer: optax.MultiSteps above 1, no clipping at 0),
# or of the train state (the moving average of train.ema_decay > 0).
_STATE_WHEN = {"train.grad_accum_steps": lambda v: v > 1, "train.clip_max_norm": lambda v: v > 0,
               "train.ema_decay": lambda v: v > 0}


class ResumeRefused(ConfigError):
    """A run's checkpoints do not take the new config (each refused key named, with both values)."""


def kind_of(key: str, old: Any, new: Any) -> str:
    """STATE, MEANING or FREE: the kind of changing dotted `key` from `old` to `new`."""
    if key in FREE_KEYS or key.startswith(FREE_PREFIXES):
        return FREE
    if key in STATE_KEYS or (key.startswith("model.") and key not in MODEL_MEANING_KEYS):
        return STATE
    if key in _STATE_WHEN and _STATE_WHEN[key](old) != _STATE_WHEN[key](new):
        return STATE
    return MEANING


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value as JSON reads it back) of every leaf of `config`."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", json.loads(json.dumps(value))


def _lookup(saved: Mapping, key: str, default: Any) -> Any:
    node = saved
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def config_changes(saved: Mapping, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} of every key where `config` differs from
    `saved` (a config as a dict, e.g. a checkpoint's), values as JSON. Keys this version does
    not know are left out; keys `saved` lacks are compared with their defaults."""
    defaults = dict(_leaves(base_config()))
    saved = moved_keys(saved)
    changes = {}
    for key, new in _leaves(config):
        old = _lookup(saved, key, defaults.get(key))
        if key != SWITCH and old != new:
            changes[key] = (old, new)
    return changes


def _listed(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} ({json.dumps(old)} in the run, {json.dumps(new)} now)"
                     for key, (old, new) in changes.items())


def check_resume(saved: Mapping, config: ml_collections.ConfigDict, run: str) -> dict[str, tuple[Any, Any]]:
    """The changes from `saved` (the config of the checkpoint a run resumes from) to
    `config` (see `config_changes`), or ResumeRefused naming `run` and every refused change
    with both values: STATE changes, and MEANING changes unless train.allow_config_change."""
    changes = config_changes(saved, config)
    state = {k: v for k, v in changes.items() if kind_of(k, *v) == STATE}
    meaning = {k: v for k, v in changes.items() if kind_of(k, *v) == MEANING}
    problems = []
    if state:
        problems.append(f"{_listed(state)} would change the shape of what its checkpoints hold: keep the run's "
                        "values, or train into another --workdir")
    if meaning and not config.train.allow_config_change:
        problems.append(f"{_listed(meaning)} would change what its training steps mean: keep the run's values, "
                        "or set --config.train.allow_config_change=True to go on with the new ones (recorded "
                        f"in {HISTORY_FILE})")
    if problems:
        raise ResumeRefused(f"{run}: cannot resume with this config: " + "; and ".join(problems))
    return changes


def read_history(workdir: str | os.PathLike) -> list[dict]:
    """The entries of a workdir's config_history.json ([] without one)."""
    path = pathlib.Path(workdir) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise ConfigError(f"{path}: not valid JSON ({e}); it records the run's config changes: repair or "
                          "remove it") from None
    if not isinstance(history, list) or not all(isinstance(e, dict) and isinstance(e.get("step"), int)
                                                for e in history):
        raise ConfigError(f"{path}: not a list of {{\"step\", \"changed\"}} entries; repair or remove it")
    return history


def record_run_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                      resumed: Mapping | None) -> None:
    """Writes the record of a run that starts: config.json (`resumed` None: from scratch;
    a history of earlier steps goes), or the history entry of the changes from the config
    of `resumed` (the meta item {"step", "config"} of the checkpoint it resumes from)."""
    workdir = pathlib.Path(workdir)
    history_path = workdir / HISTORY_FILE
    if resumed is None:
        (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
        history_path.unlink(missing_ok=True)
        return
    step = resumed["step"]
    earlier = read_history(workdir)
    history = [entry for entry in earlier if entry["step"] < step]
    changes = config_changes(resumed["config"], config)
    if changes:
        history.append({"step": step, "changed": {key: [old, new] for key, (old, new) in changes.items()}})
    if history != earlier:
        partial = history_path.with_suffix(".json.partial")  # a run killed while writing leaves the old file
        partial.write_text(json.dumps(history, indent=2) + "\n")
        os.replace(partial, history_path)
