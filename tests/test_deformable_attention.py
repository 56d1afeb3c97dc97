"""Multi-scale deformable attention against Hugging Face transformers' pure PyTorch path.

The sampling core against `MultiScaleDeformableAttention` (the reference's
`ms_deform_attn_core_pytorch`: `grid_sample`, align_corners=False, zero padding), on
locations inside, outside and exactly on the borders of the maps; the module against
`DeformableDetrMultiscaleDeformableAttention` with its random weights copied (padding mask,
2-d and 4-d reference points), and its initialization; gradients against torch autograd
and by finite differences in float64; two deliberate mistakes (align_corners=True, padding
not zeroed) shown to fail the comparison; jit, vmap, shard_map and bfloat16.

Tolerances: 1e-5 absolute in float32 for outputs of size ~1 (measured differences ~1e-7 to
1e-6: the two sides compute the same sums, and differ only by float32 rounding, e.g. of
grid_sample's ((2 loc - 1 + 1) * w - 1) / 2 against our loc * w - 0.5, and the order of
additions); gradients 1e-5 relative to their largest entry (the location gradients scale
with the map's width).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from jax.test_util import check_grads

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DeformableDetrConfig, RTDetrV2Config  # noqa: E402
from transformers.models.deformable_detr.modeling_deformable_detr import (  # noqa: E402
    DeformableDetrMultiscaleDeformableAttention,
    DeformableDetrPreTrainedModel,
    MultiScaleDeformableAttention as ReferenceCore,
)
from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import RTDetrV2MultiscaleDeformableAttention  # noqa: E402

from detr_jax.ops.formulation import ONNXRUNTIME, XLA, formulated_for  # noqa: E402
from detr_jax.models.deformable_attention import (  # noqa: E402
    SAMPLING_LOCATIONS,
    SAMPLING_WEIGHTS,
    MultiScaleDeformableAttention,
    ms_deform_attn_sample,
)

SHAPES = ((6, 8), (3, 4), (2, 2))
S = sum(h * w for h, w in SHAPES)
B, Q, E, HEADS, POINTS = 2, 5, 16, 2, 2
LEVELS, HEAD_DIM = len(SHAPES), E // HEADS
ATOL = 1e-5
GRAD_RTOL = 1e-5


def core_inputs(seed: int, borders: bool = True):
    """value [B, S, H, Dh], locations [B, Q, H, L, P, 2] in [-0.3, 1.3] (about a third of
    them off the map), weights [B, Q, H, L, P]; with `borders`, some coordinates exactly on
    the maps' edges (0, 1), on pixel edges (j / w) and centers ((j + 0.5) / w), and far off."""
    rng = np.random.default_rng(seed)
    value = rng.normal(size=(B, S, HEADS, HEAD_DIM)).astype(np.float32)
    locations = rng.uniform(-0.3, 1.3, size=(B, Q, HEADS, LEVELS, POINTS, 2)).astype(np.float32)
    weights = rng.uniform(size=(B, Q, HEADS, LEVELS, POINTS)).astype(np.float32)
    if borders:
        for level, (h, w) in enumerate(SHAPES):
            special = np.array([0.0, 1.0, 1 / w, (w - 1) / w, 0.5 / w, (w - 0.5) / w, -5.0, 7.0], np.float32)
            locations[0, :, 0, level, 0, 0] = special[:Q]
            locations[1, :, 1, level, 1, 1] = special[-Q:] * w / h
    return value, locations, weights


def reference_core(value, locations, weights) -> np.ndarray:
    """transformers' pure PyTorch sampling core on the same inputs."""
    out = ReferenceCore()(torch.tensor(value), torch.tensor(SHAPES), list(SHAPES), None, torch.tensor(locations),
                          torch.tensor(weights), 64)
    return out.numpy()


def ours_core(value, locations, weights, dtype=jnp.float32) -> np.ndarray:
    return np.asarray(ms_deform_attn_sample(jnp.asarray(value, dtype), SHAPES, jnp.asarray(locations),
                                            jnp.asarray(weights, dtype)).astype(jnp.float32))


@pytest.mark.parametrize("target", [XLA, ONNXRUNTIME])
def test_core_matches_reference(target):
    """Both formulations: the scan over levels (XLA) and the levels unrolled (the ONNX export)."""
    for seed in range(3):
        value, locations, weights = core_inputs(seed)
        with formulated_for(target):
            ours = ours_core(value, locations, weights)
        np.testing.assert_allclose(ours, reference_core(value, locations, weights), atol=ATOL, rtol=0)


def test_core_at_pixel_centers_reads_pixels():
    """Independently of torch: a location on a pixel center reads that pixel; the map's
    corner (0, 0) lies between 4 pixels of which 3 are off the map: 1/4 of the first."""
    value, _, _ = core_inputs(0)
    h, w = SHAPES[1]
    start = SHAPES[0][0] * SHAPES[0][1]
    locations = np.zeros((B, Q, HEADS, LEVELS, POINTS, 2), np.float32)
    weights = np.zeros((B, Q, HEADS, LEVELS, POINTS), np.float32)
    weights[:, :, :, 1, 0] = 1
    locations[:, :, :, 1, 0] = [(2 + 0.5) / w, (1 + 0.5) / h]  # pixel (row 1, column 2)
    out = ours_core(value, locations, weights).reshape(B, Q, HEADS, HEAD_DIM)
    np.testing.assert_allclose(out, np.broadcast_to(value[:, None, start + 1 * w + 2], out.shape), atol=1e-6)
    locations[:, :, :, 1, 0] = 0.0
    out = ours_core(value, locations, weights).reshape(B, Q, HEADS, HEAD_DIM)
    np.testing.assert_allclose(out, np.broadcast_to(0.25 * value[:, None, start], out.shape), atol=1e-6)


def test_align_corners_true_is_caught(monkeypatch):
    """The comparison above would catch align_corners=True sampling: the reference with it
    differs from ours by orders of magnitude more than the tolerance."""
    value, locations, weights = core_inputs(0)
    grid_sample = torch.nn.functional.grid_sample
    monkeypatch.setattr(torch.nn.functional, "grid_sample",
                        lambda *args, **kwargs: grid_sample(*args, **{**kwargs, "align_corners": True}))
    diff = np.abs(ours_core(value, locations, weights) - reference_core(value, locations, weights)).max()
    assert diff > 1000 * ATOL, diff


def test_gradients_match_torch():
    value, locations, weights = core_inputs(1, borders=False)
    cotangent = np.random.default_rng(2).normal(size=(B, Q, E)).astype(np.float32)
    torch_inputs = [torch.tensor(x, requires_grad=True) for x in (value, locations, weights)]
    out = ReferenceCore()(torch_inputs[0], torch.tensor(SHAPES), list(SHAPES), None, torch_inputs[1],
                          torch_inputs[2], 64)
    (out * torch.tensor(cotangent)).sum().backward()
    _, vjp = jax.vjp(lambda v, loc, wts: ms_deform_attn_sample(v, SHAPES, loc, wts),
                     *map(jnp.asarray, (value, locations, weights)))
    for name, ours, theirs in zip(("value", "locations", "weights"), vjp(jnp.asarray(cotangent)), torch_inputs):
        theirs = theirs.grad.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=GRAD_RTOL * np.abs(theirs).max(), rtol=0,
                                   err_msg=name)


def test_check_grads_float64():
    """Finite differences in float64, up to second order, on a tiny case whose sampling
    points are at least a quarter pixel from the pixel grid's kinks (the interpolation is
    only piecewise smooth); some cells hang off the map."""
    shapes = ((3, 4), (2, 2))
    rng = np.random.default_rng(3)
    size = np.array([(w, h) for h, w in shapes], np.float64)[:, None, :]  # [L, 1, 2]
    pixel = rng.integers(-1, 4, size=(1, 2, 2, 2, 2, 2)) + rng.uniform(0.25, 0.75, size=(1, 2, 2, 2, 2, 2))
    with jax.enable_x64(True):
        value = jnp.asarray(rng.normal(size=(1, 16, 2, 3)))
        locations = jnp.asarray((pixel + 0.5) / size)
        weights = jnp.asarray(rng.uniform(size=(1, 2, 2, 2, 2)))
        assert ms_deform_attn_sample(value, shapes, locations, weights).dtype == jnp.float64
        check_grads(lambda v, loc, wts: ms_deform_attn_sample(v, shapes, loc, wts), (value, locations, weights),
                    order=2, modes=("fwd", "rev"))


def hf_config() -> DeformableDetrConfig:
    return DeformableDetrConfig(d_model=E, encoder_attention_heads=HEADS, num_feature_levels=LEVELS,
                                encoder_n_points=POINTS, use_timm_backbone=False)


def hf_attention(seed: int = 0) -> DeformableDetrMultiscaleDeformableAttention:
    """HF's module with random weights (nn.Linear's default init); the offsets' weight x4,
    so that the offsets reach a few pixels and the samples leave the maps."""
    torch.manual_seed(seed)
    attn = DeformableDetrMultiscaleDeformableAttention(hf_config(), num_heads=HEADS, n_points=POINTS).eval()
    with torch.no_grad():
        attn.sampling_offsets.weight.mul_(4)
    return attn


def to_flax(attn) -> dict:
    return {"params": {name: {"kernel": jnp.asarray(getattr(attn, name).weight.detach().numpy().T),
                              "bias": jnp.asarray(getattr(attn, name).bias.detach().numpy())}
                       for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")}}


def module_inputs(coordinates: int, seed: int = 0):
    """query, query_pos [B, Q, E], value [B, S, E], value_mask [B, S] (image 1 padded at the
    bottom and right of every level), reference points [B, Q, L, coordinates]."""
    rng = np.random.default_rng(seed)
    query, query_pos = (rng.normal(size=(B, Q, E)).astype(np.float32) for _ in range(2))
    value = rng.normal(size=(B, S, E)).astype(np.float32)
    masks = []
    for h, w in SHAPES:
        level = np.ones((B, h, w), bool)
        level[1, -(-2 * h // 3):] = False
        level[1, :, -(-3 * w // 4):] = False
        masks.append(level.reshape(B, h * w))
    mask = np.concatenate(masks, 1)
    centers = rng.uniform(0.0, 1.0, size=(B, Q, LEVELS, 2))
    if coordinates == 4:
        centers = np.concatenate([rng.uniform(0.2, 0.8, size=(B, Q, LEVELS, 2)),
                                  rng.uniform(0.1, 0.6, size=(B, Q, LEVELS, 2))], -1)
    return query, query_pos, value, mask, centers.astype(np.float32)


def run_hf(attn, query, query_pos, value, mask, reference_points):
    t = torch.tensor
    with torch.no_grad():
        out, weights = attn(hidden_states=t(query), attention_mask=None if mask is None else t(mask),
                            encoder_hidden_states=t(value), position_embeddings=t(query_pos),
                            reference_points=t(reference_points), spatial_shapes=t(SHAPES),
                            spatial_shapes_list=list(SHAPES),
                            level_start_index=t(np.cumsum([0] + [h * w for h, w in SHAPES[:-1]])))
    return out.numpy(), weights.numpy()


def run_ours(variables, query, query_pos, value, mask, reference_points, dtype=jnp.float32):
    module = MultiScaleDeformableAttention(E, HEADS, LEVELS, POINTS, dtype=dtype)
    out, state = module.apply(variables, jnp.asarray(query), jnp.asarray(reference_points), jnp.asarray(value),
                              SHAPES, jnp.asarray(mask), jnp.asarray(query_pos), mutable=["intermediates"])
    return out, state["intermediates"]


@pytest.mark.parametrize("coordinates", [2, 4])
def test_module_matches_hf(coordinates):
    attn = hf_attention()
    inputs = module_inputs(coordinates)
    hf_out, hf_weights = run_hf(attn, *inputs)
    out, sown = run_ours(to_flax(attn), *inputs)
    np.testing.assert_allclose(np.asarray(out), hf_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(sown[SAMPLING_WEIGHTS][0]), hf_weights, atol=1e-6, rtol=0)
    assert sown[SAMPLING_LOCATIONS][0].shape == (B, Q, HEADS, LEVELS, POINTS, 2)
    assert sown[SAMPLING_LOCATIONS][0].dtype == jnp.float32
    # The samples do leave the maps, so zero padding is exercised.
    locations = np.asarray(sown[SAMPLING_LOCATIONS][0])
    assert ((locations < 0) | (locations > 1)).mean() > 0.05


def test_unzeroed_padding_is_caught():
    """Without zeroing the padded values (HF given no mask) the output moves by far more
    than the tolerance, so the comparison above checks the mask and its polarity."""
    attn = hf_attention()
    query, query_pos, value, mask, reference_points = module_inputs(2)
    hf_unmasked, _ = run_hf(attn, query, query_pos, value, None, reference_points)
    out, _ = run_ours(to_flax(attn), query, query_pos, value, mask, reference_points)
    assert np.abs(np.asarray(out) - hf_unmasked).max() > 1000 * ATOL
    # Image 0 has no padding: there both agree.
    np.testing.assert_allclose(np.asarray(out)[0], hf_unmasked[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("heads", [2, 8])
def test_init_matches_hf(heads):
    """HF's `_init_weights` on a fresh module against ours: the offsets' bias (the directional
    grid) bit for bit, the zero weights and biases; xavier-uniform projections in bounds."""

    class Holder(DeformableDetrPreTrainedModel):  # `_init_weights` needs a PreTrainedModel with the config
        pass

    config = hf_config()
    attn = DeformableDetrMultiscaleDeformableAttention(config, num_heads=heads, n_points=POINTS)
    Holder(config)._init_weights(attn)
    module = MultiScaleDeformableAttention(E, heads, LEVELS, POINTS)
    query, query_pos, value, mask, reference_points = module_inputs(2)
    params = module.init(jax.random.PRNGKey(0), query, reference_points, value, SHAPES, mask)["params"]
    np.testing.assert_array_equal(np.asarray(params["sampling_offsets"]["bias"]),
                                  attn.sampling_offsets.bias.detach().numpy())
    for name in ("sampling_offsets", "attention_weights"):
        assert not np.any(np.asarray(params[name]["kernel"])), name
    for name in ("attention_weights", "value_proj", "output_proj"):
        assert not np.any(np.asarray(params[name]["bias"])), name
    for name in ("value_proj", "output_proj"):
        kernel = np.asarray(params[name]["kernel"])
        assert kernel.shape == (E, E)
        assert 0.5 * np.sqrt(3 / E) < np.abs(kernel).max() <= np.sqrt(3 / E), name  # bound sqrt(6 / (E + E))


# RT-DETRv2's points per level (ragged), as official RT-DETRv2's num_points_list allows.
V2_POINTS = (2, 3, 1)


def hf_v2_attention(method: str, seed: int = 0) -> RTDetrV2MultiscaleDeformableAttention:
    """HF's RT-DETRv2 attention (nn.Linear's default init, the offsets' weight x4 as
    hf_attention's) with V2_POINTS: built for 2 points on each of the 3 levels (the same
    sum(P_l) = 6 projections) and then given V2_POINTS as its n_points_list and
    n_points_scale, which its forward and `multi_scale_deformable_attention_v2` read."""
    torch.manual_seed(seed)
    config = RTDetrV2Config(d_model=E, decoder_attention_heads=HEADS, decoder_n_levels=LEVELS,
                            decoder_n_points=sum(V2_POINTS) // LEVELS, decoder_offset_scale=0.7, decoder_method=method)
    attn = RTDetrV2MultiscaleDeformableAttention(config).eval()
    attn.n_points_list = list(V2_POINTS)
    with torch.no_grad():
        attn.sampling_offsets.weight.mul_(4)
        attn.n_points_scale.copy_(torch.tensor([1 / n for n in V2_POINTS for _ in range(n)]))
    return attn


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_rt_detr_v2_points_per_level_and_sampling_match_hf(method):
    """Points per level, the offset scale and both sampling methods (ours "bilinear" is
    HF's "default") against HF's RTDetrV2MultiscaleDeformableAttention, on box references
    (one per query, as its decoder passes them) and a padding mask; samples leave the maps
    (the discrete method clamps them onto the edge). Discrete sampling rounds a location to
    a pixel: a location within float32 rounding of a pixel boundary could round apart
    (none does on these draws)."""
    attn = hf_v2_attention(method)
    query, query_pos, value, mask, boxes = module_inputs(4)
    boxes = boxes[:, :, :1]  # [B, Q, 1, 4]
    hf_out, _ = run_hf(attn, query, query_pos, value, mask, boxes)
    module = MultiScaleDeformableAttention(E, HEADS, LEVELS, V2_POINTS, offset_scale=0.7,
                                           sampling="bilinear" if method == "default" else method)
    out, state = module.apply(to_flax(attn), jnp.asarray(query), jnp.asarray(np.repeat(boxes, LEVELS, 2)),
                              jnp.asarray(value), SHAPES, jnp.asarray(mask), jnp.asarray(query_pos),
                              mutable=["intermediates"])
    np.testing.assert_allclose(np.asarray(out), hf_out, atol=ATOL, rtol=0)
    locations, weights = state["intermediates"][SAMPLING_LOCATIONS][0], state["intermediates"][SAMPLING_WEIGHTS][0]
    assert locations.shape == (B, Q, HEADS, LEVELS, max(V2_POINTS), 2)
    assert ((np.asarray(locations) < 0) | (np.asarray(locations) > 1)).mean() > 0.05
    # A level's points past its P_l are padding: weight 0; a head's weights sum to 1.
    assert not np.asarray(weights)[:, :, :, 2, 1:].any()
    np.testing.assert_allclose(np.asarray(weights).sum((-2, -1)), 1, atol=1e-6)
    # Its initial offsets: each level's points at 1..P_l steps along the head's direction.
    bias = module.init(jax.random.PRNGKey(0), jnp.asarray(query), jnp.asarray(np.repeat(boxes, LEVELS, 2)),
                       jnp.asarray(value), SHAPES)["params"]["sampling_offsets"]["bias"]
    steps = np.asarray(bias).reshape(HEADS, sum(V2_POINTS), 2)[0, :, 0]  # head 0 points along +x
    np.testing.assert_array_equal(steps, [1, 2, 1, 2, 3, 1])


def test_discrete_sampling_differs_from_bilinear():
    """The switch matters: on the same inputs the two methods differ far beyond the
    tolerance (so the comparison above tells them apart)."""
    value, locations, weights = core_inputs(0)
    args = (jnp.asarray(value), SHAPES, jnp.asarray(locations), jnp.asarray(weights))
    diff = np.abs(np.asarray(ms_deform_attn_sample(*args, method="discrete")) - ours_core(value, locations, weights))
    assert diff.max() > 1000 * ATOL
    with pytest.raises(ValueError, match="sampling method"):
        ms_deform_attn_sample(*args, method="nearest")


def test_jit_vmap_shard_map():
    value, locations, weights = core_inputs(0)
    args = tuple(map(jnp.asarray, (value, locations, weights)))
    eager = ms_deform_attn_sample(args[0], SHAPES, *args[1:])
    traces = []

    def sample(v, shapes, loc, wts):
        traces.append(shapes)
        return ms_deform_attn_sample(v, shapes, loc, wts)

    jitted = jax.jit(sample, static_argnums=1)
    np.testing.assert_allclose(jitted(args[0], SHAPES, *args[1:]), eager, atol=1e-6, rtol=0)
    jitted(args[0] + 1, SHAPES, args[1] * 0.5, args[2])
    assert len(traces) == 1  # new values, same static shapes: no retrace

    # vmap over an extra leading axis, and shard_map over the batch.
    stacked = tuple(jnp.stack([a, a[::-1]]) for a in args)
    mapped = jax.vmap(lambda v, loc, wts: ms_deform_attn_sample(v, SHAPES, loc, wts))(*stacked)
    np.testing.assert_allclose(mapped[0], eager, atol=1e-6, rtol=0)
    np.testing.assert_allclose(mapped[1], eager[::-1], atol=1e-6, rtol=0)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharded = jax.jit(jax.shard_map(lambda v, loc, wts: ms_deform_attn_sample(v, SHAPES, loc, wts), mesh=mesh,
                                    in_specs=PartitionSpec("data"), out_specs=PartitionSpec("data")))
    np.testing.assert_allclose(sharded(*args), eager, atol=1e-6, rtol=0)

    # The module under jit, its static shapes closed over.
    attn = hf_attention()
    query, query_pos, value, mask, reference_points = module_inputs(4)
    module = MultiScaleDeformableAttention(E, HEADS, LEVELS, POINTS)
    apply = jax.jit(lambda variables, *xs: module.apply(variables, xs[0], xs[1], xs[2], SHAPES, xs[3], xs[4]))
    out = apply(to_flax(attn), *map(jnp.asarray, (query, reference_points, value, mask, query_pos)))
    np.testing.assert_allclose(out, run_hf(attn, query, query_pos, value, mask, reference_points)[0], atol=ATOL,
                               rtol=0)


def test_bfloat16():
    """bfloat16 values and compute against float32: the core within 1.5e-2 absolute of
    outputs up to ~2 (measured 6e-3: the value rounded to 8 significant bits, 4e-3
    relative, and the output once more), the module within 1e-2 of outputs up to ~0.5
    (measured 4e-3: it also rounds its inputs and each projection); the locations and
    the weights' softmax stay float32."""
    value, locations, weights = core_inputs(0)
    out16 = ms_deform_attn_sample(jnp.asarray(value, jnp.bfloat16), SHAPES, jnp.asarray(locations),
                                  jnp.asarray(weights, jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), ours_core(value, locations, weights), atol=1.5e-2,
                               rtol=0)

    attn = hf_attention()
    inputs = module_inputs(4)
    out32, _ = run_ours(to_flax(attn), *inputs)
    out16, sown = run_ours(to_flax(attn), *inputs, dtype=jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16 and sown[SAMPLING_LOCATIONS][0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=1e-2, rtol=0)


def test_bad_shapes_raise():
    value, locations, weights = core_inputs(0)
    with pytest.raises(ValueError, match="cover"):
        ms_deform_attn_sample(jnp.asarray(value), ((6, 8), (3, 4), (2, 3)), jnp.asarray(locations),
                              jnp.asarray(weights))
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn_sample(jnp.asarray(value), SHAPES[:2], jnp.asarray(locations), jnp.asarray(weights))
    query, _, value, mask, reference_points = module_inputs(2)
    with pytest.raises(ValueError, match="reference_points"):
        MultiScaleDeformableAttention(E, HEADS, LEVELS, POINTS).init(
            jax.random.PRNGKey(0), query, reference_points[..., :1], value, SHAPES, mask)
