"""DETR model: shapes, padding invariance, frozen BatchNorm, jit, parameter count, init."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from detr_jax.config import model_config
from detr_jax.ops.image_statistics import normalize
from detr_jax.models import BACKBONES, build_model, init_variables
from detr_jax.models.resnet import RESNETS, downsample_mask
from detr_jax.ops.nearest import nearest_indices
from detr_jax.models.position_encoding import LearnedPositionEmbedding, SinePositionEmbedding
from detr_jax.models.transformer import Transformer

TINY = dict(backbone="resnet_tiny", hidden_dim=32, num_heads=4, num_encoder_layers=2,
            num_decoder_layers=3, dim_feedforward=64, num_queries=7, num_classes=5)


def DETR(**fields):  # noqa: N802 -- the model of the default `model` section with `fields` changed
    config = model_config()
    config.update(fields)
    return build_model(config)


def Backbone(name, dilation=False):  # noqa: N802 -- the named backbone of the default `model` section
    config = model_config()
    config.update(dilation=dilation)
    return BACKBONES[name](config, jnp.float32)


def _padded_batch(rng, sizes, canvas):
    """Random images of `sizes` (h, w) padded into `canvas`; returns images, mask."""
    images = rng.normal(size=(len(sizes), *canvas, 3)).astype(np.float32)
    mask = np.zeros((len(sizes), *canvas), bool)
    for i, (h, w) in enumerate(sizes):
        mask[i, :h, :w] = True
    return images, mask


@pytest.fixture(scope="module")
def tiny():
    model = DETR(**TINY)
    variables = init_variables(model, jax.random.key(0))
    return model, variables


def _jit_apply(model):
    """Jitted apply (eager op-by-op dispatch of a whole DETR is slow on CPU)."""
    return jax.jit(model.apply, static_argnames="train")


def test_output_shapes_all_decoder_layers(tiny):
    model, variables = tiny
    images, mask = _padded_batch(np.random.default_rng(0), [(96, 128), (64, 80)], (96, 128))
    out = _jit_apply(model)(variables, images, mask)
    assert out["pred_logits"].shape == (3, 2, 7, 6)  # [L, B, Q, num_classes + 1]
    assert out["pred_boxes"].shape == (3, 2, 7, 4)
    assert out["pred_logits"].dtype == jnp.float32
    boxes = np.asarray(out["pred_boxes"])
    assert np.all((boxes > 0) & (boxes < 1))
    # Each decoder layer gives its own predictions (the aux outputs are not copies).
    assert not np.allclose(out["pred_logits"][0], out["pred_logits"][-1])


def test_padded_pixel_values_change_nothing(tiny):
    model, variables = tiny
    rng = np.random.default_rng(1)
    images, mask = _padded_batch(rng, [(96, 128), (50, 70)], (96, 128))
    other = np.where(mask[..., None], images, rng.normal(size=images.shape) * 100).astype(np.float32)
    apply = _jit_apply(model)
    a = apply(variables, images, mask)
    b = apply(variables, other, mask)
    # Padded pixels are zeroed before the backbone, so the results are bitwise equal.
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_uint8_pixels_are_normalized_on_device_as_the_host_did(tiny):
    """The pipeline hands over uint8 pixels; the model's normalization inside jit must give
    what the earlier host path fed it: (x / 255 - mean) / std in float32, zero padding.
    Tolerance 0: the same two float32 operations (subtract, multiply) on both sides, which
    XLA:CPU does not contract into one, so values and outputs are bitwise equal."""
    model, variables = tiny
    rng = np.random.default_rng(2)
    _, mask = _padded_batch(rng, [(96, 128), (50, 70)], (96, 128))
    pixels = np.where(mask[..., None], rng.integers(0, 256, (2, 96, 128, 3)), 0).astype(np.uint8)
    host = np.where(mask[..., None], normalize(pixels), 0).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(normalize)(pixels))[mask], host[mask])
    apply = _jit_apply(model)
    a, b = apply(variables, pixels, mask), apply(variables, host, mask)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_sine_encoding_ignores_padding():
    # An image alone vs. the same image inside a larger padded canvas: equal at real positions.
    pe = SinePositionEmbedding(num_pos_feats=16)
    small = np.ones((1, 5, 7), bool)
    big = np.zeros((1, 9, 12), bool)
    big[0, :5, :7] = True
    p_small = pe.apply({}, small)
    p_big = pe.apply({}, big)
    assert p_small.shape == (1, 5, 7, 32)
    # Tolerance 1e-6: only float32 rounding of identical arithmetic on equal inputs.
    np.testing.assert_allclose(p_big[:, :5, :7], p_small, atol=1e-6)


def test_sine_encoding_known_values():
    pe = SinePositionEmbedding(num_pos_feats=4, normalize=False)
    mask = np.ones((1, 2, 3), bool)
    pos = np.asarray(pe.apply({}, mask))
    # Unnormalized: y = row + 1, x = col + 1; dim_t = [1, 1, 100, 100] (temperature 1e4, 4 feats).
    y, x = 2.0, 3.0
    expect_y = [np.sin(y), np.cos(y), np.sin(y / 100), np.cos(y / 100)]
    expect_x = [np.sin(x), np.cos(x), np.sin(x / 100), np.cos(x / 100)]
    np.testing.assert_allclose(pos[0, 1, 2], expect_y + expect_x, rtol=1e-6)


def test_learned_encoding_layout_and_limit():
    pe = LearnedPositionEmbedding(num_pos_feats=8, max_size=10)
    mask = np.ones((2, 3, 4), bool)
    variables = pe.init(jax.random.key(0), mask)
    pos = np.asarray(pe.apply(variables, mask))
    row, col = np.asarray(variables["params"]["row_embed"]), np.asarray(variables["params"]["col_embed"])
    np.testing.assert_array_equal(pos[1, 2, 3], np.concatenate([col[3], row[2]]))  # x first, then y
    with pytest.raises(ValueError, match="at most 10x10"):
        pe.apply(variables, np.ones((1, 11, 4), bool))


def test_attention_ignores_padded_tokens():
    """Extra padded key tokens with arbitrary values leave every decoder output unchanged."""
    transformer = Transformer(num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                              dim_feedforward=32, dropout=0.0)
    rng = np.random.default_rng(2)
    src = rng.normal(size=(2, 10, 16)).astype(np.float32)
    pos = rng.normal(size=(2, 10, 16)).astype(np.float32)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    mask = np.ones((2, 10), bool)
    variables = transformer.init(jax.random.key(0), src, mask, queries, pos)
    hs, memory = transformer.apply(variables, src, mask, queries, pos)

    garbage = (rng.normal(size=(2, 6, 16)) * 50).astype(np.float32)
    src_p = np.concatenate([src, garbage], axis=1)
    pos_p = np.concatenate([pos, garbage], axis=1)
    mask_p = np.concatenate([mask, np.zeros((2, 6), bool)], axis=1)
    hs_p, memory_p = transformer.apply(variables, src_p, mask_p, queries, pos_p)
    # Tolerance 1e-5: masked keys get exactly zero weight; only the softmax's summation
    # order over a longer row differs.
    np.testing.assert_allclose(hs_p, hs, atol=1e-5)
    np.testing.assert_allclose(memory_p[:, :10], memory, atol=1e-5)


def test_frozen_batchnorm_not_trainable_and_unchanged(tiny):
    model, variables = tiny
    frozen = variables["frozen_bn"]
    # Every BN of the backbone has its four frozen values, none of them in params.
    bn = frozen["backbone"]["body"]["bn1"]
    assert set(bn) == {"scale", "bias", "mean", "var"}
    param_paths = {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])}
    assert not any("bn" in p for p in param_paths)

    images, mask = _padded_batch(np.random.default_rng(3), [(64, 64)], (64, 64))

    def loss_fn(params):
        out = model.apply({"params": params, "frozen_bn": frozen}, images, mask, train=True,
                          rngs={"dropout": jax.random.key(1)})
        return jnp.mean(out["pred_boxes"]) + jnp.mean(out["pred_logits"] ** 2)

    grads = jax.jit(jax.grad(loss_fn))(variables["params"])
    opt = optax.adamw(1e-2)
    updates, _ = opt.update(grads, opt.init(variables["params"]), variables["params"])
    new_params = optax.apply_updates(variables["params"], updates)
    # The step changes the backbone's trainable convs but not its frozen statistics.
    assert not np.allclose(new_params["backbone"]["body"]["layer4_0"]["conv2"]["kernel"],
                           variables["params"]["backbone"]["body"]["layer4_0"]["conv2"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, frozen, variables["frozen_bn"])


def test_group_norm_backbone_is_trainable_and_has_no_frozen_statistics():
    """backbone_norm="group_norm" (from-scratch backbones): every BatchNorm slot holds a
    trainable GroupNorm (scale, bias in params) and the frozen_bn collection is empty."""
    model = DETR(**TINY, backbone_norm="group_norm")
    variables = init_variables(model, jax.random.key(0))
    assert variables["frozen_bn"] == {}
    body = variables["params"]["backbone"]["body"]
    assert set(body["bn1"]) == {"scale", "bias"}
    assert set(body["layer2_0"]["downsample_bn"]) == {"scale", "bias"}
    # Same parameters as the frozen-BN model otherwise.
    frozen_model_params = init_variables(DETR(**TINY), jax.random.key(0))["params"]
    n_norm = sum(x.size for name, x in jax.tree_util.tree_leaves_with_path(body) if "bn" in jax.tree_util.keystr(name))
    n_all = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n_all - n_norm == sum(x.size for x in jax.tree.leaves(frozen_model_params))
    # The features are normalized per group: the stem's output is scale-invariant in the input.
    images, mask = _padded_batch(np.random.default_rng(4), [(64, 64)], (64, 64))
    apply = _jit_apply(model)
    out = apply(variables, images, mask)
    out_scaled = apply(variables, 10.0 * images, mask)
    np.testing.assert_allclose(out_scaled["pred_boxes"], out["pred_boxes"], atol=1e-4)


def test_group_norm_groups():
    from detr_jax.models.resnet import group_norm_groups

    assert [group_norm_groups(c) for c in (8, 16, 32, 64, 128, 256, 2048, 12)] == [2, 4, 8, 16, 32, 32, 32, 3]


def test_jit_equals_eager(tiny):
    model, variables = tiny
    images, mask = _padded_batch(np.random.default_rng(4), [(64, 96), (40, 96)], (64, 96))
    eager = model.apply(variables, images, mask)
    jitted = jax.jit(model.apply)(variables, images, mask)
    # Tolerance 1e-5: XLA may fuse/reorder float32 ops under jit.
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], atol=1e-5)


def test_dropout_active_only_in_training(tiny):
    model, variables = tiny
    images, mask = _padded_batch(np.random.default_rng(5), [(64, 64)], (64, 64))
    apply = _jit_apply(model)
    eval_a = apply(variables, images, mask, train=False)
    eval_b = apply(variables, images, mask, train=False)
    np.testing.assert_array_equal(eval_a["pred_logits"], eval_b["pred_logits"])
    train_a = apply(variables, images, mask, train=True, rngs={"dropout": jax.random.key(0)})
    train_b = apply(variables, images, mask, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train_a["pred_logits"], train_b["pred_logits"])


def _param_count(model, image_size=(64, 64)):
    shapes = jax.eval_shape(
        lambda r: model.init({"params": r}, jnp.zeros((1, *image_size, 3)), jnp.ones((1, *image_size), bool)),
        jax.random.key(0))
    return (sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])),
            sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["frozen_bn"])))


def test_parameter_count_r50_matches_reference():
    params, frozen = _param_count(DETR(backbone="resnet50", num_classes=91))
    assert params == 41_524_768  # official DETR-R50, stem and first stage included
    assert frozen == 4 * 26_560  # scale, bias, mean, var of the 53 BN layers of ResNet-50


def test_parameter_count_r101_and_variants():
    r50, _ = _param_count(DETR(backbone="resnet50"))
    r101, _ = _param_count(DETR(backbone="resnet101"))
    # ResNet-101 adds 17 bottlenecks of width 256 to stage 3 (each 1024->256->256->1024).
    assert r101 - r50 == 17 * (1024 * 256 + 256 * 256 * 9 + 256 * 1024)
    dc5, _ = _param_count(DETR(backbone="resnet50", dilation=True))
    assert dc5 == r50  # dilation changes strides, not weights
    pre, _ = _param_count(DETR(backbone="resnet50", pre_norm=True))
    assert pre == r50 + 2 * 256  # the final encoder LayerNorm
    learned, _ = _param_count(DETR(backbone="resnet50", position_embedding="learned"))
    assert learned == r50 + 2 * 50 * 128


def test_feature_stride_and_dc5():
    images = jnp.zeros((1, 128, 96, 3))
    mask = jnp.ones((1, 128, 96), bool)
    for dilation, stride in ((False, 32), (True, 16)):
        backbone = Backbone("resnet_tiny", dilation=dilation)
        variables = jax.jit(backbone.init)(jax.random.key(0), images, mask)
        features, feature_mask, _ = jax.jit(backbone.apply)(variables, images, mask)
        assert features.shape == (1, 128 // stride, 96 // stride, RESNETS["resnet_tiny"].num_channels)
        assert feature_mask.shape == features.shape[:3]


def _conv3x3_dilations(resnet, dilation):
    backbone = Backbone(resnet, dilation=dilation)
    images, mask = jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 64, 64), bool)
    variables = jax.eval_shape(lambda r: backbone.init(r, images, mask), jax.random.key(0))
    jaxpr = jax.make_jaxpr(backbone.apply)(variables, images, mask)
    return [tuple(eqn.params["rhs_dilation"]) for eqn in jaxpr.jaxpr.eqns
            if eqn.primitive.name == "conv_general_dilated" and eqn.invars[1].aval.shape[:2] == (3, 3)]


def test_dc5_dilates_all_but_first_block_of_last_stage():
    # torchvision's replace_stride_with_dilation: block 0 of layer4 keeps the previous
    # dilation (1) and loses its stride; blocks 1 and 2 use dilation 2.
    assert _conv3x3_dilations("resnet50", False) == [(1, 1)] * 16
    assert _conv3x3_dilations("resnet50", True) == [(1, 1)] * 14 + [(2, 2)] * 2


def test_mask_downsampling_nearest():
    # PyTorch nearest: src = floor(dst * in / out), e.g. 10 -> 4 picks rows 0, 2, 5, 7.
    np.testing.assert_array_equal(nearest_indices(10, 4), [0, 2, 5, 7])
    np.testing.assert_array_equal(nearest_indices(7, 7), np.arange(7))
    mask = np.zeros((1, 10, 10), bool)
    mask[0, :6, :3] = True
    small = np.asarray(downsample_mask(jnp.asarray(mask), 4, 4))
    expected = mask[:, [0, 2, 5, 7]][:, :, [0, 2, 5, 7]]
    np.testing.assert_array_equal(small, expected)


def test_initialization_matches_reference_bounds():
    model = DETR(backbone="resnet_tiny", hidden_dim=64, num_heads=4, num_encoder_layers=1,
                 num_decoder_layers=1, dim_feedforward=128, num_queries=5, num_classes=3)
    params = init_variables(model, jax.random.key(0))["params"]
    e = 64
    q = np.asarray(params["transformer"]["encoder_layer0"]["self_attn"]["q_proj"]["kernel"])
    # Slice of PyTorch's xavier-uniform fused [3E, E] in_proj: U(+-sqrt(6 / 4E)).
    bound = np.sqrt(6 / (4 * e))
    assert np.abs(q).max() <= bound and np.abs(q).max() > 0.9 * bound
    out = np.asarray(params["transformer"]["encoder_layer0"]["self_attn"]["out_proj"]["kernel"])
    assert np.abs(out).max() <= np.sqrt(6 / (2 * e)) and np.abs(out).max() > 0.9 * np.sqrt(6 / (2 * e))
    np.testing.assert_array_equal(params["transformer"]["encoder_layer0"]["self_attn"]["q_proj"]["bias"], 0)
    cls = np.asarray(params["class_embed"]["kernel"])  # torch Linear default: U(+-1/sqrt(fan_in))
    assert np.abs(cls).max() <= 1 / np.sqrt(e)
    assert abs(np.std(params["query_embed"]) - 1.0) < 0.15  # nn.Embedding: N(0, 1)


def test_bfloat16_compute_close_to_float32(tiny):
    model, variables = tiny
    model_bf16 = DETR(**TINY, dtype="bfloat16")
    images, mask = _padded_batch(np.random.default_rng(6), [(64, 64)], (64, 64))
    out32 = _jit_apply(model)(variables, images, mask)
    out16 = _jit_apply(model_bf16)(variables, images, mask)
    assert out16["pred_logits"].dtype == jnp.float32  # outputs are always float32
    # bfloat16 keeps ~3 significant digits; through ~20 layers, 0.05 on sigmoid boxes is loose but
    # catches a broken cast (which gives errors of order 1).
    np.testing.assert_allclose(out16["pred_boxes"], out32["pred_boxes"], atol=0.05)
