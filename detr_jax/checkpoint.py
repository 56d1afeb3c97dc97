"""Checkpoints: orbax training checkpoints (the train state and the data position) and
params-only checkpoints (model variables and a JSON of metadata), with one error type.

Training checkpoints. Layout of a workdir:
  checkpoints/<step>/state   params, frozen BN, optimizer state, step, RNG (orbax pytree)
  checkpoints/<step>/data    the input iterator's state (JSON), so a resumed run reads
                             the next batch it would have read
  checkpoints/<step>/meta    step, epoch, and the config (JSON)
  best/<step>/...            the same, for the checkpoint with the best validation AP

orbax writes a checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoints intact; `restore_latest` also falls
back to an older checkpoint when the newest one cannot be read (with a warning).

Params-only checkpoints, written by `detr-jax convert` (weights converted from PyTorch) and
read by evaluation, prediction (`detr_jax.restore`) and training's `init_from`:

    DIR/variables/      orbax (StandardCheckpointer) tree {"params": ..., "frozen_bn": ...}
    DIR/metadata.json   where the weights came from and the model they describe

The tree may be partial (a torchvision ResNet gives only the backbone subtrees);
`merge_variables` lays such a tree over freshly initialized variables.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")

VARIABLES_DIR = "variables"
METADATA_FILE = "metadata.json"
FORMAT = "detr-jax-variables"
FORMAT_VERSION = 1
_LISTED = 20  # problems listed per kind in a "does not fit" error


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or unreadable, or does not fit the model."""


# ----------------------------------------------------------------------------------------
# Training checkpoints


def _manager(directory: pathlib.Path, keep: int, async_save: bool, best_metric: str | None):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
        best_mode="max",
        keep_checkpoints_without_metrics=False,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


class Checkpointer:
    """The last `keep` checkpoints, and the best one by a validation metric.

    Every process must call `save` (orbax writes collectively; process 0 writes the JSON
    items). The data state saved is process 0's: the training stream is position-indexed,
    so every host's iterator state at a given step is the same (see detr_jax.data.pipeline).
    """

    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True,
                 best_metric: str = "AP"):
        workdir = pathlib.Path(workdir)
        self.best_metric = best_metric
        self.latest = _manager(workdir / "checkpoints", keep, async_save, None)
        self.best = _manager(workdir / "best", 1, async_save, best_metric)

    @staticmethod
    def _args(state, data_state: dict, meta: dict, restore: bool = False):
        if restore:
            return ocp.args.Composite(
                state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Saves (asynchronously) unless `step` is already saved."""
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=self._args(state, data_state, meta), force=True)

    def save_best(self, step: int, state, data_state: dict, meta: dict, metrics: dict) -> bool:
        """Keeps this checkpoint in best/ if `metrics[best_metric]` beats the best so far."""
        value = metrics.get(self.best_metric)
        if value is None:
            return False
        previous = self.best.best_step()
        if previous is not None:
            old = self.best.metrics(previous) or {}
            if old.get(self.best_metric, float("-inf")) >= value:
                return False
        self.best.save(step, args=self._args(state, data_state, {**meta, "metrics": metrics}),
                       metrics={self.best_metric: float(value)}, force=True)
        return True

    def restore_latest(self, abstract_state) -> tuple[Any, dict, dict] | None:
        """(state, data_state, meta) of the newest readable checkpoint, or None if none exist.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct (with shardings) describing
        the state. An unreadable newest checkpoint is skipped with a warning.
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                restored = self.latest.restore(step, args=self._args(abstract_state, {}, {}, restore=True))
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint: try an older one
                failures.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
                log.warning("checkpoint %s/%d is unreadable (%s); falling back to an older one",
                            self.latest.directory, step, failures[-1])
                continue
            return restored["state"], dict(restored["data"]), dict(restored["meta"])
        if steps:
            raise CheckpointError(
                f"no checkpoint in {self.latest.directory} could be restored:\n  " + "\n  ".join(failures))
        return None

    def wait(self) -> None:
        """Blocks until asynchronous saves are finished."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def abstract_like(tree, sharding=None):
    """ShapeDtypeStructs of a pytree of arrays (optionally with one sharding for all)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)


def read_state_as_numpy(state_dir: str | pathlib.Path) -> dict:
    """A checkpointed state item as nested dicts of numpy arrays, on any device topology."""
    state_dir = pathlib.Path(state_dir).absolute()
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def latest_step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The newest finished checkpoint under a workdir, a checkpoints/ or best/ folder, or a
    step folder itself (which is returned as is)."""
    path = pathlib.Path(path)
    if (path / "state").is_dir():
        return path
    for folder in (path / "checkpoints", path / "best", path):
        steps = [p for p in folder.iterdir() if p.name.isdigit() and (p / "state").is_dir()] \
            if folder.is_dir() else []
        if steps:
            return max(steps, key=lambda p: int(p.name))
    raise CheckpointError(f"{path}: no training checkpoint found (expected checkpoints/<step>/state)")


def is_train_checkpoint(path: str | pathlib.Path) -> bool:
    """Whether `path` is a training workdir, its checkpoints/ or best/ folder, or a step."""
    try:
        latest_step_dir(path)
    except (CheckpointError, OSError):
        return False
    return True


def load_train_meta(path: str | pathlib.Path) -> tuple[pathlib.Path, dict]:
    """(step folder, its meta item: step, epoch, config) of the newest training checkpoint
    under `path`, without reading the state."""
    step_dir = latest_step_dir(path)
    meta_file = step_dir / "meta" / "metadata"  # where orbax's JsonSave puts the item
    if not meta_file.is_file():
        raise CheckpointError(f"{step_dir}: no meta item (not a detr-jax training checkpoint?)")
    return step_dir, json.loads(meta_file.read_text())


def load_train_checkpoint(path: str | pathlib.Path) -> tuple[dict, dict, int]:
    """({"params", "frozen_bn"} as numpy, the run's config as a dict, step) of the newest
    training checkpoint under `path`."""
    step_dir, meta = load_train_meta(path)
    state = read_state_as_numpy(step_dir / "state")
    return {"params": state["params"], "frozen_bn": state["frozen_bn"]}, meta["config"], int(meta["step"])


# ----------------------------------------------------------------------------------------
# Params-only checkpoints


def save_variables(variables: Mapping[str, Any], path: str | pathlib.Path, metadata: Mapping[str, Any]) -> pathlib.Path:
    """Writes `variables` ({"params": ..., "frozen_bn": ...}, arrays) and `metadata` to `path`.

    `path` must not exist yet or be an empty directory (a checkpoint is never overwritten
    in place). `metadata` must be JSON-serializable; format and version are added.
    Returns the absolute checkpoint directory.
    """
    path = pathlib.Path(path).absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path}: already exists and is not an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    host_tree = jax.tree.map(np.asarray, dict(variables))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / VARIABLES_DIR, host_tree)
    # Written last: a directory with metadata.json holds a complete checkpoint.
    full_metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    (path / METADATA_FILE).write_text(json.dumps(full_metadata, indent=2, sort_keys=True) + "\n")
    return path


def load_metadata(path: str | pathlib.Path) -> dict:
    """The metadata.json of a checkpoint written by `save_variables`."""
    path = pathlib.Path(path).absolute()
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path}: not a detr-jax params checkpoint (no {METADATA_FILE}; "
            "convert PyTorch weights with `detr-jax convert SRC DST` first)"
        )
    metadata = json.loads(meta_file.read_text())
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file}: format version {metadata['format_version']} is newer than this "
            f"detr-jax reads ({FORMAT_VERSION})"
        )
    return metadata


def load_variables(path: str | pathlib.Path) -> dict:
    """The variables tree of a checkpoint written by `save_variables`, as numpy arrays.

    Returns {"params": ..., "frozen_bn": ...} (possibly partial, see `metadata["contents"]`).
    """
    path = pathlib.Path(path).absolute()
    load_metadata(path)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path / VARIABLES_DIR)


# ----------------------------------------------------------------------------------------
# Does a tree fit the model?


def compare_trees(expected: Mapping, given: Mapping) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """(missing, unknown, mismatched) leaf paths of `given` against `expected`.

    Both are nested dicts of arrays or ShapeDtypeStructs, or flat {path tuple: array} dicts.
    missing: in `expected` only; unknown: in `given` only; mismatched: in both with other
    shapes. Each is sorted.
    """
    expected = _flat(expected)
    given = _flat(given)
    missing = sorted(p for p in expected if p not in given)
    unknown = sorted(p for p in given if p not in expected)
    mismatched = sorted(p for p in given if p in expected and np.shape(given[p]) != np.shape(expected[p]))
    return missing, unknown, mismatched


def _flat(tree: Mapping) -> dict[tuple, Any]:
    if all(isinstance(k, tuple) for k in tree):
        return dict(tree)
    return traverse_util.flatten_dict(dict(tree))


def check_fits(expected: Mapping, given: Mapping, source: str = "variables", partial: bool = False) -> None:
    """Raises CheckpointError, listing every problem, unless the leaves of `given` are those
    of `expected` with the same shapes (`partial`: a subset of them)."""
    missing, unknown, mismatched = compare_trees(expected, given)
    expected, given = _flat(expected), _flat(given)
    sections = (
        ("missing", [] if partial else ["/".join(p) for p in missing]),
        ("not in the model", ["/".join(p) for p in unknown]),
        ("shape mismatches", [f"{'/'.join(p)}: {tuple(np.shape(given[p]))} in {source}, "
                              f"{tuple(np.shape(expected[p]))} in the model" for p in mismatched]),
    )
    if not any(items for _, items in sections):
        return
    lines = [f"{source}: does not fit the model"]
    for title, items in sections:
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines += [f"    {item}" for item in items[:_LISTED]]
            lines += [f"    ... ({len(items) - _LISTED} more)"] if len(items) > _LISTED else []
    raise CheckpointError("\n".join(lines))


def merge_variables(variables: Mapping, pretrained: Mapping, source: str = "pretrained") -> dict:
    """`variables` with every leaf that `pretrained` has replaced by the pretrained one.

    Used to start training from a partial tree (e.g. only the backbone). Every pretrained
    leaf must exist in `variables` with the same shape; all offenders are listed in the
    error. Dtypes follow `variables`.
    """
    check_fits(variables, pretrained, source, partial=True)
    merged = traverse_util.flatten_dict(dict(variables), keep_empty_nodes=True)  # keeps "frozen_bn": {}
    for p, v in traverse_util.flatten_dict(dict(pretrained)).items():
        merged[p] = np.asarray(v, dtype=merged[p].dtype)
    return traverse_util.unflatten_dict(merged)
