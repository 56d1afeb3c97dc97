"""Checkpoints: orbax training checkpoints (the train state and the data position) and
params-only checkpoints (model variables and a JSON of metadata), with one error type.

Training checkpoints. Layout of a workdir:
  checkpoints/<step>/state   params, frozen BN, optimizer state, step, RNG (orbax pytree)
  checkpoints/<step>/data    the input iterator's state (JSON), so a resumed run reads
                             the next batch it would have read
  checkpoints/<step>/meta    step, epoch, and the config (JSON)
  best/<step>/...            the same, for the checkpoint with the best validation AP

orbax writes a checkpoint into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoints intact. A checkpoint damaged later (a
truncated or deleted file) is skipped, with a one-line warning naming it and the reason, by
training (`Checkpointer.restore_latest`) and by evaluation and prediction
(`load_train_checkpoint`) alike: both use the newest readable step.

Params-only checkpoints, written by `detr-jax convert` (weights converted from PyTorch) and
read by evaluation, prediction (`detr_jax.checkpoints.restore`) and training's `init_from`:

    DIR/variables/      orbax (StandardCheckpointer) tree {"params": ..., "frozen_bn": ...}
    DIR/metadata.json   where the weights came from and the model they describe

The tree may be partial (a torchvision ResNet gives only the backbone subtrees);
`merge_variables` lays such a tree over freshly initialized variables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from detr_jax.config.errors import ConfigError

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")
JSON_ITEM_FILE = "metadata"  # where orbax's JsonSave puts a JSON item (data, meta)
TREE_METADATA_FILE = "_METADATA"  # orbax's description of a saved tree, needed to read it

VARIABLES_DIR = "variables"
METADATA_FILE = "metadata.json"
FORMAT = "detr-jax-variables"
FORMAT_VERSION = 1
_LISTED = 20  # problems listed per kind in a "does not fit" error
_REASON_CHARS = 500  # at most this long, the reason a checkpoint is unreadable

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or unreadable, or does not fit the model."""


# ----------------------------------------------------------------------------------------
# Unreadable checkpoints

# A TensorStore error starts with its absl status code ("OUT_OF_RANGE: Error reading ...").
_STATUS = re.compile(
    r"(?:CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|PERMISSION_DENIED"
    r"|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|INTERNAL|UNAVAILABLE"
    r"|DATA_LOSS|UNAUTHENTICATED): ")
# What TensorStore appends to a message (each array's whole JSON spec, C++ source lines) and
# wraps around it; none of it says what is wrong.
_PAYLOAD = re.compile(r"\s*\[(?:tensorstore_spec|source locations)\b.*", re.DOTALL)
_DRIVER = re.compile(r'Error opening "\w+" driver: ')


def _tensorstore_error(error: BaseException) -> BaseException | None:
    """The TensorStore error (its message starts with a status code) among `error` and its
    causes, or None."""
    seen = []
    while error is not None and error not in seen:
        if _STATUS.match(str(error)):
            return error
        seen.append(error)
        error = error.__cause__ or error.__context__
    return None


def unreadable_reason(error: BaseException, root: str | pathlib.Path | None = None) -> str:
    """Why reading a checkpoint failed, in one short line.

    For an orbax/TensorStore error, the status code and the key and file it names, found in
    the chain of causes (orbax wraps it in an exception whose message is a TensorStore spec),
    without the JSON specs TensorStore appends; for any other error, its type and message (a
    CheckpointError's message alone). Lines are joined, paths under `root` written relative to
    it, and the whole cut to _REASON_CHARS characters.
    """
    status = _tensorstore_error(error)
    if status is not None:
        text = _DRIVER.sub("", _PAYLOAD.sub("", str(status)))
    elif isinstance(error, CheckpointError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    if root is not None:  # TensorStore names absolute paths, our messages the paths given
        for prefix in (pathlib.Path(root).absolute(), pathlib.Path(root)):
            text = text.replace(f"{prefix}/", "")
    text = " ".join(text.split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


# When one read of an orbax restore fails, orbax's `asyncio.gather` raises at once and orbax
# closes its event loop, while the other reads of that restore still run in TensorStore's
# threads and their coroutines wait on the closed loop. Nothing waits for them any more, but
# they make four kinds of noise (tens of thousands of lines for a training state), most of
# it after the restore has returned, so no scope around the restore can catch it:
#  - each read finishing delivers its result with `loop.call_soon_threadsafe` to the closed
#    loop, which raises RuntimeError("Event loop is closed") inside a C++ callback, where it
#    is unraisable: Python prints a traceback for each;
#  - each abandoned coroutine reading a jax.Array, when garbage collected, turns the
#    GeneratorExit that closes it into an Exception holding the whole TensorStore spec
#    (orbax's `except BaseException`), also unraisable and printed;
#  - each other read that failed is logged by asyncio at ERROR, "Future (or Task) exception
#    was never retrieved", when its future is garbage collected;
#  - each read coroutine that never started warns "coroutine ... was never awaited".
# `_quiet_abandoned_reads` drops exactly these, for the rest of the process.


class _DropAbandonedReadErrors:
    """A sys.unraisablehook that drops the unraisable errors of abandoned orbax reads (a
    result delivered to a closed event loop; an orbax coroutine failing as it is closed) and
    passes any other on to the hook it wraps."""

    def __init__(self, hook: Callable):
        self.hook = hook

    def __call__(self, unraisable) -> None:
        error, tb = unraisable.exc_value, unraisable.exc_traceback
        code = getattr(unraisable.object, "cr_code", None)  # the object is the coroutine being closed
        closed_loop = (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
                       and tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")
        closed_coroutine = (code is not None and "/orbax/" in code.co_filename
                            and isinstance(error.__cause__ or error.__context__, GeneratorExit))
        if not (closed_loop or closed_coroutine):
            self.hook(unraisable)


def _keep_asyncio_record(record: logging.LogRecord) -> bool:
    """A logging filter of asyncio's logger: False (drop) for a TensorStore error that was
    never retrieved."""
    unretrieved = str(record.msg).split("\n", 1)[0].endswith(" exception was never retrieved")
    return not (unretrieved and record.exc_info is not None and _tensorstore_error(record.exc_info[1]) is not None)


def _quiet_abandoned_reads() -> None:
    """Installs the filters of that noise (once)."""
    if not isinstance(sys.unraisablehook, _DropAbandonedReadErrors):
        sys.unraisablehook = _DropAbandonedReadErrors(sys.unraisablehook)
    asyncio_log = logging.getLogger("asyncio")
    if _keep_asyncio_record not in asyncio_log.filters:
        asyncio_log.addFilter(_keep_asyncio_record)
    warnings.filterwarnings("ignore", r"coroutine '_read_array_index_and_device_put' was never awaited",
                            RuntimeWarning)


def _newest_readable(read: Callable[[pathlib.Path], T], step_dirs: Sequence[pathlib.Path],
                     folder: pathlib.Path | None) -> tuple[pathlib.Path, T]:
    """(step folder, `read(step folder)`) of the first of `step_dirs` (newest first) that reads.

    Each unreadable step folder before it is reported by a one-line warning naming it and the
    reason. Raises CheckpointError naming the step folder and the reason if `folder` is None
    (one step folder was asked for), else listing each step folder of `folder` and its reason
    when none reads. A ConfigError of `read` (a config the checkpoint does not take) is no
    damage: it is raised as it is.
    """
    _quiet_abandoned_reads()
    failures = []
    for step_dir in step_dirs:
        try:
            result = read(step_dir)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 -- orbax and TensorStore raise many types for damage
            failures.append((step_dir, unreadable_reason(e, step_dir)))
            continue
        for bad, reason in failures:
            log.warning("checkpoint %s is unreadable (%s); using step %s", bad, reason, step_dir.name)
        return step_dir, result
    if folder is None:
        (bad, reason), = failures
        raise CheckpointError(f"checkpoint {bad} is unreadable: {reason}")
    raise CheckpointError(f"no checkpoint in {folder} is readable:\n"
                          + "\n".join(f"  {bad}: {reason}" for bad, reason in failures))


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
    def _save_args(state, data_state: dict, meta: dict):
        return ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Saves (asynchronously) unless `step` is already saved."""
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=self._save_args(state, data_state, meta), force=True)

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
        self.best.save(step, args=self._save_args(state, data_state, {**meta, "metrics": metrics}),
                       metrics={self.best_metric: float(value)}, force=True)
        return True

    def restore_latest(self, abstract_state, check_meta: Callable[[dict], Any] | None = None
                       ) -> tuple[Any, dict, dict] | None:
        """(state, data_state, meta) of the newest readable checkpoint, or None if none exist.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct (with shardings) describing
        the state. An unreadable newer checkpoint is skipped with a one-line warning; if
        none is readable, CheckpointError lists each with its reason. `check_meta(meta)`
        runs before the state is read, and the ConfigError it raises (the run's config
        refuses the caller's) ends the restore.
        """
        directory = pathlib.Path(self.latest.directory)

        def read(step_dir: pathlib.Path):
            # The JSON items first: they are small, and read here they fail with their file named.
            data_state, meta = read_json_item(step_dir, "data"), read_json_item(step_dir, "meta")
            check_state_item(step_dir)
            if check_meta is not None:
                check_meta(meta)
            target, complete = _older_state_target(abstract_state, step_dir / "state")
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
            return complete(self.latest.restore(int(step_dir.name), args=args)["state"]), data_state, meta

        steps = sorted(self.latest.all_steps(), reverse=True)
        if not steps:
            return None
        return _newest_readable(read, [directory / str(step) for step in steps], directory)[1]

    def wait(self) -> None:
        """Blocks until asynchronous saves are finished."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def _older_state_target(abstract_state, state_dir: pathlib.Path) -> tuple[Any, Callable[[Any], Any]]:
    """(what to restore, how to complete it into `abstract_state`'s type) for the saved
    state in `state_dir`: a state saved before a field was added to the train state (e.g.
    `batch_stats`, `ema`) lacks it; where the field is empty in `abstract_state` too, the
    rest is restored and the field filled with its empty value. Anything else restores as
    `abstract_state` (and a real mismatch is reported by orbax)."""
    saved = ocp.PyTreeCheckpointHandler().metadata(state_dir.absolute()).tree
    if not dataclasses.is_dataclass(abstract_state) or not isinstance(saved, Mapping):
        return abstract_state, lambda state: state
    fields = {field.name: getattr(abstract_state, field.name) for field in dataclasses.fields(abstract_state)}
    absent = {key: value for key, value in fields.items() if key not in saved and not jax.tree.leaves(value)}
    if not absent:
        return abstract_state, lambda state: state
    target = {key: value for key, value in fields.items() if key not in absent}
    return target, lambda state: type(abstract_state)(**state, **absent)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of a pytree of arrays (or of ShapeDtypeStructs), with the sharding
    of each leaf from `shardings` (a pytree like `tree`)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def read_state_as_numpy(state_dir: str | pathlib.Path) -> dict:
    """A checkpointed state item as nested dicts of numpy arrays, on any device topology."""
    state_dir = pathlib.Path(state_dir).absolute()
    # The handler's metadata, not the checkpointer's: that one looks for a whole step's
    # _CHECKPOINT_METADATA in the item folder and warns it is missing.
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def read_json_item(step_dir: str | pathlib.Path, item: str) -> dict:
    """A JSON item ("data" or "meta") of a training checkpoint's step folder."""
    return _read_json_object(pathlib.Path(step_dir) / item / JSON_ITEM_FILE)


def _read_json_object(path: pathlib.Path) -> dict:
    """The JSON object in file `path`; CheckpointError if it is missing or is not one."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def read_train_meta(step_dir: str | pathlib.Path) -> dict:
    """The meta item of a training checkpoint's step folder: step, epoch and the config."""
    meta = read_json_item(step_dir, "meta")
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{pathlib.Path(step_dir) / 'meta' / JSON_ITEM_FILE}: no step and config "
                              "(not a detr-jax training checkpoint?)")
    return meta


def check_state_item(step_dir: str | pathlib.Path) -> None:
    """Raises CheckpointError unless a step folder's state item has the tree metadata orbax
    needs to read it (without it, orbax fails with an unrelated pytree structure error)."""
    state_dir = pathlib.Path(step_dir) / "state"
    for required in (state_dir, state_dir / TREE_METADATA_FILE):
        if not required.exists():
            raise CheckpointError(f"{required}: missing")


def _step_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    """The step folders in `folder`, newest first (orbax's unfinished saves have other names)."""
    steps = [p for p in folder.iterdir() if p.name.isdigit() and p.is_dir()] if folder.is_dir() else []
    return sorted(steps, key=lambda p: int(p.name), reverse=True)


def train_step_dirs(path: str | pathlib.Path) -> tuple[list[pathlib.Path], pathlib.Path | None]:
    """(step folders, newest first; the folder holding them) of a training workdir, its
    checkpoints/ or best/ folder, or ([path], None) for a step folder itself."""
    path = pathlib.Path(path)
    if (path / "state").is_dir():
        return [path], None
    for folder in (path / "checkpoints", path / "best", path):
        if steps := _step_dirs(folder):
            return steps, folder
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    raise CheckpointError(
        f"{path}: no training checkpoint (expected a training workdir with checkpoints/<step>/, "
        "its checkpoints/ or best/ folder, or a step folder with state/)")


def latest_step_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The newest checkpoint's step folder under a workdir, a checkpoints/ or best/ folder,
    or a step folder itself (which is returned as is); not checked to be readable."""
    return train_step_dirs(path)[0][0]


def is_train_checkpoint(path: str | pathlib.Path) -> bool:
    """Whether `path` is a training workdir, its checkpoints/ or best/ folder, or a step."""
    try:
        train_step_dirs(path)
    except (CheckpointError, OSError):
        return False
    return True


def load_train_meta(path: str | pathlib.Path) -> tuple[pathlib.Path, dict]:
    """(step folder, its meta item: step, epoch, config) of the newest training checkpoint
    under `path` whose meta item reads, without reading the state."""
    return _newest_readable(read_train_meta, *train_step_dirs(path))


def load_train_checkpoint(path: str | pathlib.Path) -> tuple[dict, dict, int]:
    """({"params", "frozen_bn", "batch_stats"} as numpy, the run's config as a dict, step) of
    the newest readable training checkpoint under `path` (see `_newest_readable`): the
    moving average of the parameters and statistics where the run kept one
    (`train.ema_decay`), as evaluation during training used."""

    def read(step_dir: pathlib.Path):
        meta = read_train_meta(step_dir)
        check_state_item(step_dir)
        return meta, read_state_as_numpy(step_dir / "state")

    _, (meta, state) = _newest_readable(read, *train_step_dirs(path))
    variables = {"params": state["params"], "frozen_bn": state["frozen_bn"],
                 "batch_stats": state.get("batch_stats", {})}
    return dict(variables, **(state.get("ema") or {})), meta["config"], meta["step"]


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
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path}: not a detr-jax params checkpoint (no {METADATA_FILE}; "
            "convert PyTorch weights with `detr-jax convert SRC DST` first)"
        )
    metadata = _read_json_object(meta_file)
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
