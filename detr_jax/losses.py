"""DETR's set prediction loss (official DETR's SetCriterion), jit-able and shard-safe.

For each supervised decoder layer, after Hungarian matching (`detr_jax.matcher`):
  loss_ce:   cross-entropy over ALL queries; matched queries target their object's class,
             the others "no object" (index K). Class weights are 1, and eos_coef for "no
             object"; the reduction is the weighted mean sum(w_i * ce_i) / sum(w_i) over
             every query of the (global) batch, like torch's
             `F.cross_entropy(..., weight=empty_weight)`.
  loss_bbox: L1 between matched predicted and target boxes (normalized cxcywh, as in the
             matching cost), summed over pairs and coordinates, divided by num_boxes.
  loss_giou: sum over matched pairs of (1 - GIoU) / num_boxes.
num_boxes is the number of valid target boxes in the global batch, at least 1.

Where the sums run: called under `jax.jit` on global (sharded) arrays, every sum is
already over the global batch (XLA inserts the cross-device reductions), so no psum is
needed; only the matching runs per device (`HungarianMatcher` with a mesh). Called inside
a `shard_map` / per-device function instead, pass `axis_name` so num_boxes, the CE weight
sum and the metrics are summed across devices; the result is then the global loss.
Official DETR under DDP averages per-GPU CE means instead; with the global weighted mean
the loss does not depend on how the batch is split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from detr_jax import box_ops
from detr_jax.matcher import HungarianMatcher, Matching


def _sum(x: jax.Array, axis_name) -> jax.Array:
    total = jnp.sum(x)
    return total if axis_name is None else jax.lax.psum(total, axis_name)


@dataclasses.dataclass(frozen=True)
class SetCriterion:
    """DETR's set prediction loss.

    Attributes:
      num_classes: K, max class id + 1; the logits have K + 1 entries ("no object" last).
      cost_class, cost_bbox, cost_giou: matching cost weights.
      class_coef, bbox_coef, giou_coef: weights of loss_ce, loss_bbox, loss_giou in the
        total (the same for every decoder layer).
      eos_coef: cross-entropy weight of the "no object" class.
      aux_loss: supervise every decoder layer, not only the last.
      mesh: optional Mesh; the matching then runs per device on its shard of the batch.
      data_axis: mesh axis name (or tuple) the batch is split over.
    """

    num_classes: int
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    class_coef: float = 1.0
    bbox_coef: float = 5.0
    giou_coef: float = 2.0
    eos_coef: float = 0.1
    aux_loss: bool = True
    mesh: Mesh | None = None
    data_axis: Any = "data"

    @classmethod
    def from_config(
        cls, loss_config, num_classes: int, mesh: Mesh | None = None, data_axis: Any = "data"
    ) -> "SetCriterion":
        """From the config's `loss` section (see `detr_jax.config.loss_config`)."""
        return cls(
            num_classes=int(num_classes),
            cost_class=float(loss_config.cost_class),
            cost_bbox=float(loss_config.cost_bbox),
            cost_giou=float(loss_config.cost_giou),
            class_coef=float(loss_config.class_coef),
            bbox_coef=float(loss_config.bbox_coef),
            giou_coef=float(loss_config.giou_coef),
            eos_coef=float(loss_config.eos_coef),
            aux_loss=bool(loss_config.aux_loss),
            mesh=mesh,
            data_axis=data_axis,
        )

    @property
    def matcher(self) -> HungarianMatcher:
        return HungarianMatcher(
            cost_class=self.cost_class,
            cost_bbox=self.cost_bbox,
            cost_giou=self.cost_giou,
            mesh=self.mesh,
            data_axis=self.data_axis,
        )

    def __call__(
        self, outputs: dict, targets: dict, *, axis_name=None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The weighted total loss and the per-term losses and metrics.

        Args:
          outputs: {"pred_logits": [L, B, Q, K+1] float (bfloat16 is fine; the loss is
            float32), "pred_boxes": [L, B, Q, 4] normalized cxcywh}; index -1 of L is the
            last decoder layer.
          targets: {"labels": [B, M] int, "boxes": [B, M, 4] normalized cxcywh,
            "valid": [B, M] bool}.
          axis_name: set only when called per device (inside shard_map); the batch axis
            name(s) to sum over. Leave `mesh` unset then (matching is already local).
        Returns:
          (loss, metrics). loss: scalar, sum of coef * term over the supervised layers.
          metrics (scalars, all float32):
            loss_ce, loss_bbox, loss_giou: unweighted terms of the last layer;
            loss_ce_i, loss_bbox_i, loss_giou_i: decoder layer i (0-based), for every
              layer but the last, when aux_loss;
            loss: the weighted total (same as the first return value);
            class_error: 100 - top-1 accuracy (%) of the last layer's matched queries
              (100 when no target is matched, as official DETR);
            cardinality_error: mean over images of |#queries not predicting "no object"
              - #targets| (last layer);
            num_boxes: the normalizer (valid targets in the global batch, at least 1);
            nonfinite_cost: number of images whose matching cost had NaN/Inf entries
              (non-finite predictions) in any supervised layer; 0 in a healthy run;
            matching_failed: number of (layer, image) pairs the solver failed on
              (their targets left unmatched); 0 in a healthy run.
          The metrics carry no gradient.
        """
        pred_logits, pred_boxes = self._supervised_layers(outputs)
        matching = self.matcher(
            pred_logits,
            pred_boxes,
            targets["labels"].astype(jnp.int32),
            targets["boxes"],
            targets["valid"].astype(bool),
        )
        return self.loss_for_matching(outputs, targets, matching, axis_name=axis_name)

    def _supervised_layers(self, outputs):
        pred_logits = outputs["pred_logits"]
        pred_boxes = outputs["pred_boxes"]
        if not self.aux_loss:
            pred_logits, pred_boxes = pred_logits[-1:], pred_boxes[-1:]
        return pred_logits, pred_boxes

    def loss_for_matching(
        self, outputs: dict, targets: dict, matching: Matching, *, axis_name=None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The loss for a given matching (what `__call__` returns after matching).

        Args:
          outputs, targets, axis_name: as in `__call__`.
          matching: from `self.matcher` on the supervised layers (all L layers, or only
            the last one, [1, B, ...], when aux_loss is False).
        Returns:
          (loss, metrics) as in `__call__`.
        """
        pred_logits, pred_boxes = self._supervised_layers(outputs)
        labels = targets["labels"].astype(jnp.int32)
        boxes = targets["boxes"].astype(jnp.float32)
        valid = targets["valid"].astype(bool)
        num_layers = pred_logits.shape[0]
        num_boxes = jnp.maximum(_sum(valid.astype(jnp.float32), axis_name), 1.0)

        loss_ce, class_error = self._class_loss(pred_logits, labels, matching, axis_name)
        loss_bbox, loss_giou = self._box_losses(pred_boxes, boxes, matching, num_boxes, axis_name)

        metrics = {}
        total = jnp.zeros((), jnp.float32)
        for layer in range(num_layers):
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            metrics["loss_ce" + suffix] = loss_ce[layer]
            metrics["loss_bbox" + suffix] = loss_bbox[layer]
            metrics["loss_giou" + suffix] = loss_giou[layer]
            total = total + (
                self.class_coef * loss_ce[layer]
                + self.bbox_coef * loss_bbox[layer]
                + self.giou_coef * loss_giou[layer]
            )
        metrics["loss"] = total
        metrics["class_error"] = class_error
        metrics["cardinality_error"] = self._cardinality_error(pred_logits[-1], valid, axis_name)
        metrics["num_boxes"] = num_boxes
        metrics["nonfinite_cost"] = _sum(
            (matching.nonfinite > 0).any(axis=0).astype(jnp.float32), axis_name
        )
        metrics["matching_failed"] = _sum((~matching.solved).astype(jnp.float32), axis_name)
        metrics = {
            k: v if k.startswith("loss") else jax.lax.stop_gradient(v) for k, v in metrics.items()
        }
        return total, metrics

    def _class_loss(self, pred_logits, labels, matching: Matching, axis_name):
        """Per-layer weighted-mean CE [L] and the last layer's class_error (scalar)."""
        logits = pred_logits.astype(jnp.float32)
        num_queries = logits.shape[2]
        no_object = self.num_classes
        t2q = matching.target_to_query  # [L, B, M]
        # is_match[l, b, q, m]: query q is matched to target m.
        is_match = t2q[:, :, None, :] == jnp.arange(num_queries)[None, None, :, None]
        matched = is_match.any(-1)  # [L, B, Q]
        matched_label = jnp.sum(jnp.where(is_match, labels[None, :, None, :], 0), axis=-1)
        target_class = jnp.where(matched, matched_label, no_object)

        log_prob = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(log_prob, target_class[..., None], axis=-1)[..., 0]
        weight = jnp.where(target_class == no_object, self.eos_coef, 1.0)
        ce_sum = jnp.sum(weight * ce, axis=(1, 2))
        weight_sum = jnp.sum(weight, axis=(1, 2))
        if axis_name is not None:
            ce_sum = jax.lax.psum(ce_sum, axis_name)
            weight_sum = jax.lax.psum(weight_sum, axis_name)
        loss_ce = ce_sum / weight_sum

        last_matched = matched[-1]
        correct = (jnp.argmax(logits[-1], axis=-1) == target_class[-1]) & last_matched
        num_correct = _sum(correct.astype(jnp.float32), axis_name)
        num_matched = _sum(last_matched.astype(jnp.float32), axis_name)
        accuracy = jnp.where(
            num_matched > 0, 100.0 * num_correct / jnp.maximum(num_matched, 1.0), 0.0
        )
        return loss_ce, 100.0 - accuracy

    def _box_losses(self, pred_boxes, boxes, matching: Matching, num_boxes, axis_name):
        """Per-layer L1 and (1 - GIoU) sums over matched pairs / num_boxes, each [L]."""
        pred_boxes = pred_boxes.astype(jnp.float32)
        t2q = matching.target_to_query  # [L, B, M]
        is_pair = t2q >= 0
        matched_pred = jnp.take_along_axis(
            pred_boxes, jnp.maximum(t2q, 0)[..., None], axis=2
        )  # [L, B, M, 4]: the query matched to each target slot
        # Unmatched slots compare one dummy box with itself (zero loss, zero gradient):
        # their padded target boxes can be garbage, NaN included, and must not leak into
        # the sums or the gradient.
        target = jnp.broadcast_to(boxes[None], matched_pred.shape)
        matched_pred = jnp.where(is_pair[..., None], matched_pred, 0.5)
        target = jnp.where(is_pair[..., None], target, 0.5)

        l1 = jnp.abs(matched_pred - target).sum(-1)
        giou = box_ops.paired_generalized_iou(
            box_ops.cxcywh_to_xyxy(matched_pred), box_ops.cxcywh_to_xyxy(target)
        )
        l1_sum = jnp.sum(jnp.where(is_pair, l1, 0.0), axis=(1, 2))
        giou_sum = jnp.sum(jnp.where(is_pair, 1.0 - giou, 0.0), axis=(1, 2))
        if axis_name is not None:
            l1_sum = jax.lax.psum(l1_sum, axis_name)
            giou_sum = jax.lax.psum(giou_sum, axis_name)
        return l1_sum / num_boxes, giou_sum / num_boxes

    def _cardinality_error(self, last_logits, valid, axis_name):
        """Mean over images of |#non-"no object" predictions - #targets|; no gradient."""
        predicted = jnp.sum(jnp.argmax(last_logits, axis=-1) != self.num_classes, axis=-1)
        error = jnp.abs(predicted - valid.sum(-1)).astype(jnp.float32)
        num_images = jnp.asarray(error.shape[0], jnp.float32)
        if axis_name is not None:
            num_images = jax.lax.psum(num_images, axis_name)
        return _sum(error, axis_name) / num_images
