"""Training checkpoints: orbax CheckpointManager for the train state and the data position.

Layout of a workdir:
  checkpoints/<step>/state   params, frozen BN, optimizer state, step, RNG (orbax pytree)
  checkpoints/<step>/data    the input iterator's state (JSON), so a resumed run reads
                             the next batch it would have read
  checkpoints/<step>/meta    step, epoch, and the config (JSON)
  best/<step>/...            the same, for the checkpoint with the best validation AP

orbax writes a checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoints intact; `restore_latest` also falls
back to an older checkpoint when the newest one cannot be read (with a warning).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


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


def load_train_checkpoint(path: str | pathlib.Path) -> tuple[dict, dict, int]:
    """({"params", "frozen_bn"} as numpy, the run's config as a dict, step) of the newest
    training checkpoint under `path`."""
    step_dir = latest_step_dir(path)
    state = read_state_as_numpy(step_dir / "state")
    meta_file = step_dir / "meta" / "metadata"  # where orbax's JsonSave puts the item
    if not meta_file.is_file():
        raise CheckpointError(f"{step_dir}: no meta item (not a detr-jax training checkpoint?)")
    meta = json.loads(meta_file.read_text())
    return {"params": state["params"], "frozen_bn": state["frozen_bn"]}, meta["config"], int(meta["step"])
