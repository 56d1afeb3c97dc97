"""train.param_sharding: big_vision's fsdp rule, the config check, and fsdp training on 8
simulated devices against one device, with a sharded checkpoint restored on 2 and 1.

The multi-device checks run tests/param_sharding_worker.py in a subprocess (XLA_FLAGS must
be set before jax is imported) with a timeout.
"""

import pathlib

import pytest
from jax.sharding import PartitionSpec as P

from conftest import run_worker, tiny_config
from detr_jax.config import ConfigError
from detr_jax.runtime.sharding import fsdp_spec

WORKER = pathlib.Path(__file__).with_name("param_sharding_worker.py")
TIMEOUT_S = 400
MIB = 2**20


def test_fsdp_rule_splits_the_largest_divisible_dimension():
    assert fsdp_spec((1, 1, 64, 256), 64 * MIB, 8, 4 * MIB) == P(None, None, None, "data")
    assert fsdp_spec((2048, 256), 2 * MIB, 8, 0) == P("data", None)
    assert fsdp_spec((100, 24), 64 * MIB, 8, 4 * MIB) == P(None, "data")  # 100 is not a multiple of 8
    assert fsdp_spec((256, 256), 64 * MIB, 8, 4 * MIB) == P("data", None)  # a tie: the first
    assert fsdp_spec((7, 9), 64 * MIB, 8, 4 * MIB) == P()  # no dimension divides
    assert fsdp_spec((2048, 256), 2 * MIB, 8, 4 * MIB) == P()  # small: whole on every device
    assert fsdp_spec((), 4, 8, 0) == P()  # the step counter


def test_bad_param_sharding_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.param_sharding='zero3': expected one of \('fsdp', 'replicated'\)"):
        tiny_config(**{"train.param_sharding": "zero3"})
    with pytest.raises(ConfigError, match=r"train.fsdp_min_mib=-1.0 must be >= 0"):
        tiny_config(**{"train.fsdp_min_mib": -1.0})


@pytest.fixture(scope="module")
def worker_result():
    return run_worker(WORKER, TIMEOUT_S, "the fsdp worker")


def test_fsdp_on_8_devices_equals_one_device(worker_result):
    # Not bitwise: the partitioned program sums the loss, the gradients and their norm over
    # devices in another order. Measured 8e-8 relative on the loss and 5e-8 on parameters;
    # bounds 1e-6 and 2e-6 (test_train's for data parallelism), while a wrong step would be
    # off by ~1e-4 (an Adam step of lr 1e-4) somewhere.
    assert worker_result["loss_rel_diff"] < 1e-6
    assert worker_result["params_max_diff"] < 2e-6


def test_fsdp_state_is_split_over_the_devices(worker_result):
    sharded = worker_result["sharded"]
    # With fsdp_min_mib=0 every parameter with a dimension divisible by 8 is split (96 of
    # the tiny model's 98), and so are Adam's two moments of each trained one (the frozen
    # stem and first stage have none).
    assert sharded["params"] == [96, 98]
    assert sharded["opt_state"][0] > sharded["params"][0]
    assert sharded["example"] == ["backbone/body/layer4_0/conv3/kernel", [1, 1, 64, 256], [1, 1, 64, 32],
                                  "P(None, None, None, 'data')"]
    per_device = worker_result["state_bytes_per_device"]
    assert per_device["fsdp"] < per_device["replicated"] / 7


def test_the_host_matcher_still_runs_per_device(worker_result):
    # One callback per device on its own image (all 2 decoder layers), as with replicated parameters.
    assert worker_result["callbacks"] == [[2, 1, 6, 4]] * 8


@pytest.mark.parametrize("name", ["2/fsdp", "1/replicated"])
def test_fsdp_checkpoint_restores_on_other_device_counts(worker_result, name):
    restored = worker_result["restored"][name]
    assert restored["exact"]  # orbax reads each device's part of the saved arrays: bitwise
    assert restored["devices"] == [int(name[0])]
    assert (restored["sharded"][0] > 0) == (name == "2/fsdp")


def test_training_continues_from_a_restored_fsdp_checkpoint(worker_result):
    # A third step on 1 device from the restored state against a third step on the 8 devices
    # that saved it: the same tolerance as the two steps above.
    assert worker_result["restored"]["1/replicated"]["continued_max_diff"] < 2e-6
