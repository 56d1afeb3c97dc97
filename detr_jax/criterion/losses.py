"""DETR's set prediction loss (official DETR's SetCriterion), jit-able and shard-safe.

For each supervised decoder layer, after Hungarian matching (`detr_jax.criterion.matcher`):
  loss_ce:   the class convention's classification loss over ALL queries
             (`detr_jax.criterion.class_convention`); matched queries target their object's class,
             the others "no object" (RT-DETR's varifocal convention: with the IoU of the matched
             box as the class's soft target, so loss_ce is its loss_vfl). DETR's: cross-entropy with class weights 1, and
             eos_coef for "no object", the weighted mean sum(w_i * ce_i) / sum(w_i) over
             every query of the (global) batch, like torch's
             `F.cross_entropy(..., weight=empty_weight)`; the sigmoid convention's: the
             focal loss summed over queries and classes / num_boxes.
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

Outputs are named branches: the top-level `pred_logits`/`pred_boxes` are the main branch
(every decoder layer); a detector may add others under the names of BRANCHES ("enc": the
two-stage encoder proposals, "dn": denoising queries, "one2many": hybrid matching), each
a dict of the same keys, matched by its own rule: a branch that carries its assignment
(`target_to_query`, e.g. denoising queries made from the targets; with G * M slots for G
denoising groups, each trained against its copy of the targets, normalized by G times the
boxes) uses it, the others are matched by the criterion's matcher. A branch that carries
its own `targets` ({"labels", "boxes", "valid"} [B, G * M], the M targets repeated G
times: hybrid matching's one2many branch, `models.hybrid`) is matched (by the matcher) and
trained against them, normalized by G times the boxes as the references'. A branch may be
weighted as a whole (`SetCriterion.branch_weights`: one2many's `loss.one2many_coef`, the
reference's lambda_one2many). A branch with `class_agnostic` (a bool scalar) True
is matched and trained as if every target were class 0 (official two-stage Deformable
DETR's encoder proposals, its `bin_targets`). A branch's metrics are suffixed with its
name as the references do: `loss_bbox_enc`, `loss_bbox_dn_3` (layer 3 of the dn branch).

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
from flax.core import FrozenDict
from jax.sharding import Mesh

from detr_jax.ops import box_ops
from detr_jax.criterion.class_convention import CLASS_CONVENTIONS, ClassConvention, SoftmaxNoObject
from detr_jax.criterion.focal_loss import sigmoid_focal_loss
from detr_jax.criterion.matcher import MATCHERS, HungarianMatcher, Matching, per_device


def global_sum(x: jax.Array, axis_name) -> jax.Array:
    """Sum of `x`, and over the devices of `axis_name` when called per device."""
    total = jnp.sum(x)
    return total if axis_name is None else jax.lax.psum(total, axis_name)


class LossContext(NamedTuple):
    """What loss terms may need besides predictions, targets and the matching.

    num_classes: K (a target class of K means "no object"); classes: the class convention
    (`detr_jax.criterion.class_convention`); axis_name: set when called per device (inside
    shard_map): sum over it for global sums.
    """

    num_classes: int
    classes: ClassConvention
    axis_name: Any = None


class LossTerm(NamedTuple):
    """A loss term of the menu: `fn(outputs, targets, matching, num_boxes, ctx) -> dict`,
    and `weights(loss_config) -> {name: weight}` for the names it returns that are losses.
    every_branch: computed on every output branch (False: the main branch only, for a
    term that reads outputs only the main branch has, such as pred_masks)."""

    fn: Callable[..., dict]
    weights: Callable[[Any], dict]
    every_branch: bool = True


def matched_pairs(outputs, targets, matching: Matching) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The matched (prediction, target) box pairs per target slot: (predicted boxes [L, B, M, 4]
    float32, target boxes [L, B, M, 4], is_pair [L, B, M] bool). Unmatched slots compare one
    dummy box with itself (0.5 everywhere): their padded target boxes can be garbage, NaN
    included, and must not leak into sums or gradients."""
    pred_boxes = outputs["pred_boxes"].astype(jnp.float32)
    t2q = matching.target_to_query  # [L, B, M]
    is_pair = t2q >= 0
    # the query matched to each target slot
    matched_pred = jnp.take_along_axis(pred_boxes, jnp.maximum(t2q, 0)[..., None], axis=2)
    target = jnp.broadcast_to(targets["boxes"].astype(jnp.float32)[None], matched_pred.shape)
    return (jnp.where(is_pair[..., None], matched_pred, 0.5), jnp.where(is_pair[..., None], target, 0.5),
            is_pair)


def loss_labels(outputs, targets, matching: Matching, num_boxes, ctx: LossContext) -> dict:
    """loss_ce [L]: the class convention's loss over all queries (given, for soft targets,
    each matched query's IoU with its target, no gradient); class_error: the last layer's
    100 - top-1 accuracy (%) of matched queries (100 when none is matched, as official
    DETR)."""
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
    pred, target, is_pair = matched_pairs(outputs, targets, matching)
    iou = jnp.where(is_pair, box_ops.paired_iou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(target))[0], 0)
    quality = jax.lax.stop_gradient(jnp.sum(jnp.where(is_match, iou[:, :, None, :], 0.0), axis=-1))  # [L, B, Q]

    loss_ce = ctx.classes.loss(logits, target_class, num_boxes, ctx.axis_name, quality=quality)

    last_matched = matched[-1]
    correct = (jnp.argmax(logits[-1], axis=-1) == target_class[-1]) & last_matched
    num_correct = global_sum(correct.astype(jnp.float32), ctx.axis_name)
    num_matched = global_sum(last_matched.astype(jnp.float32), ctx.axis_name)
    accuracy = jnp.where(num_matched > 0, 100.0 * num_correct / jnp.maximum(num_matched, 1.0), 0.0)
    return {"loss_ce": loss_ce, "class_error": 100.0 - accuracy}


def loss_boxes(outputs, targets, matching: Matching, num_boxes, ctx: LossContext) -> dict:
    """loss_bbox [L]: L1 (cxcywh) and loss_giou [L]: 1 - GIoU, summed over matched pairs / num_boxes."""
    matched_pred, target, is_pair = matched_pairs(outputs, targets, matching)
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
    """cardinality_error: mean over images of |#queries predicting an object - #targets|
    (last layer; which queries predict one, the class convention says); a metric, no
    gradient."""
    del matching, num_boxes
    last_logits = outputs["pred_logits"][-1]
    valid = targets["valid"].astype(bool)
    predicted = jnp.sum(ctx.classes.predicted_objects(last_logits), axis=-1)
    error = jnp.abs(predicted - valid.sum(-1)).astype(jnp.float32)
    num_images = jnp.asarray(error.shape[0], jnp.float32)
    if ctx.axis_name is not None:
        num_images = jax.lax.psum(num_images, ctx.axis_name)
    return {"cardinality_error": global_sum(error, ctx.axis_name) / num_images}


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
    "masks": LossTerm(loss_masks, lambda c: {"loss_mask": float(c.mask_coef), "loss_dice": float(c.dice_coef)},
                      every_branch=False),
}

DEFAULT_LOSSES = ("labels", "boxes", "cardinality")
DEFAULT_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}

# Output branches besides the main one (see the module docstring), in the order their
# losses are added.
BRANCHES = ("enc", "dn", "one2many")


@dataclasses.dataclass(frozen=True)
class SetCriterion:
    """DETR's set prediction loss: a matcher, a menu of loss terms and their weights.

    Attributes:
      num_classes: K, max class id + 1.
      matcher: `matcher(pred_logits, pred_boxes, labels, boxes, valid) -> Matching` (see
        detr_jax.criterion.matcher; `matcher.per_device` for one that runs per device under a mesh).
      weight_dict: {loss name: weight} of the terms added to the total (the same for every
        decoder layer).
      losses: names of LOSSES terms to compute (looked up when called, so a term
        registered after import is found).
      classes: the class convention (DETR's softmax with "no object", C = K + 1 logits,
        by default); it owns the classification loss and cardinality.
      aux_loss: supervise every decoder layer, not only the last.
      branch_weights: {branch name: factor} multiplying every weighted term of that branch
        (hybrid matching's one2many: loss.one2many_coef); 1 for a branch not named.
    """

    num_classes: int
    matcher: Callable[..., Matching] = HungarianMatcher()
    weight_dict: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    losses: tuple[str, ...] = DEFAULT_LOSSES
    classes: ClassConvention = SoftmaxNoObject()
    aux_loss: bool = True
    branch_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # hashable, so the criterion itself can be jitted (jax.jit hashes the callable)
        object.__setattr__(self, "weight_dict", FrozenDict(self.weight_dict))
        object.__setattr__(self, "branch_weights", FrozenDict(self.branch_weights))
        object.__setattr__(self, "losses", tuple(self.losses))

    @classmethod
    def from_config(cls, loss_config, num_classes: int, mesh: Mesh | None = None,
                    classes: ClassConvention | None = None) -> "SetCriterion":
        """From the config's `loss` section; with a mesh the matcher runs per device.
        classes: the detector's class convention (`models.build_class_convention`);
        None: DETR's, softmax with "no object" weighted by loss.eos_coef."""
        classes = CLASS_CONVENTIONS["softmax"].from_config(loss_config) if classes is None else classes
        weight_dict = {}
        for name in loss_config.losses:
            weight_dict.update(LOSSES[name].weights(loss_config))
        return cls(
            num_classes=int(num_classes),
            matcher=per_device(MATCHERS[loss_config.matcher](loss_config, classes), mesh),
            weight_dict=weight_dict,
            losses=tuple(loss_config.losses),
            classes=classes,
            aux_loss=bool(loss_config.aux_loss),
            branch_weights={"one2many": float(loss_config.one2many_coef)},
        )

    def __call__(
        self, outputs: dict, targets: dict, *, axis_name=None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The weighted total loss and the per-term losses and metrics.

        Args:
          outputs: {"pred_logits": [L, B, Q, C] float (C as the class convention reads
            them; bfloat16 is fine, the loss is float32), "pred_boxes": [L, B, Q, 4]
            normalized cxcywh, any intermediates a term needs, and any BRANCHES, each
            {"pred_logits": [L', B, Q', C], "pred_boxes": [L', B, Q', 4], optionally
            "target_to_query": [L', B, M] or [B, M] int32, the query of each target slot
            (-1: none) when the branch's assignment is known; or "targets": the targets
            repeated G times [B, G * M] the branch is matched against}; index -1 of L is the
            last decoder layer.
          targets: {"labels": [B, M] int, "boxes": [B, M, 4] normalized cxcywh,
            "valid": [B, M] bool}.
          axis_name: set only when called per device (inside shard_map); the batch axis
            name(s) to sum over. The matcher must then be a local one (not per_device).
        Returns:
          (loss, metrics). loss: scalar, sum of weight * term over the supervised layers
          of every branch.
          metrics (scalars, all float32):
            loss_ce, loss_bbox, loss_giou (default terms): unweighted, last layer;
            loss_ce_i, ...: decoder layer i (0-based), for every layer but the last, when
              aux_loss;
            loss_ce_enc, loss_ce_dn_i, ...: the same for each other branch;
            loss: the weighted total (same as the first return value);
            class_error, cardinality_error: see loss_labels, loss_cardinality;
            num_boxes: the normalizer (valid targets in the global batch, at least 1);
            nonfinite_cost: number of images whose matching cost had NaN/Inf entries
              (non-finite predictions) in any supervised layer; 0 in a healthy run;
            matching_failed: number of (layer, image) pairs the solver failed on
              (their targets left unmatched); 0 in a healthy run.
          Only the loss terms carry a gradient.
        """
        matchings = {name: self.match(branch, targets) for name, branch in self.branches(outputs).items()}
        return self.loss_for_matching(outputs, targets, matchings, axis_name=axis_name)

    def supervised_layers(self, outputs: dict) -> dict:
        """`outputs` with pred_logits/pred_boxes cut to the supervised layers ([-1:] without aux_loss)."""
        if self.aux_loss:
            return outputs
        return {**outputs, "pred_logits": outputs["pred_logits"][-1:], "pred_boxes": outputs["pred_boxes"][-1:]}

    def branches(self, outputs: dict) -> dict[str, dict]:
        """{"main": the supervised layers of `outputs`, and each of BRANCHES it has: its own}."""
        found = {"main": self.supervised_layers(outputs)}
        found.update((name, self.supervised_layers(outputs[name])) for name in BRANCHES if name in outputs)
        return found

    @staticmethod
    def groups(branch: dict, targets: dict) -> int:
        """G, the copies of the M targets a branch is trained against: its `target_to_query`
        has G * M slots (denoising groups, `models.denoising`: entry g * M + m is target m's
        query in group g), or its own `targets` (hybrid matching's one2many: the targets
        repeated G = k_one2many times); 1 for every other branch."""
        if "targets" in branch:
            slots = branch["targets"]["valid"].shape[-1]
        elif "target_to_query" in branch:
            slots = branch["target_to_query"].shape[-1]
        else:
            return 1
        num_targets = targets["valid"].shape[-1]
        if slots % num_targets:
            raise ValueError(f"a branch's target_to_query has {slots} slots, not a multiple of the {num_targets} "
                             "targets")
        return slots // num_targets

    @staticmethod
    def branch_targets(branch: dict, targets: dict) -> dict:
        """The targets a branch is matched and trained against: its own `targets` if it
        carries them, else `targets` (labels, boxes, valid) repeated G = `groups` times
        along M; with every label 0 when the branch is `class_agnostic`."""
        groups = SetCriterion.groups(branch, targets)
        if "targets" in branch:
            targets = {**targets, **branch["targets"]}
        elif groups > 1:
            targets = {**targets, **{k: jnp.concatenate([targets[k]] * groups, axis=1)
                                     for k in ("labels", "boxes", "valid")}}
        if "class_agnostic" not in branch:
            return targets
        return {**targets, "labels": jnp.where(branch["class_agnostic"], 0, targets["labels"])}

    def match(self, branch: dict, targets: dict) -> Matching:
        """One branch's matching ([L', B, M] fields): its own `target_to_query` if it has
        one (matched by construction), else the matcher's."""
        targets = self.branch_targets(branch, targets)
        if "target_to_query" in branch:
            layers, batch = branch["pred_logits"].shape[:2]
            known = branch["target_to_query"]
            known = known[-layers:] if known.ndim == 3 else known  # the supervised layers'
            known = jnp.broadcast_to(known, (layers,) + targets["valid"].shape).astype(jnp.int32)
            return Matching(jnp.where(targets["valid"].astype(bool), known, -1), jnp.ones((layers, batch), bool),
                            jnp.zeros((layers, batch), jnp.int32))
        return self.matcher(
            branch["pred_logits"],
            branch["pred_boxes"],
            targets["labels"].astype(jnp.int32),
            targets["boxes"],
            targets["valid"].astype(bool),
        )

    def loss_for_matching(
        self, outputs: dict, targets: dict, matching: Matching | Mapping[str, Matching], *, axis_name=None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The loss for a given matching (what `__call__` returns after matching).

        Args:
          outputs, targets, axis_name: as in `__call__`.
          matching: the main branch's, from `self.matcher` on the supervised layers (all L
            layers, or only the last one, [1, B, ...], when aux_loss is False); or
            {branch name: its matching} for every branch of `self.branches(outputs)`.
        Returns:
          (loss, metrics) as in `__call__`.
        """
        matchings = matching if isinstance(matching, Mapping) else {"main": matching}
        valid = targets["valid"].astype(bool)
        num_boxes = jnp.maximum(global_sum(valid.astype(jnp.float32), axis_name), 1.0)
        ctx = LossContext(self.num_classes, self.classes, axis_name)

        metrics, weighted_keys = {}, set()
        total = jnp.zeros((), jnp.float32)
        for branch_name, branch in self.branches(outputs).items():
            num_layers = branch["pred_logits"].shape[0]
            suffix = "" if branch_name == "main" else f"_{branch_name}"
            per_layer, once = [], []  # (weight, value) of the weighted terms
            branch_targets = self.branch_targets(branch, targets)
            # G copies of every target: normalized by G times as many boxes, as the references
            # (RT-DETR's num_boxes * dn_num_group, DINO's num_boxes * scalar).
            branch_boxes = num_boxes * self.groups(branch, targets)
            for name in self.losses:
                term = LOSSES[name]
                if branch_name != "main" and not term.every_branch:
                    continue
                for key, value in term.fn(branch, branch_targets, matchings[branch_name], branch_boxes, ctx).items():
                    layered = value.ndim == 1  # one value per supervised layer
                    names = [f"{key}{suffix}" if l == num_layers - 1 else f"{key}{suffix}_{l}"
                             for l in range(num_layers)] if layered else [f"{key}{suffix}"]
                    metrics.update(zip(names, value if layered else [value]))
                    if key in self.weight_dict:
                        weighted_keys.update(names)
                        weight = self.weight_dict[key]
                        if branch_name in self.branch_weights:
                            weight = weight * self.branch_weights[branch_name]
                        (per_layer if layered else once).append((weight, value))
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
        nonfinite = jnp.concatenate([m.nonfinite for m in matchings.values()])  # [layers of all branches, B]
        solved = jnp.concatenate([m.solved for m in matchings.values()])
        metrics["nonfinite_cost"] = global_sum((nonfinite > 0).any(axis=0).astype(jnp.float32), axis_name)
        metrics["matching_failed"] = global_sum((~solved).astype(jnp.float32), axis_name)
        metrics = {k: v if k in weighted_keys or k == "loss" else jax.lax.stop_gradient(v) for k, v in metrics.items()}
        return total, metrics
