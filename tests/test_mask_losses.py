"""The mask head's losses (focal + DICE) against a transcription of official DETR's
`loss_masks`, through the criterion's menu, with gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.criterion.class_convention import SoftmaxNoObject
from detr_jax.config import loss_config
from detr_jax.criterion.losses import LossContext, SetCriterion, dice_loss, loss_masks, sigmoid_focal_loss
from detr_jax.criterion.matcher import Matching

torch = pytest.importorskip("torch")

# float32 sums over a few hundred pixels, computed in a different order than torch's.
TOLERANCE = 1e-5


def official_loss_masks(pred_masks, target_masks, pairs, num_boxes):
    """Official DETR's SetCriterion.loss_masks (models/detr.py + segmentation.py), in torch.

    pred_masks [B, Q, h, w]; target_masks [B, M, H, W]; pairs: [(b, query, slot)].
    """
    f = torch.nn.functional
    src = torch.stack([torch.as_tensor(pred_masks[b, q]) for b, q, _ in pairs])
    tgt = torch.stack([torch.as_tensor(target_masks[b, m]) for b, _, m in pairs]).float()
    src = f.interpolate(src[:, None], size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
    tgt = tgt.flatten(1)
    prob = src.sigmoid()
    ce = f.binary_cross_entropy_with_logits(src, tgt, reduction="none")
    p_t = prob * tgt + (1 - prob) * (1 - tgt)
    focal = ce * ((1 - p_t) ** 2) * (0.25 * tgt + 0.75 * (1 - tgt))
    numerator = 2 * (prob * tgt).sum(1)
    dice = 1 - (numerator + 1) / (prob.sum(-1) + tgt.sum(-1) + 1)
    return float(focal.mean(1).sum() / num_boxes), float(dice.sum() / num_boxes)


def mask_problem(rng, batch=2, queries=5, slots=4, h=3, w=4):
    """Random mask logits, target masks (4x the grid) and a matching with an unmatched
    valid slot and a padded slot holding pixels the loss must ignore."""
    pred_masks = rng.normal(size=(batch, queries, h, w)).astype(np.float32) * 3
    target_masks = rng.random((batch, slots, 4 * h, 4 * w)) < 0.4
    t2q = np.array([[2, 0, -1, -1], [4, -1, 1, 3]], np.int32)[:batch, :slots]
    pairs = [(b, int(q), m) for b in range(batch) for m, q in enumerate(t2q[b]) if q >= 0]
    matching = Matching(jnp.asarray(t2q)[None], jnp.ones((1, batch), bool), jnp.zeros((1, batch), jnp.int32))
    return pred_masks, target_masks, matching, pairs


def test_mask_losses_equal_official_loss_masks():
    pred_masks, target_masks, matching, pairs = mask_problem(np.random.default_rng(0))
    num_boxes = 6.0
    ours = loss_masks({"pred_masks": pred_masks}, {"masks": target_masks}, matching, num_boxes, LossContext(3, SoftmaxNoObject(eos_coef=0.1)))
    focal, dice = official_loss_masks(pred_masks, target_masks, pairs, num_boxes)
    assert abs(float(ours["loss_mask"]) - focal) <= TOLERANCE * focal
    assert abs(float(ours["loss_dice"]) - dice) <= TOLERANCE * dice
    assert focal > 0.01 and dice > 0.1  # not vacuous


def test_focal_and_dice_elementwise():
    logits = np.array([-3.0, 0.0, 2.0, 5.0], np.float32)
    targets = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    p_t = p * targets + (1 - p) * (1 - targets)
    expected = np.where(targets == 1, 0.25, 0.75) * ce * (1 - p_t) ** 2
    np.testing.assert_allclose(sigmoid_focal_loss(jnp.asarray(logits), jnp.asarray(targets)), expected, rtol=1e-5)
    expected_dice = 1 - (2 * np.sum(p * targets) + 1) / (p.sum() + targets.sum() + 1)
    np.testing.assert_allclose(dice_loss(jnp.asarray(logits), jnp.asarray(targets)), expected_dice, rtol=1e-6)


def test_masks_term_in_the_criterion_weights_and_gradients():
    rng = np.random.default_rng(1)
    pred_masks, target_masks, matching, _ = mask_problem(rng)
    batch, queries, slots = 2, 5, 4
    logits = rng.normal(size=(1, batch, queries, 4)).astype(np.float32)
    boxes = np.full((1, batch, queries, 4), 0.5, np.float32)
    valid = np.asarray(matching.target_to_query[0] >= 0) | np.array([[0, 0, 1, 0], [0, 1, 0, 0]], bool)
    targets = {"labels": np.ones((batch, slots), np.int32), "boxes": np.full((batch, slots, 4), 0.4, np.float32),
               "valid": valid, "masks": target_masks}
    config = loss_config()
    config.losses = ("labels", "boxes", "masks")
    config.mask_coef, config.dice_coef = 2.0, 3.0
    criterion = SetCriterion.from_config(config, num_classes=3)
    assert dict(criterion.weight_dict)["loss_mask"] == 2.0 and dict(criterion.weight_dict)["loss_dice"] == 3.0

    def total(masks):
        outputs = {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": masks}
        return criterion.loss_for_matching(outputs, targets, matching)

    loss, metrics = total(pred_masks)
    expected = (metrics["loss_ce"] + 5 * metrics["loss_bbox"] + 2 * metrics["loss_giou"]
                + 2 * metrics["loss_mask"] + 3 * metrics["loss_dice"])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(metrics["num_boxes"]) == 7.0  # valid slots, the unmatched one included
    grads = np.asarray(jax.grad(lambda m: total(m)[0])(jnp.asarray(pred_masks)))
    matched_queries = {(0, 2), (0, 0), (1, 4), (1, 1), (1, 3)}
    for b in range(batch):
        for q in range(queries):
            assert (np.abs(grads[b, q]).max() > 0) == ((b, q) in matched_queries), (b, q)
