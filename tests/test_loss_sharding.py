"""The loss with the batch sharded over 8 CPU devices equals the single-device loss.

Runs tests/sharded_loss_worker.py in a subprocess (XLA_FLAGS must be set before jax is
imported) with a timeout, so a deadlock fails the test instead of hanging the suite.
"""

import pathlib

import pytest

from conftest import run_worker

WORKER = pathlib.Path(__file__).with_name("sharded_loss_worker.py")
TIMEOUT_S = 300
L, B, Q, M = 3, 16, 6, 4  # as in the worker


@pytest.fixture(scope="module")
def worker_result():
    return run_worker(WORKER, TIMEOUT_S, "sharded loss")


RUNS = ["mesh/jit", "mesh/shard_map", "make_mesh/jit", "make_mesh/shard_map"]


@pytest.mark.parametrize("run", RUNS)
def test_sharded_loss_and_gradients_equal_single_device(worker_result, run):
    # Same float32 arithmetic, only the order of the cross-device sums differs: the loss
    # (~20) and gradients (<1) agree to a few ulps, so an absolute 1e-5 bound. A per-device
    # normalization (num_boxes or the CE weight sum) would be off by far more: the worker's
    # devices hold 0 to 8 targets each.
    assert worker_result[run]["diff"] < 1e-5


@pytest.mark.parametrize("run", RUNS)
def test_each_device_matches_its_own_shard(worker_result, run):
    # 8 callbacks per step, each on one device's 2 images, all layers at once; the
    # partitioner left alone would make one callback on the gathered 16.
    assert worker_result[run]["callbacks"] == [[L, B // 8, Q, M]] * 8


def test_normalizer_is_the_global_box_count(worker_result):
    assert worker_result["num_boxes"] == 28.0
    assert worker_result["loss"] > 1.0


@pytest.mark.parametrize("run", ["single/device_matcher", "mesh/device_matcher", "make_mesh/device_matcher"])
def test_device_matcher_step_equals_the_host_matcher_step(worker_result, run):
    # The worker's costs are continuous random numbers: every problem has one optimum, so
    # both solvers pick the same assignment and the loss and gradients agree as above
    # (1e-5); the device matcher makes no host callback, on 1 device or 8.
    assert worker_result[run]["diff"] < 1e-5
    assert worker_result[run]["callbacks"] == []
