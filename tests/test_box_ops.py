"""Box conversions, IoU and generalized IoU, including degenerate boxes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.ops import box_ops

# float32 arithmetic on O(1) values: a few ulps (~1e-7 each) of error.
TOL = dict(rtol=1e-6, atol=1e-6)


def random_xyxy(rng, shape):
    lo = rng.uniform(0.0, 0.7, size=shape + (2,))
    wh = rng.uniform(0.01, 0.3, size=shape + (2,))
    return np.concatenate([lo, lo + wh], axis=-1).astype(np.float32)


def test_conversion_round_trips():
    rng = np.random.default_rng(0)
    cxcywh = rng.uniform(0.1, 0.9, size=(2, 3, 5, 4)).astype(np.float32)
    xyxy = box_ops.cxcywh_to_xyxy(cxcywh)
    np.testing.assert_allclose(box_ops.xyxy_to_cxcywh(xyxy), cxcywh, **TOL)
    boxes = random_xyxy(rng, (7,))
    np.testing.assert_allclose(box_ops.cxcywh_to_xyxy(box_ops.xyxy_to_cxcywh(boxes)), boxes, **TOL)


def test_conversion_known_values():
    np.testing.assert_allclose(
        box_ops.cxcywh_to_xyxy(jnp.array([0.5, 0.4, 0.2, 0.6])), [0.4, 0.1, 0.6, 0.7], **TOL
    )
    np.testing.assert_allclose(
        box_ops.xyxy_to_cxcywh(jnp.array([0.4, 0.1, 0.6, 0.7])), [0.5, 0.4, 0.2, 0.6], **TOL
    )


def test_box_area():
    boxes = jnp.array([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0], [2.0, 2.0, 1.0, 3.0]])
    np.testing.assert_allclose(box_ops.box_area(boxes), [6.0, 0.0, 0.0], **TOL)


# (box1, box2, iou, union, giou), worked out by hand.
KNOWN = [
    # overlapping 2x2 squares: inter 1, union 7, enclosure 3x3
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 7.0, 1 / 7 - 2 / 9),
    # disjoint unit squares one apart: union 2, enclosure 3x1
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, 2.0, -1 / 3),
    # identical
    ([0, 0, 1, 2], [0, 0, 1, 2], 1.0, 2.0, 1.0),
    # one inside the other: enclosure = the outer box
    ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16, 16.0, 1 / 16),
    # touching corners: no overlap, enclosure 2x2
    ([0, 0, 1, 1], [1, 1, 2, 2], 0.0, 2.0, 0.0 - 2 / 4),
]


@pytest.mark.parametrize("box1, box2, iou, union, giou", KNOWN)
def test_known_iou_and_giou(box1, box2, iou, union, giou):
    b1, b2 = jnp.array(box1, jnp.float32), jnp.array(box2, jnp.float32)
    got_iou, got_union = box_ops.paired_iou(b1, b2)
    np.testing.assert_allclose(got_iou, iou, **TOL)
    np.testing.assert_allclose(got_union, union, **TOL)
    np.testing.assert_allclose(box_ops.paired_generalized_iou(b1, b2), giou, **TOL)
    # symmetric
    np.testing.assert_allclose(box_ops.paired_generalized_iou(b2, b1), giou, **TOL)


def test_pairwise_matches_paired_with_leading_dims():
    rng = np.random.default_rng(1)
    a = random_xyxy(rng, (2, 3, 5))  # [2, 3, N=5, 4]
    b = random_xyxy(rng, (3, 4))  # [3, M=4, 4], broadcast over the leading 2
    giou = box_ops.pairwise_generalized_iou(a, b)
    iou, union = box_ops.pairwise_iou(a, b)
    assert giou.shape == iou.shape == union.shape == (2, 3, 5, 4)
    for i, j, n, m in [(0, 0, 0, 0), (1, 2, 4, 3), (0, 1, 2, 1)]:
        np.testing.assert_allclose(
            giou[i, j, n, m], box_ops.paired_generalized_iou(a[i, j, n], b[j, m]), **TOL
        )
        np.testing.assert_allclose(iou[i, j, n, m], box_ops.paired_iou(a[i, j, n], b[j, m])[0], **TOL)


def test_giou_bounds_on_random_boxes():
    rng = np.random.default_rng(2)
    a, b = random_xyxy(rng, (200,)), random_xyxy(rng, (300,))
    giou = np.asarray(box_ops.pairwise_generalized_iou(a, b))
    iou = np.asarray(box_ops.pairwise_iou(a, b)[0])
    assert giou.min() >= -1.0 and giou.max() <= 1.0
    assert iou.min() >= 0.0 and iou.max() <= 1.0
    assert np.all(giou <= iou + 1e-6)  # the enclosure penalty is never negative
    assert giou.min() < -0.5 and iou.max() > 0.1  # the sample covers far and overlapping pairs


DEGENERATE = np.array(
    [
        [0.5, 0.5, 0.5, 0.5],  # a point
        [0.5, 0.5, 0.5, 0.5],  # the same point
        [0.2, 0.3, 0.2, 0.9],  # zero width
        [0.6, 0.6, 0.4, 0.8],  # negative width
        [0.0, 0.0, 0.0, 0.0],  # all zero
        [0.1, 0.1, 0.7, 0.7],  # a normal box
    ],
    np.float32,
)


def test_degenerate_boxes_give_finite_values_and_gradients():
    def total(a, b):
        return (
            box_ops.pairwise_generalized_iou(a, b).sum()
            + box_ops.pairwise_iou(a, b)[0].sum()
            + box_ops.paired_generalized_iou(a, b).sum()
        )

    a = jnp.asarray(DEGENERATE)
    b = jnp.asarray(DEGENERATE[::-1].copy())
    giou = box_ops.pairwise_generalized_iou(a, a)
    assert np.isfinite(np.asarray(giou)).all()
    assert np.asarray(giou).min() >= -1.0 and np.asarray(giou).max() <= 1.0
    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(a, b)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    # Through cxcywh with zero and negative sizes, as the model's boxes reach the loss.
    cxcywh = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, -0.1, 0.2], [0.3, 0.3, 0.2, 0.2]])
    def self_giou(c):
        xyxy = box_ops.cxcywh_to_xyxy(c)
        return box_ops.pairwise_generalized_iou(xyxy, xyxy).sum()

    g = jax.jit(jax.grad(self_giou))(cxcywh)
    assert np.isfinite(np.asarray(g)).all()


def test_degenerate_box_values():
    point = jnp.array([0.5, 0.5, 0.5, 0.5])
    box = jnp.array([0.0, 0.0, 1.0, 1.0])
    # A point inside a box: no overlap, the enclosure is the box and the union fills it.
    np.testing.assert_allclose(box_ops.paired_iou(point, box)[0], 0.0, **TOL)
    np.testing.assert_allclose(box_ops.paired_generalized_iou(point, box), 0.0, **TOL)
    # Two identical points: empty union and enclosure -> 0 (official DETR would give NaN).
    np.testing.assert_allclose(box_ops.paired_generalized_iou(point, point), 0.0, **TOL)
    # A negative-width box counts as empty: GIoU with a unit box it lies beside.
    flipped = jnp.array([2.0, 0.0, 1.5, 1.0])  # x0 = 2 > x1 = 1.5
    # enclosure: x from min(x0) = 0 to max(x1) = 1.5, y in [0, 1] -> area 1.5; union = 1
    np.testing.assert_allclose(box_ops.paired_generalized_iou(box, flipped), -0.5 / 1.5, **TOL)
