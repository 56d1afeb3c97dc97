"""Run by tests/test_loss_sharding.py in a subprocess: the loss on 8 simulated CPU devices.

XLA_FLAGS must be set before jax is imported, hence a separate process. Prints one JSON
line starting with "RESULT " holding, for every way of running the loss on the 8-device
mesh, the largest absolute difference from the single-device loss, metrics and gradients,
and the batch shapes the host callback received.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from conftest import record_host_matching  # noqa: E402
from detr_jax.criterion import matcher as matcher_lib  # noqa: E402
from detr_jax.criterion.losses import SetCriterion  # noqa: E402
from detr_jax.criterion.matcher import HungarianMatcher  # noqa: E402
from detr_jax.criterion.matcher import per_device as matcher_per_device  # noqa: E402

L, B, Q, K, M = 3, 16, 6, 5, 4

callback_shapes = record_host_matching()


def make_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(L, B, Q, K + 1)).astype(np.float32)
    pred_boxes = (1 / (1 + np.exp(-rng.normal(size=(L, B, Q, 4))))).astype(np.float32)
    labels = rng.integers(0, K, size=(B, M)).astype(np.int32)
    boxes = rng.uniform(0.2, 0.8, size=(B, M, 4)).astype(np.float32)
    boxes[..., 2:] *= 0.5
    # Uneven counts per device (2 images each): per-device normalization would differ.
    counts = [4, 4, 0, 0, 1, 0, 3, 2, 4, 1, 0, 2, 0, 0, 4, 3]
    valid = np.arange(M)[None, :] < np.array(counts)[:, None]
    return (
        {"pred_logits": logits, "pred_boxes": pred_boxes},
        {"labels": labels, "boxes": boxes, "valid": valid},
    )


def max_abs_diff(a, b):
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def main():
    assert jax.device_count() == 8, jax.devices()
    outputs, targets = make_batch()

    def value_and_grad(criterion, **kwargs):
        return jax.value_and_grad(lambda o, t: criterion(o, t, **kwargs), has_aux=True)

    reference = jax.jit(value_and_grad(SetCriterion(K)))(
        jax.device_put(outputs, jax.devices()[0]), jax.device_put(targets, jax.devices()[0])
    )
    reference = jax.device_get(reference)
    callback_shapes.clear()

    results = {"loss": float(reference[0][0]), "num_boxes": float(reference[0][1]["num_boxes"])}
    meshes = {
        "mesh": Mesh(np.array(jax.devices()), ("data",)),
        "make_mesh": jax.make_mesh((8,), ("data",)),  # explicit axis types in this JAX
    }
    for name, mesh in meshes.items():
        sharded_outputs = jax.device_put(outputs, NamedSharding(mesh, P(None, "data")))
        sharded_targets = jax.device_put(targets, NamedSharding(mesh, P("data")))

        # 1. jit over global sharded arrays; only the matching is in shard_map.
        step = jax.jit(value_and_grad(SetCriterion(K, matcher=matcher_per_device(HungarianMatcher(), mesh))))
        got = jax.device_get(step(sharded_outputs, sharded_targets))
        results[f"{name}/jit"] = {"diff": max_abs_diff(got, reference), "callbacks": callback_shapes[:]}
        callback_shapes.clear()

        # 2. everything per device inside the caller's shard_map, sums over axis_name.
        per_device = jax.shard_map(
            value_and_grad(SetCriterion(K), axis_name="data"),
            mesh=mesh,
            in_specs=(P(None, "data"), P("data")),
            out_specs=((P(), P()), P(None, "data")),
        )
        got = jax.device_get(jax.jit(per_device)(sharded_outputs, sharded_targets))
        results[f"{name}/shard_map"] = {"diff": max_abs_diff(got, reference), "callbacks": callback_shapes[:]}
        callback_shapes.clear()

        # 3. the device matcher (loss.matcher="hungarian_device"), per device as in 1.
        device_matcher = HungarianMatcher(solver=matcher_lib.assign_on_device)
        step = jax.jit(value_and_grad(SetCriterion(K, matcher=matcher_per_device(device_matcher, mesh))))
        got = jax.device_get(step(sharded_outputs, sharded_targets))
        results[f"{name}/device_matcher"] = {"diff": max_abs_diff(got, reference), "callbacks": callback_shapes[:]}
        callback_shapes.clear()

    # 4. the device matcher on one device.
    step = jax.jit(value_and_grad(SetCriterion(K, matcher=HungarianMatcher(solver=matcher_lib.assign_on_device))))
    got = jax.device_get(step(jax.device_put(outputs, jax.devices()[0]), jax.device_put(targets, jax.devices()[0])))
    results["single/device_matcher"] = {"diff": max_abs_diff(got, reference), "callbacks": callback_shapes[:]}
    callback_shapes.clear()

    print("RESULT " + json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
