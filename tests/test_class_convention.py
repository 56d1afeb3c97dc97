"""The class conventions: the sigmoid focal one against Hugging Face's Deformable DETR loss,
matcher and post-processing; output branches matched by their own rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.config.defaults import loss_config
from detr_jax.criterion.class_convention import CLASS_CONVENTIONS, SigmoidFocal, SoftmaxNoObject
from detr_jax.criterion.losses import SetCriterion
from detr_jax.criterion.matcher import HungarianMatcher
from detr_jax.evaluation.postprocess import postprocess
from test_losses import K  # classes; the sigmoid convention's logits have K entries
from test_losses import random_batch as detr_random_batch


def random_batch(rng, layers=2, **kwargs):
    """test_losses' predictions and padded targets, with K logits and two layers by default."""
    return detr_random_batch(rng, layers=layers, num_logits=K, **kwargs)



def sigmoid_criterion(classes=SigmoidFocal(), **kwargs):
    return SetCriterion(num_classes=K, matcher=HungarianMatcher(classes=classes), classes=classes, **kwargs)


def hugging_face_losses(outputs, targets, focal_alpha=0.25):
    """transformers' Deformable DETR loss (DeformableDetrImageLoss with its focal matcher)."""
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.loss.loss_deformable_detr")
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    matcher = hf.DeformableDetrHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    criterion = hf.DeformableDetrImageLoss(matcher, num_classes=K, focal_alpha=focal_alpha,
                                           losses=["labels", "boxes", "cardinality"])
    hf_targets = [{"class_labels": t(targets["labels"][b][v]).long(), "boxes": t(targets["boxes"][b][v])}
                  for b, v in enumerate(targets["valid"])]
    last = {"logits": t(outputs["pred_logits"][-1]), "pred_boxes": t(outputs["pred_boxes"][-1])}
    aux = [{"logits": t(outputs["pred_logits"][l]), "pred_boxes": t(outputs["pred_boxes"][l])}
           for l in range(len(outputs["pred_logits"]) - 1)]
    want = criterion({**last, "auxiliary_outputs": aux}, hf_targets)
    return {k: v.item() for k, v in want.items()}


TERMS = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "loss_ce_0", "loss_bbox_0", "loss_giou_0"]


def test_sigmoid_focal_loss_equals_hugging_face_deformable_detr():
    # Both float32 with sums in another order; the focal terms are O(1) sums over a few
    # hundred elements: a few ulps, rtol 1e-5.
    outputs, targets = random_batch(np.random.default_rng(0))
    want = hugging_face_losses(outputs, targets)
    _, metrics = jax.jit(sigmoid_criterion())(outputs, targets)
    for key in TERMS:
        np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_swapped_focal_alpha_fails_the_parity():
    """The parity test can fail: alpha 0.75 for 0.25 moves loss_ce far beyond its tolerance."""
    outputs, targets = random_batch(np.random.default_rng(0))
    want = hugging_face_losses(outputs, targets)
    _, metrics = jax.jit(sigmoid_criterion(SigmoidFocal(alpha=0.75)))(outputs, targets)
    assert abs(float(metrics["loss_ce"]) - want["loss_ce"]) > 1e-2 * abs(want["loss_ce"])


def test_focal_matching_cost_equals_hugging_face():
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.loss.loss_deformable_detr")
    outputs, targets = random_batch(np.random.default_rng(1), layers=1, counts=(5, 5, 5, 5))
    hf_targets = [{"class_labels": torch.from_numpy(targets["labels"][b]).long(),
                   "boxes": torch.from_numpy(targets["boxes"][b])} for b in range(4)]
    matcher = hf.DeformableDetrHungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    want = matcher({"logits": torch.from_numpy(outputs["pred_logits"][0]),
                    "pred_boxes": torch.from_numpy(outputs["pred_boxes"][0])}, hf_targets)
    got = jax.jit(HungarianMatcher(classes=SigmoidFocal()))(
        outputs["pred_logits"], outputs["pred_boxes"], targets["labels"], targets["boxes"], targets["valid"])
    for b, (queries, slots) in enumerate(want):
        np.testing.assert_array_equal(np.asarray(got.target_to_query[0, b])[slots.numpy()], queries.numpy())


def test_sigmoid_postprocess_is_the_top_k_over_queries_and_classes():
    """Official Deformable DETR's PostProcess: topk of the flattened sigmoid, query = index // K."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 30, K)).astype(np.float32)
    boxes = rng.uniform(0.2, 0.6, size=(2, 30, 4)).astype(np.float32)
    size = np.array([[480, 640], [200, 100]], np.int32)
    got = postprocess(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(size), SigmoidFocal(num_select=100))
    prob = torch.from_numpy(logits).sigmoid().view(2, -1)
    values, index = torch.topk(prob, 100, dim=1)
    np.testing.assert_allclose(got["scores"], values.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(got["labels"], (index % K).numpy())
    np.testing.assert_array_equal(got["queries"], (index // K).numpy())
    cx, cy, w, h = np.moveaxis(np.take_along_axis(boxes, (index // K).numpy()[..., None], axis=1), -1, 0)
    scale = np.stack([size[:, 1], size[:, 0]] * 2, -1)[:, None, :]
    want_boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale
    np.testing.assert_allclose(got["boxes"], want_boxes, rtol=1e-5, atol=1e-3)
    # DETR's convention keeps every query in order, so it gives no query index
    assert "queries" not in postprocess(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(size), SoftmaxNoObject())


def test_the_varifocal_convention_has_rt_detrs_settings():
    """RT-DETR's (its loss against transformers': tests/test_parity_rt_detr.py): the focal
    matching cost's alpha 0.25, the varifocal loss's 0.75, top-300 post-processing; the loss
    cannot run without the matched IoUs."""
    classes = CLASS_CONVENTIONS["sigmoid_varifocal"].from_config(loss_config())
    assert (classes.alpha, classes.gamma, classes.vfl_alpha, classes.vfl_gamma) == (0.25, 2.0, 0.75, 2.0)
    assert classes.num_detections(300, 80) == 300 and classes.num_logits(80) == 80
    with pytest.raises(ValueError, match="quality"):
        classes.loss(jnp.zeros((1, 1, 2, K)), jnp.zeros((1, 1, 2), jnp.int32), 1.0)


def test_branches_are_matched_by_their_own_rule_and_suffixed():
    """A branch with a known assignment uses it; one without is matched by the matcher; each
    branch's metrics and loss are those of the criterion on that branch alone."""
    rng = np.random.default_rng(3)
    outputs, targets = random_batch(rng)
    enc, _ = random_batch(rng, layers=1)
    dn, _ = random_batch(rng, layers=2, queries=5)  # one denoising query per target slot
    dn["target_to_query"] = np.broadcast_to(np.arange(5, dtype=np.int32), (4, 5))
    criterion = sigmoid_criterion()
    loss, metrics = jax.jit(criterion)({**outputs, "enc": enc, "dn": dn}, targets)

    main_loss, main_metrics = criterion(outputs, targets)
    enc_loss, enc_metrics = criterion(enc, targets)
    known = criterion.match(dn, targets)
    assert (np.asarray(known.target_to_query) == np.where(targets["valid"], np.arange(5), -1)[None]).all()
    dn_loss, dn_metrics = criterion.loss_for_matching(dn, targets, known)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"):
        np.testing.assert_allclose(metrics[key], main_metrics[key], rtol=1e-6)
        np.testing.assert_allclose(metrics[f"{key}_dn"] if key[-2:] != "_0" else metrics["loss_ce_dn_0"],
                                   dn_metrics[key], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_bbox_enc"], enc_metrics["loss_bbox"], rtol=1e-6)
    assert "loss_bbox_enc_0" not in metrics  # the enc branch has one layer
    np.testing.assert_allclose(loss, main_loss + enc_loss + dn_loss, rtol=1e-6)


def test_denoising_groups_are_trained_against_copies_of_the_targets():
    """A branch whose target_to_query has G * M slots is G groups, group g's query for target
    m at entry g * M + m: matched against G copies of the targets and normalized by G times
    the boxes, so two identical groups give the loss of one (a wrong tiling or normalizer
    does not)."""
    rng = np.random.default_rng(5)
    outputs, targets = random_batch(rng)
    one, _ = random_batch(rng, layers=2, queries=5)
    one["target_to_query"] = np.broadcast_to(np.arange(5, dtype=np.int32), (4, 5))
    two = {"pred_logits": np.concatenate([one["pred_logits"]] * 2, axis=2),
           "pred_boxes": np.concatenate([one["pred_boxes"]] * 2, axis=2),
           "target_to_query": np.broadcast_to(np.arange(10, dtype=np.int32), (4, 10))}
    criterion = sigmoid_criterion()
    _, once = jax.jit(criterion)({**outputs, "dn": one}, targets)
    _, twice = jax.jit(criterion)({**outputs, "dn": two}, targets)
    known = criterion.match(two, targets)
    assert known.target_to_query.shape == (2, 4, 10)
    assert (np.asarray(known.target_to_query)[:, :, 5:] == np.where(targets["valid"], np.arange(5, 10), -1)).all()
    for key in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn", "loss_ce_dn_0"):
        np.testing.assert_allclose(twice[key], once[key], rtol=1e-6)
    with pytest.raises(ValueError, match="7 slots, not a multiple of the 5 targets"):
        criterion.match({**two, "target_to_query": np.zeros((4, 7), np.int32)}, targets)
