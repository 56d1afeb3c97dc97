"""The data axis, the mesh over every device of every host, and global batches.

The batch is split along its first axis over the mesh's "data" axis. Each process feeds
its own contiguous block of every global batch (`jax.make_array_from_process_local_data`),
so any number of hosts gives the single-host batch. The train state (parameters, optimizer
state) is replicated or, for models too big to replicate, sharded over the same axis
(`state_sharding`, `train.param_sharding`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

# What the train step reads from a batch (the pipeline's batches carry more, e.g. image ids),
# and what it reads where the batch has it (data.masks).
MODEL_INPUT_KEYS = ("image", "mask", "labels", "boxes", "valid")
OPTIONAL_INPUT_KEYS = ("masks",)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: every device of every process).

    A plain Mesh (automatic axis types): jax.make_mesh's explicit axes would make every
    gather in the model name its output sharding.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (metrics; the train state unless it is sharded)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) axis over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate_spec(shape: tuple[int, ...], nbytes: int, axis_size: int, min_bytes: int) -> P:
    """Every array whole on every device."""
    return P()


def fsdp_spec(shape: tuple[int, ...], nbytes: int, axis_size: int, min_bytes: int) -> P:
    """big_vision's `fsdp` rule: split the largest dimension that `axis_size` divides.

    Arrays under `min_bytes` (biases, norms, the step counter), and those with no such
    dimension, stay whole on every device: splitting them saves little memory and costs a
    collective each. Ties go to the first of the largest dimensions.
    """
    if nbytes < min_bytes:
        return P()
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[i] % axis_size == 0:
            return P(*(DATA_AXIS if j == i else None for j in range(len(shape))))
    return P()


# train.param_sharding -> how one array of the train state is laid out over the data axis:
# (shape, bytes, devices along the axis, min_bytes) -> PartitionSpec. Under "fsdp" each
# device keeps 1/N of every large array and XLA's SPMD partitioner gathers the parameters
# where the step uses them (ZeRO-3 / FSDP, as big_vision and other JAX pod trainers do).
PARAM_SHARDINGS = {"replicated": replicate_spec, "fsdp": fsdp_spec}


def state_sharding(tree, mesh: Mesh, mode: str, min_mib: float):
    """A NamedSharding for each leaf of `tree` (arrays or ShapeDtypeStructs) under
    PARAM_SHARDINGS[mode] (`train.param_sharding`): the one place that decides how the train
    state is laid out (the train step's in/out shardings, the initial state, the state a
    checkpoint restores into). `min_mib`: the smallest array "fsdp" splits
    (`train.fsdp_min_mib`)."""
    rule, axis_size = PARAM_SHARDINGS[mode], data_size(mesh)

    def leaf_sharding(x) -> NamedSharding:
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        return NamedSharding(mesh, rule(tuple(x.shape), nbytes, axis_size, int(min_mib * 2**20)))

    return jax.tree.map(leaf_sharding, tree)


def data_size(mesh: Mesh) -> int:
    """Devices along the data axis: a global batch must be a multiple of this."""
    return mesh.shape[DATA_AXIS]


def global_batch(local_batch: dict, mesh: Mesh, keys: Sequence[str] | None = None) -> dict:
    """This process's numpy batch -> global jax arrays sharded over the data axis (default
    keys: MODEL_INPUT_KEYS and those of OPTIONAL_INPUT_KEYS the batch has)."""
    if keys is None:
        keys = (*MODEL_INPUT_KEYS, *(k for k in OPTIONAL_INPUT_KEYS if k in local_batch))
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

