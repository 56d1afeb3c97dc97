"""Hungarian matching: the cost on device and the assignment through one host callback."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from detr_jax.criterion import matcher as matcher_lib
from detr_jax.config import loss_config
from detr_jax.criterion.matcher import HungarianMatcher, assign, assign_on_host, matching_cost


def random_problem(rng, layers=2, batch=3, queries=6, num_classes=5, max_boxes=4, valid=None):
    """Predictions [L, B, Q, ...] and padded targets [B, M, ...] with random valid slots."""
    logits = rng.normal(size=(layers, batch, queries, num_classes + 1)).astype(np.float32)
    pred_boxes = rng.uniform(0.1, 0.9, size=(layers, batch, queries, 4)).astype(np.float32)
    pred_boxes[..., 2:] *= 0.4
    labels = rng.integers(0, num_classes, size=(batch, max_boxes)).astype(np.int32)
    boxes = rng.uniform(0.1, 0.9, size=(batch, max_boxes, 4)).astype(np.float32)
    boxes[..., 2:] *= 0.4
    if valid is None:
        valid = rng.random((batch, max_boxes)) < 0.6
    return logits, pred_boxes, labels, boxes, np.asarray(valid, bool)


def numpy_cost(logits, pred_boxes, labels, boxes, w_class=1.0, w_bbox=5.0, w_giou=2.0):
    """float64 re-computation of the matching cost, one loop per pair: [L, B, Q, M]."""
    def xyxy(b):
        return np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])

    def giou(a, b):
        a, b = xyxy(a), xyxy(b)
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        enclosure = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
        return inter / union - (enclosure - union) / enclosure

    logits = logits.astype(np.float64)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    L, B, Q, _ = logits.shape
    M = labels.shape[1]
    cost = np.zeros((L, B, Q, M))
    for l, b, q, m in itertools.product(range(L), range(B), range(Q), range(M)):
        p, t = pred_boxes[l, b, q].astype(np.float64), boxes[b, m].astype(np.float64)
        cost[l, b, q, m] = (
            -w_class * prob[l, b, q, labels[b, m]]
            + w_bbox * np.abs(p - t).sum()
            - w_giou * giou(p, t)
        )
    return cost


def total_cost(cost, target_to_query):
    """Sum of cost[q, m] over the matched pairs of one problem."""
    return sum(cost[q, m] for m, q in enumerate(target_to_query) if q >= 0)


def test_matching_cost_equals_numpy_formula():
    # float32 softmax / GIoU on O(1) values against float64: errors of a few 1e-7.
    rng = np.random.default_rng(0)
    logits, pred_boxes, labels, boxes, _ = random_problem(rng)
    got = matching_cost(logits, pred_boxes, labels, boxes, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
    np.testing.assert_allclose(got, numpy_cost(logits, pred_boxes, labels, boxes), rtol=1e-5, atol=1e-5)
    got = matching_cost(logits, pred_boxes, labels, boxes, cost_class=3.0, cost_bbox=0.5, cost_giou=1.5)
    want = numpy_cost(logits, pred_boxes, labels, boxes, 3.0, 0.5, 1.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_nonfinite_costs_are_counted_and_replaced_on_host():
    rng = np.random.default_rng(12)
    cost = rng.uniform(size=(2, 2, 3, 3)).astype(np.float32)
    cost[0, 1, 2, 0] = np.nan
    cost[1, 1, 0, 1] = np.inf
    cost[1, 1, 1, 1] = -np.inf
    cost[1, 0, 0, 2] = np.nan  # in a padded column: not counted, never matched
    valid = np.broadcast_to(np.array([[True, True, False], [True, True, True]]), (2, 2, 3))
    t2q, solved, nonfinite = assign_on_host(cost, valid)
    np.testing.assert_array_equal(nonfinite, [[0, 1], [0, 2]])
    assert solved.all()
    # Non-finite entries are solved as UNMATCHABLE_COST: avoided while there is a choice.
    assert t2q[0, 1, 0] != 2 and t2q[1, 1, 1] not in (0, 1)
    assert t2q[1, 1, 1] >= 0 and (t2q[:, 0, 2] == -1).all()
    for l, b in np.ndindex(2, 2):
        cleaned = np.where(np.isfinite(cost[l, b]), cost[l, b], matcher_lib.UNMATCHABLE_COST)
        columns = np.flatnonzero(valid[l, b])
        rows, cols = scipy.optimize.linear_sum_assignment(cleaned[:, columns])
        np.testing.assert_allclose(total_cost(cleaned, t2q[l, b]), cleaned[rows, columns[cols]].sum())


def brute_force_min_cost(cost, valid):
    """Minimum total cost over every injective assignment of the valid targets (Q >= M)."""
    columns = np.flatnonzero(valid)
    best = 0.0 if columns.size == 0 else np.inf
    for queries in itertools.permutations(range(cost.shape[0]), columns.size):
        best = min(best, cost[list(queries), columns].sum())
    return best


def test_assignment_is_optimal_against_brute_force():
    rng = np.random.default_rng(1)
    L, B, Q, M = 2, 6, 5, 4
    cost = rng.normal(size=(L, B, Q, M)).astype(np.float32)
    valid = rng.random((B, M)) < 0.7
    valid[0] = False  # an image without targets
    valid[1] = True  # a full one
    valid_lbm = np.broadcast_to(valid, (L, B, M))
    t2q, solved, _ = jax.jit(assign)(jnp.asarray(cost), jnp.asarray(valid_lbm))
    t2q = np.asarray(t2q)
    assert t2q.dtype == np.int32 and t2q.shape == (L, B, M) and np.asarray(solved).all()
    for l, b in itertools.product(range(L), range(B)):
        matched = t2q[l, b][valid[b]]
        assert (matched >= 0).all() and len(set(matched)) == matched.size  # once each
        assert (t2q[l, b][~valid[b]] == -1).all()
        # float32 costs summed in float64 on both sides: equal up to rounding.
        np.testing.assert_allclose(
            total_cost(cost[l, b], t2q[l, b]), brute_force_min_cost(cost[l, b], valid[b]), rtol=1e-6
        )


def test_assignment_equals_scipy_on_100_query_problems():
    rng = np.random.default_rng(2)
    L, B, Q, M = 2, 4, 100, 30
    cost = rng.uniform(size=(L, B, Q, M)).astype(np.float32)
    valid = np.zeros((B, M), bool)
    for b, k in enumerate([30, 1, 17, 0]):
        valid[b, rng.choice(M, size=k, replace=False)] = True  # not contiguous
    t2q, solved, _ = jax.jit(assign)(jnp.asarray(cost), jnp.asarray(np.broadcast_to(valid, (L, B, M))))
    t2q = np.asarray(t2q)
    assert np.asarray(solved).all()
    for l, b in itertools.product(range(L), range(B)):
        columns = np.flatnonzero(valid[b])
        assert (np.sort(np.flatnonzero(t2q[l, b] >= 0)) == columns).all()
        queries = t2q[l, b][columns]
        assert len(set(queries)) == columns.size
        if columns.size:
            rows, cols = scipy.optimize.linear_sum_assignment(cost[l, b][:, columns])
            np.testing.assert_allclose(
                total_cost(cost[l, b], t2q[l, b]), cost[l, b][rows, columns[cols]].sum(), rtol=1e-6
            )


def test_more_targets_than_queries_matches_every_query_once():
    rng = np.random.default_rng(3)
    cost = rng.normal(size=(1, 1, 3, 5)).astype(np.float32)
    t2q, solved, _ = assign(jnp.asarray(cost), jnp.ones((1, 1, 5), bool))
    t2q = np.asarray(t2q)[0, 0]
    assert np.asarray(solved).all()
    assert sorted(t2q[t2q >= 0]) == [0, 1, 2]
    rows, cols = scipy.optimize.linear_sum_assignment(cost[0, 0])
    np.testing.assert_allclose(total_cost(cost[0, 0], t2q), cost[0, 0][rows, cols].sum(), rtol=1e-6)


def test_matcher_end_to_end_optimal_for_numpy_cost():
    rng = np.random.default_rng(4)
    logits, pred_boxes, labels, boxes, valid = random_problem(rng, queries=5, max_boxes=3)
    matching = jax.jit(HungarianMatcher())(logits, pred_boxes, labels, boxes, valid)
    cost = numpy_cost(logits, pred_boxes, labels, boxes)
    t2q = np.asarray(matching.target_to_query)
    for l, b in itertools.product(range(2), range(3)):
        # the float32 device cost differs from float64 by ~1e-6; random problems have
        # gaps far larger between the best and second-best assignments.
        np.testing.assert_allclose(
            total_cost(cost[l, b], t2q[l, b]), brute_force_min_cost(cost[l, b], valid[b]), rtol=1e-5
        )
    np.testing.assert_array_equal(matching.nonfinite, 0)
    assert np.asarray(matching.solved).all()


def test_identical_images_get_identical_matches():
    rng = np.random.default_rng(5)
    logits, pred_boxes, labels, boxes, valid = random_problem(rng, batch=1)
    tile = lambda x, axis: np.repeat(x, 4, axis=axis)  # noqa: E731
    matching = jax.jit(HungarianMatcher())(
        tile(logits, 1), tile(pred_boxes, 1), tile(labels, 0), tile(boxes, 0), tile(valid, 0)
    )
    t2q = np.asarray(matching.target_to_query)
    for b in range(1, 4):
        np.testing.assert_array_equal(t2q[:, b], t2q[:, 0])
    assert (t2q[:, 0][:, valid[0]] >= 0).all()


def test_empty_targets_give_no_matches():
    rng = np.random.default_rng(6)
    logits, pred_boxes, labels, boxes, _ = random_problem(rng)
    valid = np.zeros(labels.shape, bool)
    matching = jax.jit(HungarianMatcher())(logits, pred_boxes, labels, boxes, valid)
    np.testing.assert_array_equal(matching.target_to_query, -1)
    assert np.asarray(matching.solved).all()


def test_all_layers_and_images_in_one_callback(monkeypatch):
    calls = []
    original = matcher_lib.assign_on_host

    def recording(cost, valid):
        calls.append(np.asarray(cost).shape)
        return original(cost, valid)

    monkeypatch.setattr(matcher_lib, "assign_on_host", recording)
    rng = np.random.default_rng(7)
    problem = random_problem(rng, layers=3, batch=4, queries=6, max_boxes=4)
    jax.block_until_ready(jax.jit(HungarianMatcher())(*problem))
    assert calls == [(3, 4, 6, 4)]


def test_nan_predictions_are_counted_and_still_matched():
    rng = np.random.default_rng(8)
    logits, pred_boxes, labels, boxes, _ = random_problem(rng)
    valid = np.ones(labels.shape, bool)
    logits[1, 0, 2, 0] = np.nan  # one query of image 0, layer 1: its whole cost row is NaN
    pred_boxes[0, 2] = np.nan  # every query of image 2, layer 0
    logits[0, 1, 3, 0] = np.inf  # one query of image 1, layer 0: its row, whatever the labels
    matching = jax.jit(HungarianMatcher())(logits, pred_boxes, labels, boxes, valid)
    nonfinite = np.asarray(matching.nonfinite)
    M, Q = labels.shape[1], logits.shape[2]
    np.testing.assert_array_equal(nonfinite, [[0, M, Q * M], [M, 0, 0]])
    assert np.asarray(matching.solved).all()
    assert (np.asarray(matching.target_to_query) >= 0).all()  # still a full matching


def test_solver_failure_is_reported_not_raised(monkeypatch):
    def failing(cost):
        raise ValueError("cost matrix is infeasible")

    monkeypatch.setattr(scipy.optimize, "linear_sum_assignment", failing)
    rng = np.random.default_rng(9)
    cost = rng.normal(size=(2, 3, 4, 2)).astype(np.float32)
    valid = np.array([[True, False], [False, False], [True, True]])
    t2q, solved, _ = jax.jit(assign)(jnp.asarray(cost), jnp.asarray(np.broadcast_to(valid, (2, 3, 2))))
    # image 1 has no targets, so the solver is not called for it
    np.testing.assert_array_equal(solved, [[False, True, False], [False, True, False]])
    np.testing.assert_array_equal(t2q, -1)


def test_vmap_over_matching_calls_back_once(monkeypatch):
    calls = []
    original = matcher_lib.assign_on_host

    def recording(cost, valid):
        calls.append(np.asarray(cost).shape)
        return original(cost, valid)

    monkeypatch.setattr(matcher_lib, "assign_on_host", recording)
    rng = np.random.default_rng(10)
    cost = rng.normal(size=(3, 2, 2, 5, 3)).astype(np.float32)  # [V, L, B, Q, M]
    valid = np.ones((2, 2, 3), bool)
    t2q, solved, _ = jax.jit(jax.vmap(assign, in_axes=(0, None)))(jnp.asarray(cost), jnp.asarray(valid))
    assert calls == [(3, 2, 2, 5, 3)]
    for v in range(3):
        want = assign(jnp.asarray(cost[v]), jnp.asarray(valid)).target_to_query
        np.testing.assert_array_equal(t2q[v], want)


def test_from_config_reads_the_cost_weights():
    config = loss_config()
    config.matcher_args = {"cost_bbox": 3.0}
    matcher = HungarianMatcher.from_config(config)
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (1.0, 3.0, 2.0)
    assert matcher_lib.per_device(matcher, None) is matcher  # no mesh: not wrapped in shard_map


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_cost_is_float32_for_any_logit_dtype(dtype):
    rng = np.random.default_rng(11)
    logits, pred_boxes, labels, boxes, _ = random_problem(rng)
    cost = matching_cost(jnp.asarray(logits, dtype), jnp.asarray(pred_boxes, dtype), labels, boxes)
    assert cost.dtype == jnp.float32


def _total(cost, target_to_query):
    """Sum of cost[query, target] over the matched (query, target) pairs of one problem."""
    targets = np.flatnonzero(target_to_query >= 0)
    return float(cost[target_to_query[targets], targets].sum())


@pytest.mark.parametrize("kind", ["random", "tied", "nan"])
def test_device_assignment_has_the_total_cost_of_scipys(kind):
    """loss.matcher="hungarian_device": on 6 layers x 8 images of 100 queries and 30 target
    slots (0..30 valid), every valid target is matched to a distinct query, padded slots to
    none, and the total cost equals scipy's (float32 sums: 1e-3 on totals of ~100)."""
    rng = np.random.default_rng({"random": 0, "tied": 1, "nan": 2}[kind])
    L, B, Q, M = 6, 8, 100, 30
    if kind == "tied":  # few distinct values: many optimal assignments
        cost = rng.integers(0, 4, (L, B, Q, M)).astype(np.float32)
    else:
        cost = rng.normal(size=(L, B, Q, M)).astype(np.float32) * 3
    if kind == "nan":  # a few NaN/Inf entries, which an optimal assignment avoids
        cost[rng.random(cost.shape) < 0.02] = np.nan
        cost[rng.random(cost.shape) < 0.01] = np.inf
    num_valid = rng.integers(0, M + 1, B)
    num_valid[:2] = (0, M)
    valid = np.broadcast_to(np.arange(M)[None, :] < num_valid[:, None], (L, B, M))

    device = jax.jit(matcher_lib.assign_on_device)(cost, valid)
    host = assign_on_host(cost, valid)
    np.testing.assert_array_equal(np.asarray(device.nonfinite), host[2])
    assert np.asarray(device.solved).all()
    cleaned = np.where(np.isfinite(cost), cost, matcher_lib.UNMATCHABLE_COST)
    for l in range(L):
        for b in range(B):
            got = np.asarray(device.target_to_query[l, b])
            assert (got[num_valid[b]:] == -1).all()
            matched = got[: num_valid[b]]
            assert (matched >= 0).all() and len(set(matched.tolist())) == num_valid[b]
            assert _total(cleaned[l, b], got) == pytest.approx(_total(cleaned[l, b], host[0][l, b]), abs=1e-3)


def test_device_assignment_with_more_targets_than_queries():
    rng = np.random.default_rng(3)
    cost = rng.normal(size=(2, 5, 12)).astype(np.float32)
    valid = np.broadcast_to(np.arange(12) < 9, (2, 12))
    device = matcher_lib.assign_on_device(cost, valid)
    host = assign_on_host(cost, valid)
    for p in range(2):
        got = np.asarray(device.target_to_query[p])
        assert (got[9:] == -1).all() and (got >= 0).sum() == 5  # every query used once
        assert _total(cost[p], got) == pytest.approx(_total(cost[p], host[0][p]), abs=1e-4)


def test_device_matcher_is_a_config_switch():
    config = loss_config()
    config.matcher = "hungarian_device"
    matcher = matcher_lib.MATCHERS[config.matcher](config)
    assert matcher.solver is matcher_lib.assign_on_device
    assert matcher_lib.MATCHERS["hungarian"](config).solver is assign
