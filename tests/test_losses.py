"""The set criterion against NumPy and Hugging Face re-computations; gradients; edge cases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from detr_jax.criterion import matcher as matcher_lib
from detr_jax.criterion.class_convention import SoftmaxNoObject
from detr_jax.config import loss_config
from detr_jax.criterion.losses import SetCriterion
from detr_jax.criterion.matcher import HungarianMatcher

K = 5  # num_classes; logits have K + 1 entries
WEIGHTS = dict(
    cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, class_coef=1.0, bbox_coef=5.0, giou_coef=2.0
)


def random_batch(rng, layers=3, batch=4, queries=7, max_boxes=5, counts=(3, 0, 5, 1), num_logits=K + 1):
    """Predictions and padded targets; image b has counts[b] valid targets in random slots."""
    logits = rng.normal(size=(layers, batch, queries, num_logits)).astype(np.float32) * 2
    pred_boxes = 1 / (1 + np.exp(-rng.normal(size=(layers, batch, queries, 4)))).astype(np.float32)
    labels = rng.integers(0, K, size=(batch, max_boxes)).astype(np.int32)
    boxes = rng.uniform(0.2, 0.8, size=(batch, max_boxes, 4)).astype(np.float32)
    boxes[..., 2:] *= 0.5
    valid = np.zeros((batch, max_boxes), bool)
    for b, n in enumerate(counts):
        valid[b, rng.choice(max_boxes, size=n, replace=False)] = True
    # padded slots hold garbage the loss must ignore
    labels[~valid] = 999
    boxes[~valid] = np.nan
    outputs = {"pred_logits": logits, "pred_boxes": pred_boxes}
    targets = {"labels": labels, "boxes": boxes, "valid": valid}
    return outputs, targets


def xyxy(b):
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def np_giou(a, b):
    """Official-DETR GIoU on [..., 4] cxcywh pairs (float64, valid boxes)."""
    a, b = xyxy(a), xyxy(b)
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    union = area(a) + area(b) - inter
    enc = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
    enc = enc[..., 0] * enc[..., 1]
    return inter / union - (enc - union) / enc


def numpy_criterion(outputs, targets, eos_coef=0.1, aux_loss=True):
    """Official DETR's matcher + SetCriterion written out in float64 NumPy, list style."""
    logits = outputs["pred_logits"].astype(np.float64)
    pred_boxes = outputs["pred_boxes"].astype(np.float64)
    L, B, Q, _ = logits.shape
    layers = range(L) if aux_loss else [L - 1]
    tgt = [
        (targets["labels"][b][targets["valid"][b]], targets["boxes"][b][targets["valid"][b]].astype(np.float64))
        for b in range(B)
    ]
    num_boxes = max(sum(len(t[0]) for t in tgt), 1)
    log_prob = logits - logits.max(-1, keepdims=True)
    log_prob -= np.log(np.exp(log_prob).sum(-1, keepdims=True))
    prob = np.exp(log_prob)
    out, total = {}, 0.0
    for l in layers:
        ce_num = ce_den = l1 = giou = 0.0
        n_correct = n_matched = 0
        for b in range(B):
            lab, box = tgt[b]
            target_class = np.full(Q, K)
            if len(lab):
                cost = (
                    -WEIGHTS["cost_class"] * prob[l, b][:, lab]
                    + WEIGHTS["cost_bbox"] * np.abs(pred_boxes[l, b][:, None] - box[None]).sum(-1)
                    - WEIGHTS["cost_giou"] * np_giou(pred_boxes[l, b][:, None], box[None])
                )
                rows, cols = scipy.optimize.linear_sum_assignment(cost)
                target_class[rows] = lab[cols]
                l1 += np.abs(pred_boxes[l, b][rows] - box[cols]).sum()
                giou += (1 - np_giou(pred_boxes[l, b][rows], box[cols])).sum()
                n_correct += (logits[l, b][rows].argmax(-1) == lab[cols]).sum()
                n_matched += len(rows)
            w = np.where(target_class == K, eos_coef, 1.0)
            ce_num += (w * -log_prob[l, b][np.arange(Q), target_class]).sum()
            ce_den += w.sum()
        suffix = "" if l == L - 1 else f"_{l}"
        out["loss_ce" + suffix] = ce_num / ce_den
        out["loss_bbox" + suffix] = l1 / num_boxes
        out["loss_giou" + suffix] = giou / num_boxes
        total += out["loss_ce" + suffix] + 5 * out["loss_bbox" + suffix] + 2 * out["loss_giou" + suffix]
        if l == L - 1:
            out["class_error"] = 100.0 - (100.0 * n_correct / n_matched if n_matched else 0.0)
    card = [(logits[L - 1, b].argmax(-1) != K).sum() for b in range(B)]
    out["cardinality_error"] = np.mean([abs(c - len(t[0])) for c, t in zip(card, tgt)])
    out["num_boxes"] = float(num_boxes)
    out["loss"] = total
    return out


def criterion(**kwargs):
    return SetCriterion(num_classes=K, **criterion_parts(), **kwargs)


def criterion_parts():
    """The matcher and weight dict of WEIGHTS."""
    w = WEIGHTS
    return dict(matcher=HungarianMatcher(w["cost_class"], w["cost_bbox"], w["cost_giou"]),
                weight_dict={"loss_ce": w["class_coef"], "loss_bbox": w["bbox_coef"], "loss_giou": w["giou_coef"]})


@pytest.mark.parametrize("aux_loss", [True, False])
def test_loss_equals_numpy_recomputation(aux_loss):
    # JAX runs in float32, the reference in float64; every term is a sum of at most a few
    # hundred O(1) values, so relative errors stay around 1e-6: rtol 1e-5, atol 1e-6.
    rng = np.random.default_rng(0)
    outputs, targets = random_batch(rng)
    loss, metrics = jax.jit(criterion(aux_loss=aux_loss))(outputs, targets)
    want = numpy_criterion(outputs, targets, aux_loss=aux_loss)
    expected_keys = set(want) | {"nonfinite_cost", "matching_failed"}
    assert set(metrics) == expected_keys
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
    assert metrics["nonfinite_cost"] == 0 and metrics["matching_failed"] == 0
    assert ("loss_ce_0" in metrics) == aux_loss
    assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


def test_loss_equals_hugging_face_detr_loss():
    """Parity with an independent PyTorch implementation (transformers' DETR ImageLoss)."""
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.loss.loss_for_object_detection")
    rng = np.random.default_rng(1)
    outputs, targets = random_batch(rng, layers=2, counts=(2, 0, 4, 5))
    matcher = hf.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    hf_criterion = hf.ImageLoss(matcher, num_classes=K, eos_coef=0.1, losses=["labels", "boxes", "cardinality"])
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    hf_targets = [
        {"class_labels": t(targets["labels"][b][v]).long(), "boxes": t(targets["boxes"][b][v])}
        for b, v in enumerate(targets["valid"])
    ]
    last = {"logits": t(outputs["pred_logits"][-1]), "pred_boxes": t(outputs["pred_boxes"][-1])}
    aux = [{"logits": t(outputs["pred_logits"][0]), "pred_boxes": t(outputs["pred_boxes"][0])}]
    want = hf_criterion({**last, "auxiliary_outputs": aux}, hf_targets)
    _, metrics = jax.jit(criterion())(outputs, targets)
    # both float32, different reduction orders: a few ulps.
    for key in ["loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0", "cardinality_error"]:
        np.testing.assert_allclose(metrics[key], want[key].item(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_from_config_equals_keywords():
    config = loss_config()
    config.eos_coef = 0.2
    config.aux_loss = False
    config.one2many_coef = 0.5
    classes = SoftmaxNoObject(eos_coef=0.2)  # the class convention owns eos_coef; the matcher asks it too
    parts = criterion_parts()
    parts["matcher"] = dataclasses.replace(parts["matcher"], classes=classes)
    assert SetCriterion.from_config(config, K) == SetCriterion(
        num_classes=K, classes=classes, aux_loss=False, branch_weights={"one2many": 0.5}, **parts
    )


def test_batch_without_objects_gives_finite_loss_and_gradients():
    rng = np.random.default_rng(2)
    outputs, targets = random_batch(rng, counts=(0, 0, 0, 0))
    loss_fn = criterion()
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(outputs, targets)
    assert np.isfinite(loss)
    assert metrics["loss_bbox"] == 0 and metrics["loss_giou"] == 0 and metrics["num_boxes"] == 1
    assert metrics["class_error"] == 100  # official DETR's accuracy is 0 without targets
    # every query targets "no object" with the same weight: the plain mean CE
    logits = outputs["pred_logits"][-1].astype(np.float64)
    log_norm = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(metrics["loss_ce"], (log_norm - logits[..., K]).mean(), rtol=1e-5)
    for g in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(grads["pred_boxes"], 0)


def test_gradients_flow_to_predictions_not_through_matching():
    rng = np.random.default_rng(3)
    outputs, targets = random_batch(rng)
    loss_fn = criterion()
    grads = jax.jit(jax.grad(lambda o, t: loss_fn(o, t)[0]))(outputs, targets)

    # The same loss with the matching frozen as a constant has the same gradient, so
    # nothing flows through the matching.
    matching = jax.jit(loss_fn.matcher)(
        outputs["pred_logits"], outputs["pred_boxes"], targets["labels"], targets["boxes"], targets["valid"]
    )
    frozen = jax.jit(jax.grad(lambda o: loss_fn.loss_for_matching(o, targets, matching)[0]))(outputs)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b)

    # Every query's logits get a gradient (CE over all queries); only matched queries'
    # boxes do, and each of those does.
    g_logits, g_boxes = np.asarray(grads["pred_logits"]), np.asarray(grads["pred_boxes"])
    assert (np.abs(g_logits).sum(-1) > 0).all()
    t2q = np.asarray(matching.target_to_query)
    is_matched = np.zeros(g_boxes.shape[:3], bool)
    for l, b, m in zip(*np.nonzero(t2q >= 0)):
        is_matched[l, b, t2q[l, b, m]] = True
    assert is_matched.sum() == 3 * (3 + 0 + 5 + 1)
    assert (np.abs(g_boxes).sum(-1)[is_matched] > 0).all()
    assert (g_boxes[~is_matched] == 0).all()


def test_loss_gradient_matches_finite_differences():
    # Central differences in float32 along a random direction with step 1e-2 (small enough
    # for the matching to stay fixed on this problem, large enough for float32 rounding):
    # agreement to ~1e-3 relative.
    rng = np.random.default_rng(4)
    outputs, targets = random_batch(rng, layers=2, counts=(2, 1, 0, 3))
    loss_fn = jax.jit(lambda o: criterion()(o, targets)[0])
    grads = jax.jit(jax.grad(lambda o: criterion()(o, targets)[0]))(outputs)
    direction = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in outputs.items()}
    direction["pred_boxes"] *= 0.05  # keep boxes well inside (0, 1)
    step = 1e-2
    shifted = lambda s: {k: outputs[k] + s * direction[k] for k in outputs}  # noqa: E731
    numeric = (float(loss_fn(shifted(step))) - float(loss_fn(shifted(-step)))) / (2 * step)
    analytic = sum(float((grads[k] * direction[k]).sum()) for k in outputs)
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3)


def test_bfloat16_predictions_give_float32_loss():
    rng = np.random.default_rng(5)
    outputs, targets = random_batch(rng)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in outputs.items()}
    rounded = {k: np.asarray(v.astype(jnp.float32)) for k, v in bf16.items()}
    loss_fn = jax.jit(criterion())
    loss, metrics = loss_fn(bf16, targets)
    want, _ = loss_fn(rounded, targets)
    assert loss.dtype == jnp.float32
    # identical float32 computation once the inputs are upcast
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    grads = jax.jit(jax.grad(lambda o: criterion()(o, targets)[0]))(bf16)
    assert grads["pred_logits"].dtype == jnp.bfloat16


def test_nan_predictions_are_reported():
    rng = np.random.default_rng(6)
    outputs, targets = random_batch(rng)
    outputs["pred_boxes"][0, 2, 4] = np.nan  # aux layer 0, image 2 (5 targets)
    outputs["pred_logits"][-1, 3, 0, 1] = np.inf  # last layer, image 3 (1 target)
    outputs["pred_logits"][-1, 1, 0, 1] = np.nan  # image 1 has no targets: no cost entries
    loss, metrics = jax.jit(criterion())(outputs, targets)
    assert metrics["nonfinite_cost"] == 2
    assert metrics["matching_failed"] == 0
    assert not np.isfinite(loss)  # the loss itself is NaN; nonfinite_cost says why

    clean, _ = random_batch(np.random.default_rng(6))
    _, clean_metrics = jax.jit(criterion())(clean, targets)
    assert clean_metrics["nonfinite_cost"] == 0


def test_solver_failure_is_reported(monkeypatch):
    def failing(cost):
        raise ValueError("cost matrix is infeasible")

    monkeypatch.setattr(scipy.optimize, "linear_sum_assignment", failing)
    rng = np.random.default_rng(7)
    outputs, targets = random_batch(rng)  # 3 of 4 images have targets
    loss, metrics = jax.jit(criterion())(outputs, targets)
    assert metrics["matching_failed"] == 3 * 3  # layers x images with targets
    assert np.isfinite(loss)  # every query then trains towards "no object"
    assert metrics["loss_bbox"] == 0


def test_oracle_predictions_have_zero_box_loss_and_class_error():
    # An "oracle" prediction for image 0 (last layer): matched queries predict the exact
    # target boxes and classes, so its box losses vanish and class_error is 0.
    rng = np.random.default_rng(8)
    outputs, targets = random_batch(rng, layers=1, batch=1, counts=(3,))
    valid = targets["valid"][0]
    logits = np.full((1, 1, 7, K + 1), -10.0, np.float32)
    logits[..., K] = 10.0
    boxes = outputs["pred_boxes"].copy()
    for q, m in enumerate(np.flatnonzero(valid)):
        logits[0, 0, q, :] = -10.0
        logits[0, 0, q, targets["labels"][0, m]] = 10.0
        boxes[0, 0, q] = targets["boxes"][0, m]
    _, metrics = jax.jit(criterion())({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # GIoU of a box with itself is 1 up to float32 rounding
    np.testing.assert_allclose(metrics["loss_bbox"], 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics["loss_giou"], 0.0, atol=1e-6)
    assert metrics["class_error"] == 0 and metrics["cardinality_error"] == 0
    assert metrics["loss_ce"] < 1e-6


def test_one_compilation_per_shape_and_one_callback(monkeypatch):
    calls = []
    original = matcher_lib.assign_on_host

    def recording(cost, valid):
        calls.append(np.asarray(cost).shape)
        return original(cost, valid)

    monkeypatch.setattr(matcher_lib, "assign_on_host", recording)
    rng = np.random.default_rng(9)
    outputs, targets = random_batch(rng)
    jax.block_until_ready(jax.jit(jax.grad(lambda o: criterion()(o, targets)[0]))(outputs))
    assert calls == [(3, 4, 7, 5)]
