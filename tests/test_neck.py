"""Necks and the flat view of feature levels (what multi-scale attention indexes by)."""

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.models.resnet import BackboneOutput
from detr_jax.models.neck import FeatureLevels, InputProjection, flatten_levels


def padded_masks(sizes, shape):
    """[B, h, w] masks, image b covering sizes[b] = (h_b, w_b) at the top left."""
    mask = np.zeros((len(sizes), *shape), bool)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = True
    return jnp.asarray(mask)


def test_flat_view_of_two_levels():
    rng = np.random.default_rng(0)
    shapes = [(8, 6), (4, 3)]
    features = tuple(jnp.asarray(rng.normal(size=(2, h, w, 5)), jnp.float32) for h, w in shapes)
    masks = (padded_masks([(8, 6), (5, 3)], shapes[0]), padded_masks([(4, 3), (3, 2)], shapes[1]))
    pos = tuple(f + 1.0 for f in features)
    flat = flatten_levels(FeatureLevels(features, masks), pos)
    assert flat.spatial_shapes == ((8, 6), (4, 3)) and flat.level_start_index == (0, 48)
    assert flat.src.shape == (2, 60, 5) and flat.mask.shape == (2, 60) and flat.pos.shape == (2, 60, 5)
    # level 1's row-major positions follow level 0's
    np.testing.assert_array_equal(flat.src[:, 48:].reshape(2, 4, 3, 5), features[1])
    np.testing.assert_array_equal(flat.mask[:, :48].reshape(2, 8, 6), masks[0])
    # Deformable DETR's get_valid_ratio: (valid width / w, valid height / h) per level
    want = np.array([[[1, 1], [1, 1]], [[3 / 6, 5 / 8], [2 / 3, 3 / 4]]], np.float32)
    np.testing.assert_allclose(flat.valid_ratios, want)


def test_input_projection_is_detr_s_one_level_neck():
    """The 1x1 projection with the parameters at input_proj's own level (kernel, bias)."""
    features = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 6)), jnp.float32)
    out = BackboneOutput(features, jnp.ones((2, 4, 4), bool), {})
    neck = InputProjection(8)
    variables = neck.init(jax.random.key(0), out)
    assert jax.tree.map(jnp.shape, variables["params"]) == {"kernel": (1, 1, 6, 8), "bias": (8,)}
    levels = neck.apply(variables, out)
    want = features @ variables["params"]["kernel"][0, 0] + variables["params"]["bias"]
    np.testing.assert_allclose(levels.features[0], want, rtol=1e-6, atol=1e-6)
    assert len(levels.masks) == 1 and levels.masks[0] is out.mask
