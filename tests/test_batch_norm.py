"""The trainable BatchNorm (detr_jax.models.batch_norm) against PyTorch's, alone and inside
RT-DETR's hybrid encoder, and its statistics in training (issue 31: "BN statistics after one
training step equal PyTorch's train() mode update").

Tolerances: 1e-5 on the normalized outputs and running statistics of one BatchNorm (float32
sums of 2 x 6 x 5 = 60 values per channel in different orders; a wrong variance, biased
where PyTorch's running one is unbiased, is off by 1/59 of it, ~1e-2 here); the encoder's
in training as its inference parity, 1e-4 (TOLERANCE of test_parity_hf).
"""

from __future__ import annotations

import copy

import jax
import numpy as np
import torch  # the `torch` extra, which .ci/run installs: this file never skips
from flax import linen as nn
from flax import traverse_util
from test_parity_hf import TOLERANCE, hf_state_dict_numpy
from test_parity_rt_detr import (
    converted, encoder_comparison, encoder_features, max_diff, nhwc, tiny_rt_detr)

from detr_jax.models.batch_norm import BatchNorm

BN_TOLERANCE = 1e-5


def _inputs(seed=0):
    return np.random.default_rng(seed).normal(2.0, 3.0, size=(2, 6, 5, 4)).astype(np.float32)


def _torch_bn(x: np.ndarray):
    """PyTorch's BatchNorm2d with random affine terms and statistics: (module, its variables as ours)."""
    bn = torch.nn.BatchNorm2d(x.shape[-1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor, low in ((bn.weight, 0.5), (bn.bias, -0.5), (bn.running_mean, -1.0), (bn.running_var, 0.5)):
            tensor.copy_(low + torch.rand(tensor.shape, generator=g))
    variables = {"params": {"scale": bn.weight.detach().numpy().copy(), "bias": bn.bias.detach().numpy().copy()},
                 "batch_stats": {"mean": bn.running_mean.numpy().copy(), "var": bn.running_var.numpy().copy()}}
    return bn, variables


def test_training_forward_and_running_statistics_equal_pytorch():
    x = _inputs()
    bn, variables = _torch_bn(x)
    expected = bn.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    ours, updated = BatchNorm(train=True).apply(variables, x, mutable=["batch_stats"])
    assert max_diff("train-mode output", ours, expected) <= BN_TOLERANCE
    assert max_diff("running mean", updated["batch_stats"]["mean"], bn.running_mean.numpy()) <= BN_TOLERANCE
    assert max_diff("running var", updated["batch_stats"]["var"], bn.running_var.numpy()) <= BN_TOLERANCE
    # The check can fail: Flax's update (a biased batch variance) is off by far more.
    _, flax_updated = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5).apply(
        variables, x, mutable=["batch_stats"])
    assert np.abs(flax_updated["batch_stats"]["var"] - bn.running_var.numpy()).max() > 100 * BN_TOLERANCE


def test_inference_is_flax_batch_norm_bit_for_bit():
    x = _inputs(1)
    _, variables = _torch_bn(x)
    ours = BatchNorm(train=False).apply(variables, x)
    flax = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax))


def test_statistics_are_of_the_whole_batch_and_not_updated_by_init_or_inference():
    x = _inputs(2)
    init = BatchNorm(train=True).init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(init["batch_stats"]["mean"], np.zeros(4, np.float32))
    _, variables = _torch_bn(x)
    _, unchanged = BatchNorm(train=False).apply(variables, x, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"], variables["batch_stats"])
    # One image's statistics are not the batch's: the two halves normalize differently alone.
    whole = BatchNorm(train=True).apply(variables, x, mutable=["batch_stats"])[0]
    half = BatchNorm(train=True).apply(variables, x[:1], mutable=["batch_stats"])[0]
    assert np.abs(np.asarray(whole[:1]) - np.asarray(half)).max() > 1e-2


def test_hybrid_encoder_in_training_equals_hf_train_mode_and_its_statistics_update():
    """The tiny HF RT-DETR encoder (with its input projections) in train() mode, one forward
    pass: every level, and every BatchNorm's running statistics afterwards."""
    encoder, variables, inputs, _ = encoder_comparison()
    model = copy.deepcopy(tiny_rt_detr()).train()
    assert model.config.dropout == 0 and model.config.activation_dropout == 0  # only BN differs in train()
    with torch.no_grad():
        projected = [proj(torch.from_numpy(f)) for proj, f in zip(model.encoder_input_proj, encoder_features())]
        reference = [nhwc(level) for level in model.encoder(inputs_embeds=projected).last_hidden_state]
    ours, updated = jax.jit(lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]))(variables, inputs)
    for level, (o, r) in enumerate(zip(ours, reference)):
        assert max_diff(f"encoder in training, level {level}", o, r) <= TOLERANCE, level
    # HF's statistics after the step, converted as a checkpoint of it would be.
    after = traverse_util.flatten_dict(converted(hf_state_dict_numpy(model), ("encoder",))[0]["batch_stats"])
    stats = traverse_util.flatten_dict(updated["batch_stats"])
    assert stats.keys() == traverse_util.flatten_dict(variables["batch_stats"]).keys()
    changed = 0
    for path, value in stats.items():
        before = traverse_util.flatten_dict(variables["batch_stats"])[path]
        changed += not np.allclose(value, before)
        assert max_diff("/".join(path), value, after[path]) <= TOLERANCE, path
    assert changed == len(stats)  # every BatchNorm's statistics moved

