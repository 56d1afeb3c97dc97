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
  loss_mask, loss_dice (with a mask head, last layer only, as the paper): sigmoid focal
             loss (mean over pixels) and DICE loss of matched predicted masks against
             their targets, summed over pairs / num_boxes.
num_boxes is the number of valid target boxes in the global batch, at least 1.

The criterion is a menu (official DETR's `SetCriterion(matcher, weight_dict, losses)`):
LOSSES maps a term's name to a `LossTerm`, a function `fn(outputs, targets, matching,
num_boxes, ctx) -> {name: value}` plus the weights it reads from the `loss` config. A
value of shape [L] (one per supervised decoder layer) is reported as `name` for the last
layer and `name_i` for layer i: the aux-layer suffixes are handled once, here. A scalar
is reported as is. Names in the weight dict add weight * value to the total loss;
the others are metrics (no gradient).

Where the sums run: called under `jax.jit` on global (sharded) arrays, every sum is
already over the global batch (XLA inserts the cross-device reductions), so no psum is
needed; only the matching runs per device (`matcher.per_device`). Called inside
a `shard_map` / per-device function instead, pass `axis_name` so num_boxes, the CE weight
sum and the metrics are summed across devices; the result is then the global loss.
Official DETR under DDP averages per-GPU CE means instead; with the global weighted mean
the loss does not depend on how the batch is split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.core import FrozenDict
from jax.sharding import Mesh

from detr_jax import box_ops
from detr_jax.matcher import MATCHERS, HungarianMatcher, Matching, per_device


def global_sum(x: jax.Array, axis_name) -> jax.Array:
    """Sum of `x`, and over the devices of `axis_name` when called per device."""
    total = jnp.sum(x)
    return total if axis_name is None else jax.lax.psum(total, axis_name)


class LossContext(NamedTuple):
    """What loss terms may need besides predictions, targets and the matching.

    num_classes: K (the "no object" class is index K); eos_coef: CE weight of "no object";
    axis_name: set when called per device (inside shard_map): sum over it for global sums.
    """

    num_classes: int
    eos_coef: float
    axis_name: Any = None


class LossTerm(NamedTuple):
    """A loss term of the menu: `fn(outputs, targets, matching, num_boxes, ctx) -> dict`,
    and `weights(loss_config) -> {name: weight}` for the names it returns that are losses."""

    fn: Callable[..., dict]
    weights: Callable[[Any], dict]


def loss_labels(outputs, targets, matching: Matching, num_boxes, ctx: LossContext) -> dict:
    """loss_ce [L]: weighted-mean CE over all queries; class_error: the last layer's
    100 - top-1 accuracy (%) of matched queries (100 when none is matched, as official DETR)."""
    del num_boxes
    logits = outputs["pred_logits"].astype(jnp.float32)
    labels = targets["labels"].astype(jnp.int32)
    num_queries = logits.shape[2]
    no_object = ctx.num_classes
    t2q = matching.target_to_query  # [L, B, M]
    # is_match[l, b, q, m]: query q is matched to target m.
    is_match = t2q[:, :, None, :] == jnp.arange(num_queries)[None, None, :, None]
    matched = is_match.any(-1)  # [L, B, Q]
    matched_label = jnp.sum(jnp.where(is_match, labels[None, :, None, :], 0), axis=-1)
    target_class = jnp.where(matched, matched_label, no_object)

    log_prob = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(log_prob, target_class[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_class == no_object, ctx.eos_coef, 1.0)
    ce_sum = jnp.sum(weight * ce, axis=(1, 2))
    weight_sum = jnp.sum(weight, axis=(1, 2))
    if ctx.axis_name is not None:
        ce_sum = jax.lax.psum(ce_sum, ctx.axis_name)
        weight_sum = jax.lax.psum(weight_sum, ctx.axis_name)

    last_matched = matched[-1]
    correct = (jnp.argmax(logits[-1], axis=-1) == target_class[-1]) & last_matched
    num_correct = global_sum(correct.astype(jnp.float32), ctx.axis_name)
    num_matched = global_sum(last_matched.astype(jnp.float32), ctx.axis_name)
    accuracy = jnp.where(num_matched > 0, 100.0 * num_correct / jnp.maximum(num_matched, 1.0), 0.0)
    return {"loss_ce": ce_sum / weight_sum, "class_error": 100.0 - accuracy}


def loss_boxes(outputs, targets, matching: Matching, num_boxes, ctx: LossContext) -> dict:
    """loss_bbox [L]: L1 (cxcywh) and loss_giou [L]: 1 - GIoU, summed over matched pairs / num_boxes."""
    pred_boxes = outputs["pred_boxes"].astype(jnp.float32)
    boxes = targets["boxes"].astype(jnp.float32)
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
    if ctx.axis_name is not None:
        l1_sum = jax.lax.psum(l1_sum, ctx.axis_name)
        giou_sum = jax.lax.psum(giou_sum, ctx.axis_name)
    return {"loss_bbox": l1_sum / num_boxes, "loss_giou": giou_sum / num_boxes}


def loss_cardinality(outputs, targets, matching: Matching, num_boxes, ctx: LossContext) -> dict:
    """cardinality_error: mean over images of |#non-"no object" predictions - #targets|
    (last layer); a metric, no gradient."""
    del matching, num_boxes
    last_logits = outputs["pred_logits"][-1]
    valid = targets["valid"].astype(bool)
    predicted = jnp.sum(jnp.argmax(last_logits, axis=-1) != ctx.num_classes, axis=-1)
    error = jnp.abs(predicted - valid.sum(-1)).astype(jnp.float32)
    num_images = jnp.asarray(error.shape[0], jnp.float32)
    if ctx.axis_name is not None:
        num_images = jax.lax.psum(num_images, ctx.axis_name)
    return {"cardinality_error": global_sum(error, ctx.axis_name) / num_images}


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """Per-element focal loss (Lin et al. 2017; official DETR's `sigmoid_focal_loss`
    before its reduction): logits and targets (0/1) of one shape -> the same shape."""
    prob = jax.nn.sigmoid(logits)
    ce = optax.sigmoid_binary_cross_entropy(logits, targets)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * ce * (1 - p_t) ** gamma


def dice_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """DICE loss per mask (official DETR's, +1 smoothing): [..., P] logits and 0/1
    targets over P pixels -> [...]."""
    prob = jax.nn.sigmoid(logits)
    numerator = 2 * jnp.sum(prob * targets, axis=-1)
    denominator = jnp.sum(prob, axis=-1) + jnp.sum(targets, axis=-1)
    return 1 - (numerator + 1) / (denominator + 1)


def loss_masks(outputs, targets, matching: Matching, num_boxes, ctx: LossContext) -> dict:
    """loss_mask: focal loss and loss_dice: DICE loss of the last layer's matched masks
    (scalars: official DETR supervises masks on the last layer only).

    outputs["pred_masks"]: [B, Q, h, w] logits on the padded batch's stride-4 grid;
    targets["masks"]: bool [B, M, H, W] at the padded image resolution. As official DETR's
    `loss_masks`, each matched prediction is upsampled bilinearly (half-pixel centres, as
    torch's align_corners=False) to the target's resolution; the focal loss is a mean over
    those pixels, padding included (official pads to the batch's largest image, we to the
    bucket), then both are summed over pairs and divided by num_boxes.
    """
    pred_masks = outputs["pred_masks"].astype(jnp.float32)
    target_masks = targets["masks"]
    t2q = matching.target_to_query[-1]  # [B, M]
    is_pair = t2q >= 0
    batch, slots, height, width = target_masks.shape
    matched = jnp.take_along_axis(pred_masks, jnp.maximum(t2q, 0)[:, :, None, None], axis=1)  # [B, M, h, w]
    matched = jax.image.resize(matched, (batch, slots, height, width), method="bilinear", antialias=False)
    matched = matched.reshape(batch, slots, -1)
    target = target_masks.reshape(batch, slots, -1).astype(jnp.float32)
    focal = jnp.mean(sigmoid_focal_loss(matched, target), axis=-1)  # [B, M]
    dice = dice_loss(matched, target)
    focal_sum = global_sum(jnp.where(is_pair, focal, 0.0), ctx.axis_name)
    dice_sum = global_sum(jnp.where(is_pair, dice, 0.0), ctx.axis_name)
    return {"loss_mask": focal_sum / num_boxes, "loss_dice": dice_sum / num_boxes}


# loss.losses names -> terms
LOSSES: dict[str, LossTerm] = {
    "labels": LossTerm(loss_labels, lambda c: {"loss_ce": float(c.class_coef)}),
    "boxes": LossTerm(loss_boxes, lambda c: {"loss_bbox": float(c.bbox_coef), "loss_giou": float(c.giou_coef)}),
    "cardinality": LossTerm(loss_cardinality, lambda c: {}),
    "masks": LossTerm(loss_masks, lambda c: {"loss_mask": float(c.mask_coef), "loss_dice": float(c.dice_coef)}),
}

DEFAULT_LOSSES = ("labels", "boxes", "cardinality")
DEFAULT_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


@dataclasses.dataclass(frozen=True)
class SetCriterion:
    """DETR's set prediction loss: a matcher, a menu of loss terms and their weights.

    Attributes:
      num_classes: K, max class id + 1; the logits have K + 1 entries ("no object" last).
      matcher: `matcher(pred_logits, pred_boxes, labels, boxes, valid) -> Matching` (see
        detr_jax.matcher; `matcher.per_device` for one that runs per device under a mesh).
      weight_dict: {loss name: weight} of the terms added to the total (the same for every
        decoder layer).
      losses: names of LOSSES terms to compute (looked up when called, so a term
        registered after import is found).
      eos_coef: cross-entropy weight of the "no object" class.
      aux_loss: supervise every decoder layer, not only the last.
    """

    num_classes: int
    matcher: Callable[..., Matching] = HungarianMatcher()
    weight_dict: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    losses: tuple[str, ...] = DEFAULT_LOSSES
    eos_coef: float = 0.1
    aux_loss: bool = True

    def __post_init__(self):
        # hashable, so the criterion itself can be jitted (jax.jit hashes the callable)
        object.__setattr__(self, "weight_dict", FrozenDict(self.weight_dict))
        object.__setattr__(self, "losses", tuple(self.losses))

    @classmethod
    def from_config(cls, loss_config, num_classes: int, mesh: Mesh | None = None) -> "SetCriterion":
        """From the config's `loss` section; with a mesh the matcher runs per device."""
        weight_dict = {}
        for name in loss_config.losses:
            weight_dict.update(LOSSES[name].weights(loss_config))
        return cls(
            num_classes=int(num_classes),
            matcher=per_device(MATCHERS[loss_config.matcher](loss_config), mesh),
            weight_dict=weight_dict,
            losses=tuple(loss_config.losses),
            eos_coef=float(loss_config.eos_coef),
            aux_loss=bool(loss_config.aux_loss),
        )

    def __call__(
        self, outputs: dict, targets: dict, *, axis_name=None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The weighted total loss and the per-term losses and metrics.

        Args:
          outputs: {"pred_logits": [L, B, Q, K+1] float (bfloat16 is fine; the loss is
            float32), "pred_boxes": [L, B, Q, 4] normalized cxcywh, and any intermediates
            a term needs}; index -1 of L is the last decoder layer.
          targets: {"labels": [B, M] int, "boxes": [B, M, 4] normalized cxcywh,
            "valid": [B, M] bool}.
          axis_name: set only when called per device (inside shard_map); the batch axis
            name(s) to sum over. The matcher must then be a local one (not per_device).
        Returns:
          (loss, metrics). loss: scalar, sum of weight * term over the supervised layers.
          metrics (scalars, all float32):
            loss_ce, loss_bbox, loss_giou (default terms): unweighted, last layer;
            loss_ce_i, ...: decoder layer i (0-based), for every layer but the last, when
              aux_loss;
            loss: the weighted total (same as the first return value);
            class_error, cardinality_error: see loss_labels, loss_cardinality;
            num_boxes: the normalizer (valid targets in the global batch, at least 1);
            nonfinite_cost: number of images whose matching cost had NaN/Inf entries
              (non-finite predictions) in any supervised layer; 0 in a healthy run;
            matching_failed: number of (layer, image) pairs the solver failed on
              (their targets left unmatched); 0 in a healthy run.
          Only the loss terms carry a gradient.
        """
        supervised = self.supervised_layers(outputs)
        matching = self.matcher(
            supervised["pred_logits"],
            supervised["pred_boxes"],
            targets["labels"].astype(jnp.int32),
            targets["boxes"],
            targets["valid"].astype(bool),
        )
        return self.loss_for_matching(outputs, targets, matching, axis_name=axis_name)

    def supervised_layers(self, outputs: dict) -> dict:
        """`outputs` with pred_logits/pred_boxes cut to the supervised layers ([-1:] without aux_loss)."""
        if self.aux_loss:
            return outputs
        return {**outputs, "pred_logits": outputs["pred_logits"][-1:], "pred_boxes": outputs["pred_boxes"][-1:]}

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
        supervised = self.supervised_layers(outputs)
        num_layers = supervised["pred_logits"].shape[0]
        valid = targets["valid"].astype(bool)
        num_boxes = jnp.maximum(global_sum(valid.astype(jnp.float32), axis_name), 1.0)
        ctx = LossContext(self.num_classes, self.eos_coef, axis_name)

        metrics, weighted_keys = {}, set()
        per_layer, once = [], []  # (weight, value) of the weighted terms
        for name in self.losses:
            for key, value in LOSSES[name].fn(supervised, targets, matching, num_boxes, ctx).items():
                layered = value.ndim == 1  # one value per supervised layer
                names = [key if l == num_layers - 1 else f"{key}_{l}" for l in range(num_layers)] if layered else [key]
                metrics.update(zip(names, value if layered else [value]))
                if key in self.weight_dict:
                    weighted_keys.update(names)
                    (per_layer if layered else once).append((self.weight_dict[key], value))
        total = jnp.zeros((), jnp.float32)
        for layer in range(num_layers):  # layer by layer, terms in menu order
            layer_total = None
            for weight, value in per_layer:
                layer_total = weight * value[layer] if layer_total is None else layer_total + weight * value[layer]
            if layer_total is not None:
                total = total + layer_total
        for weight, value in once:
            total = total + weight * value
        metrics["loss"] = total
        metrics["num_boxes"] = num_boxes
        metrics["nonfinite_cost"] = global_sum((matching.nonfinite > 0).any(axis=0).astype(jnp.float32), axis_name)
        metrics["matching_failed"] = global_sum((~matching.solved).astype(jnp.float32), axis_name)
        metrics = {k: v if k in weighted_keys or k == "loss" else jax.lax.stop_gradient(v) for k, v in metrics.items()}
        return total, metrics
