"""Hungarian matching of predictions to targets: cost on device, assignment on host (or,
as an option, on device).

The cost of matching query q to target m (official DETR's HungarianMatcher):

    cost_class * class_cost(logits_q, label_m)      (-softmax(logits_q)[label_m] for DETR;
                                                   the class convention's, see
                                                   detr_jax.criterion.class_convention)
  + cost_bbox  * L1(box_q, box_m)                 (normalized cxcywh)
  + cost_giou  * -GIoU(xyxy(box_q), xyxy(box_m))

It is computed on device for every decoder layer and image at once ([L, B, Q, M]); then
ONE `jax.pure_callback` per step solves every (layer, image) problem with
`scipy.optimize.linear_sum_assignment`, on the valid target columns only (padded targets
are dropped from the problem, so they can never be matched). Under a mesh, `per_device`
wraps any matcher in `jax.shard_map` over the "data" mesh axis so each device solves its
own shard of the batch (left to the SPMD partitioner, the callback would run on device 0
on the gathered batch; on CPU with several devices that was seen to deadlock).

A matcher is anything callable as `matcher(pred_logits, pred_boxes, labels, boxes, valid)
-> Matching` on one device's shard; MATCHERS maps `loss.matcher` names to builders
`(loss_config, classes) -> matcher`, `classes` being the detector's class convention.

Never raising inside the callback (undefined behaviour in JAX), the host validates and
reports instead: NaN/Inf costs (from non-finite predictions) are replaced by
UNMATCHABLE_COST before the solver and counted in `Matching.nonfinite`, and
`Matching.solved` is False where the solver failed. The check is on host because on XLA
CPU a device-side count fused with the cost computation made the step ~5x slower; on
host it is one vectorized `np.isfinite` in the common all-finite case.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from detr_jax.ops import box_ops
from detr_jax.runtime import sharding
from detr_jax.criterion.class_convention import ClassConvention, SoftmaxNoObject

# Replaces NaN/Inf costs before the solver. Finite costs are O(10) (class cost in [-1, 0],
# L1 of normalized boxes <= 4, GIoU in [-1, 1], default weights <= 5).
UNMATCHABLE_COST = 1e6


class Matching(NamedTuple):
    """Result of `HungarianMatcher` (and `assign`) for every decoder layer l and image b.

    target_to_query: [L, B, M] int32, index of the query matched to target slot m, or -1
        for padded slots and for valid targets left unmatched (more targets than queries,
        or a solver failure).
    solved: [L, B] bool, False where the solver failed (all slots are then -1).
    nonfinite: [L, B] int32, number of NaN/Inf entries in the cost of the valid targets
        (from a NaN/Inf prediction); they were solved as UNMATCHABLE_COST.
    """

    target_to_query: jax.Array
    solved: jax.Array
    nonfinite: jax.Array


def matching_cost(
    pred_logits: jax.Array,
    pred_boxes: jax.Array,
    labels: jax.Array,
    boxes: jax.Array,
    *,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    classes: ClassConvention = SoftmaxNoObject(),
) -> jax.Array:
    """The matching cost of every query with every target slot (padded slots included).

    Args:
      pred_logits: [L, B, Q, C] class logits (any float dtype; computed in float32), read
        by `classes` (DETR's softmax with "no object" by default: C = K + 1).
      pred_boxes: [L, B, Q, 4] normalized cxcywh.
      labels: [B, M] int class ids of the targets.
      boxes: [B, M, 4] normalized cxcywh target boxes.
    Returns:
      [L, B, Q, M] float32 cost; NaN/Inf where predictions or targets are non-finite.
    """
    pred_boxes = pred_boxes.astype(jnp.float32)
    boxes = boxes.astype(jnp.float32)
    class_cost = classes.matching_cost(pred_logits, labels)

    # Coordinate by coordinate: XLA CPU ran the [L, B, Q, M, 4] form ~10x slower.
    bbox_cost = sum(
        jnp.abs(pred_boxes[..., i][..., :, None] - boxes[..., i][None, :, None, :])
        for i in range(4)
    )
    giou_cost = -box_ops.pairwise_generalized_iou(
        box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(boxes)[None]
    )
    return cost_class * class_cost + cost_bbox * bbox_cost + cost_giou * giou_cost


def assign_on_host(
    cost: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum-cost assignment of every problem with scipy; runs on host, never raises.

    Args:
      cost: [..., Q, M] float cost per problem; may hold NaN/Inf.
      valid: [..., M] bool, the target slots to match (same leading dims as `cost`).
    Returns:
      target_to_query [..., M] int32, the query matched to each slot, -1 where unmatched;
      solved [...] bool, False where the solver raised (its slots are then all -1);
      nonfinite [...] int32, NaN/Inf entries in the valid columns (solved as
        UNMATCHABLE_COST).
    """
    cost = np.asarray(cost)
    valid = np.asarray(valid, dtype=bool)
    leading = cost.shape[:-2]
    num_targets = cost.shape[-1]
    flat_cost = cost.reshape((-1,) + cost.shape[-2:])
    flat_valid = np.broadcast_to(valid, leading + (num_targets,)).reshape(-1, num_targets)
    nonfinite = np.zeros(flat_cost.shape[0], dtype=np.int32)
    finite = np.isfinite(flat_cost)
    if not finite.all():
        nonfinite = (~finite & flat_valid[:, None, :]).sum(axis=(1, 2), dtype=np.int32)
        flat_cost = np.where(finite, flat_cost, UNMATCHABLE_COST)
    target_to_query = np.full(flat_valid.shape, -1, dtype=np.int32)
    solved = np.ones(flat_cost.shape[0], dtype=bool)
    for i in range(flat_cost.shape[0]):
        columns = np.flatnonzero(flat_valid[i])
        if columns.size == 0:
            continue
        try:
            rows, cols = scipy.optimize.linear_sum_assignment(flat_cost[i][:, columns])
            target_to_query[i, columns[cols]] = rows
        except Exception:  # noqa: BLE001 -- raising in a callback is undefined behaviour
            solved[i] = False
    return (
        target_to_query.reshape(leading + (num_targets,)),
        solved.reshape(leading),
        nonfinite.reshape(leading),
    )


def assign(cost: jax.Array, valid: jax.Array) -> Matching:
    """`assign_on_host` as one `jax.pure_callback` (jit/vmap-able, no gradient).

    Args:
      cost: [..., Q, M] float32 (NaN/Inf allowed: counted and replaced on host).
      valid: [..., M] bool with the same leading dims.
    Returns:
      Matching(target_to_query [..., M] int32, solved [...] bool, nonfinite [...] int32).
    """
    cost = jax.lax.stop_gradient(cost)
    result_shapes = Matching(
        target_to_query=jax.ShapeDtypeStruct(valid.shape, jnp.int32),
        solved=jax.ShapeDtypeStruct(valid.shape[:-1], jnp.bool_),
        nonfinite=jax.ShapeDtypeStruct(valid.shape[:-1], jnp.int32),
    )
    # broadcast_all: under vmap the callback still runs once, on inputs with an extra
    # leading dim, which assign_on_host handles like any other leading dim.
    return jax.pure_callback(
        _call_assign_on_host, result_shapes, cost, valid, vmap_method="broadcast_all"
    )


def assign_on_device(cost: jax.Array, valid: jax.Array) -> Matching:
    """The same assignment inside the jitted step: optax's exact Hungarian algorithm,
    vmapped over every problem (no host callback, so the step can be cached and sharded
    like any other program).

    Args / returns as `assign`. Ties may be broken differently from scipy; the total cost
    is the same. Padded slots and NaN/Inf entries (counted in `nonfinite`) cost more than
    any valid finite entry of their problem, so a valid target is never passed over for
    them; the constant is small (twice the largest |cost| plus one), not
    UNMATCHABLE_COST, because optax's float32 potentials would lose the real costs' bits
    next to 1e6.
    """
    cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
    valid = jnp.asarray(valid, bool)[..., None, :]
    finite = jnp.isfinite(cost)
    nonfinite = jnp.sum(~finite & valid, axis=(-2, -1), dtype=jnp.int32)
    usable = finite & valid
    worst = jnp.max(jnp.where(usable, jnp.abs(cost), 0.0), axis=(-2, -1), keepdims=True)
    cost = jnp.where(usable, cost, 2.0 * worst + 1.0)
    leading, (num_queries, num_targets) = cost.shape[:-2], cost.shape[-2:]
    flat = cost.reshape((-1, num_queries, num_targets))
    rows, cols = jax.vmap(optax.assignment.hungarian_algorithm)(flat)  # [N, min(Q, M)] each
    problems = jnp.arange(flat.shape[0])[:, None]
    target_to_query = jnp.full((flat.shape[0], num_targets), -1, jnp.int32).at[problems, cols].set(
        rows.astype(jnp.int32))
    target_to_query = jnp.where(valid[..., 0, :], target_to_query.reshape(leading + (num_targets,)), -1)
    return Matching(target_to_query, jnp.ones(leading, bool), nonfinite)


def _call_assign_on_host(cost, valid):
    # Looked up at call time so tests can observe the shards the callback receives.
    return Matching(*assign_on_host(cost, valid))


@dataclasses.dataclass(frozen=True)
class HungarianMatcher:
    """Matches DETR predictions to padded targets, all decoder layers in one callback.

    Attributes:
      cost_class, cost_bbox, cost_giou: weights of the matching cost terms.
      solver: (cost, valid) -> Matching: `assign` (scipy on host) or `assign_on_device`.
      classes: the class convention whose class cost is used (DETR's by default).
    """

    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    solver: Callable[..., Matching] = assign
    classes: ClassConvention = SoftmaxNoObject()

    def __post_init__(self):
        for name in ("cost_class", "cost_bbox", "cost_giou"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number >= 0")

    @classmethod
    def from_config(cls, loss_config, classes: ClassConvention = SoftmaxNoObject(),
                    solver: Callable[..., Matching] = assign) -> "HungarianMatcher":
        """From the config's `loss` section: loss.matcher_args sets the cost weights
        (cost_class, cost_bbox, cost_giou) over the defaults above."""
        return cls(**dict(loss_config.matcher_args), solver=solver, classes=classes)

    def __call__(self, pred_logits, pred_boxes, labels, boxes, valid) -> Matching:
        """Matches every layer and image of one device's batch (no sharding logic).

        Args:
          pred_logits: [L, B, Q, C] (C as `classes` reads them); pred_boxes: [L, B, Q, 4]
            normalized cxcywh.
          labels: [B, M] int; boxes: [B, M, 4] normalized cxcywh; valid: [B, M] bool.
        Returns:
          Matching with [L, B, ...] fields.
        """
        cost = matching_cost(
            pred_logits,
            pred_boxes,
            labels,
            boxes,
            cost_class=self.cost_class,
            cost_bbox=self.cost_bbox,
            cost_giou=self.cost_giou,
            classes=self.classes,
        )
        return self.solver(cost, jnp.broadcast_to(valid, cost.shape[:2] + valid.shape[-1:]))


# loss.matcher -> builder (loss_config, classes) -> matcher. "hungarian": scipy on host (the
# default); "hungarian_device": the exact solver inside the step.
MATCHERS: dict[str, Callable[[Any, ClassConvention], Callable[..., Matching]]] = {
    "hungarian": HungarianMatcher.from_config,
    "hungarian_device": functools.partial(HungarianMatcher.from_config, solver=assign_on_device),
}


@dataclasses.dataclass(frozen=True)
class ShardedMatcher:
    """A matcher run by each device on its own shard of the batch (inside `jax.shard_map`).

    Called on global arrays under `jax.jit`: predictions [L, B, ...] and targets [B, ...]
    split along B over the mesh's data axis (B must be divisible by its size).
    """

    matcher: Callable[..., Matching]
    mesh: Mesh

    def __call__(self, pred_logits, pred_boxes, labels, boxes, valid) -> Matching:
        per_layer, per_image = P(None, sharding.DATA_AXIS), P(sharding.DATA_AXIS)
        # No varying-value typing: optax's Hungarian while_loop (the device solver) starts
        # from constants, which that typing rejects next to per-device costs; the matching
        # carries no gradient, where the typing matters.
        fn = sharding.per_device(self.matcher, self.mesh,
                                 in_specs=(per_layer, per_layer, per_image, per_image, per_image),
                                 out_specs=per_layer, check_vma=False)
        return fn(pred_logits, pred_boxes, labels, boxes, valid)


def per_device(matcher: Callable[..., Matching], mesh: Mesh | None) -> Callable[..., Matching]:
    """`matcher` run per device on its batch shard under `mesh`; as is without a mesh."""
    return matcher if mesh is None else ShardedMatcher(matcher, mesh)
