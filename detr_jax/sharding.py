"""The data axis, the mesh over every device of every host, and global batches.

Parameters are replicated and the batch is split along its first axis over the mesh's
"data" axis. Each process feeds its own contiguous block of every global batch
(`jax.make_array_from_process_local_data`), so any number of hosts gives the
single-host batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

# What the train step reads from a batch (the pipeline's batches carry more, e.g. image ids).
MODEL_INPUT_KEYS = ("image", "mask", "labels", "boxes", "valid")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of every process).

    A plain Mesh (automatic axis types): jax.make_mesh's explicit axes would make every
    gather in the model name its output sharding.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) axis over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def data_size(mesh: Mesh) -> int:
    """Devices along the data axis: a global batch must be a multiple of this."""
    return mesh.shape[DATA_AXIS]


def global_batch(local_batch: dict, mesh: Mesh, keys: Sequence[str] = MODEL_INPUT_KEYS) -> dict:
    """This process's numpy batch -> global jax arrays sharded over the data axis."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, local_batch[k]) for k in keys}


def per_device(fn: Callable, mesh: Mesh | None, in_specs, out_specs, check_vma: bool = True) -> Callable:
    """`fn` run by each device on its own shard (`jax.shard_map`), or as is without a mesh.

    The specs name DATA_AXIS (e.g. `(P(None, DATA_AXIS), P(DATA_AXIS))`); this is the one
    place that turns a per-shard function into a global one. `check_vma`: shard_map's
    typing of which values vary across devices (see `jax.shard_map`).
    """
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)

