"""Params-only checkpoints: model variables plus a JSON of metadata, in one directory.

Written by `detr-jax convert` (weights converted from PyTorch) and read by evaluation,
prediction and training's `init_from`. Layout of a checkpoint directory:

    DIR/variables/      orbax (StandardCheckpointer) tree {"params": ..., "frozen_bn": ...}
    DIR/metadata.json   where the weights came from and the model they describe

The tree may be partial (a torchvision ResNet gives only the backbone subtrees);
`merge_variables` lays such a tree over freshly initialized variables.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

VARIABLES_DIR = "variables"
METADATA_FILE = "metadata.json"
FORMAT = "detr-jax-variables"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A params-only checkpoint is missing, malformed, or does not fit the model."""


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


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def merge_variables(variables: Mapping, pretrained: Mapping, source: str = "pretrained") -> dict:
    """`variables` with every leaf that `pretrained` has replaced by the pretrained one.

    Used to start training from a partial tree (e.g. only the backbone). Every pretrained
    leaf must exist in `variables` with the same shape; all offenders are listed in the
    error. Dtypes follow `variables`.
    """
    base = _flatten(variables)
    update = _flatten(pretrained)
    unknown = sorted("/".join(p) for p in update if p not in base)
    mismatched = sorted(
        f"{'/'.join(p)}: {tuple(np.shape(v))} in {source}, {tuple(np.shape(base[p]))} in the model"
        for p, v in update.items()
        if p in base and np.shape(v) != np.shape(base[p])
    )
    if unknown or mismatched:
        lines = [f"{source}: does not fit the model"]
        if unknown:
            lines += [f"  not in the model ({len(unknown)}):"] + [f"    {p}" for p in unknown]
        if mismatched:
            lines += [f"  shape mismatches ({len(mismatched)}):"] + [f"    {m}" for m in mismatched]
        raise CheckpointError("\n".join(lines))
    merged = dict(base)
    for p, v in update.items():
        merged[p] = np.asarray(v, dtype=base[p].dtype)
    return _unflatten(merged)
