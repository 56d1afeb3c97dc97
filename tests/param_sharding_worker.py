"""Run by tests/test_param_sharding.py in a subprocess: train.param_sharding="fsdp" on 8
simulated CPU devices against one device, and a sharded checkpoint restored on other
device counts.

XLA_FLAGS must be set before jax is imported, hence a separate process. One process holds
every mesh (1, 2 and 8 of its 8 devices), so each train step is compiled once (the 1- and
8-device ones; the 2-device mesh only restores). Prints one
JSON line starting with "RESULT ":
  loss_rel_diff, params_max_diff: fsdp on 8 devices against replicated on 1, after two
    steps on the same global batch of 8 (largest relative loss difference, largest absolute
    parameter difference);
  sharded: leaves of the fsdp state split over "data" ({"params", "opt_state"}: [split,
    all]), and one example (path, global shape, shape on each device);
  state_bytes_per_device: bytes of the state on device 0, fsdp and replicated;
  callbacks: the batch shapes the host matcher received in one fsdp step;
  restored[name]: a checkpoint of the fsdp state after two steps, restored on "2/fsdp" and
    "1/replicated": whether every restored leaf equals the saved one exactly, the restored
    leaves' device counts, the params leaves split over "data" ([split, all]), and on
    "1/replicated" the largest parameter difference after a third step from the restored
    state against a third step of the original on 8 devices.
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from conftest import record_host_matching, tiny_config  # noqa: E402
from detr_jax.checkpoints.checkpointer import Checkpointer  # noqa: E402
from detr_jax.runtime.sharding import DATA_AXIS, global_batch  # noqa: E402
from detr_jax.train.trainer import assemble  # noqa: E402
from test_train import fixed_batch  # noqa: E402

callback_shapes = record_host_matching()

# fsdp_min_mib=0: the tiny model's arrays are all far below big_vision's 4 MiB.
CONFIGS = {"replicated": tiny_config(),
           "fsdp": tiny_config(**{"train.param_sharding": "fsdp", "train.fsdp_min_mib": 0.0})}


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def max_abs_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def steps(run, state, batch, n):
    """`n` steps of `run` from a numpy `state`: (numpy state, losses)."""
    state = jax.device_put(state, run.state_sharding)
    losses = []
    for _ in range(n):
        state, metrics = run.step(state, global_batch(batch, run.mesh))
        losses.append(float(metrics["loss"]))
    return to_numpy(state), losses


def split_leaves(state) -> dict:
    """[leaves split over the data axis, all leaves] of the params and the optimizer state."""
    counts = {}
    for name in ("params", "opt_state"):
        leaves = jax.tree.leaves(getattr(state, name))
        counts[name] = [sum(DATA_AXIS in x.sharding.spec for x in leaves), len(leaves)]
    return counts


def bytes_on_device0(state) -> int:
    return sum(shard.data.nbytes for x in jax.tree.leaves(state) for shard in x.addressable_shards
               if shard.device == jax.devices()[0])


def main():
    assert jax.device_count() == 8, jax.devices()
    batch = fixed_batch(batch_size=8)
    runs = {name: assemble(CONFIGS[mode], Mesh(np.asarray(jax.devices()[:n]), (DATA_AXIS,)), 100)
            for name, n, mode in (("1/replicated", 1, "replicated"), ("8/fsdp", 8, "fsdp"), ("2/fsdp", 2, "fsdp"))}
    state0 = to_numpy(runs["1/replicated"].initial_state(CONFIGS["replicated"]))  # the same for both modes

    single, single_losses = steps(runs["1/replicated"], state0, batch, 2)
    callback_shapes.clear()
    fsdp, fsdp_losses = steps(runs["8/fsdp"], state0, batch, 2)
    results = {
        "loss_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(single_losses, fsdp_losses)),
        "params_max_diff": max_abs_diff(single.params, fsdp.params),
        "callbacks": callback_shapes[:len(callback_shapes) // 2],
    }

    on_devices = jax.device_put(fsdp, runs["8/fsdp"].state_sharding)
    kernel = on_devices.params["backbone"]["body"]["layer4_0"]["conv3"]["kernel"]
    results["sharded"] = {**split_leaves(on_devices), "example": [
        "backbone/body/layer4_0/conv3/kernel", list(kernel.shape), list(kernel.addressable_shards[0].data.shape),
        str(kernel.sharding.spec)]}
    replicated = jax.device_put(fsdp, runs["1/replicated"].state_sharding)
    results["state_bytes_per_device"] = {"fsdp": bytes_on_device0(on_devices),
                                         "replicated": bytes_on_device0(replicated)}

    continued, _ = steps(runs["8/fsdp"], fsdp, batch, 1)
    results["restored"] = {}
    with tempfile.TemporaryDirectory() as workdir:
        checkpointer = Checkpointer(workdir)
        checkpointer.save(2, on_devices, {}, {"step": 2})
        checkpointer.close()
        for name in ("2/fsdp", "1/replicated"):
            reader = Checkpointer(workdir)
            restored, _, _ = reader.restore_latest(runs[name].abstract_state)
            reader.close()
            leaves = zip(jax.tree.leaves(to_numpy(restored)), jax.tree.leaves(fsdp))
            exact = all(np.array_equal(a, b) for a, b in leaves)
            devices = {len(x.sharding.device_set) for x in jax.tree.leaves(restored)}
            results["restored"][name] = {"exact": exact, "devices": sorted(devices),
                                         "sharded": split_leaves(restored)["params"]}
        # Continued where the step is compiled already (a 2-device step would cost a compile).
        after, _ = steps(runs["1/replicated"], to_numpy(restored), batch, 1)
        results["restored"]["1/replicated"]["continued_max_diff"] = max_abs_diff(after.params, continued.params)

    print("RESULT " + json.dumps(results))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
