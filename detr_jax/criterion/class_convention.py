"""How a detector's class logits are read: the one object that knows it.

DETR scores a query with a softmax over K classes plus "no object"; everything after it
with K independent sigmoids, trained by a focal loss (Conditional and DAB-DETR, Deformable
DETR, DINO) or a varifocal loss (RT-DETR: the matched class's target is the IoU of the
query's box with its object). The convention owns every place where that differs: the class
term of the matching cost, the classification loss, which queries count as predicted
objects (cardinality), and the scores post-processing ranks. The matcher, the loss
terms, post-processing, evaluation, export and analysis ask it; nothing else branches
on it. A new convention is one class here plus an entry in CLASS_CONVENTIONS.

Shapes: logits [..., Q, C] with C = `num_logits(K)`; targets as class ids 0..K-1 with
K (= num_classes) marking a query matched to nothing ("no object").
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from detr_jax.criterion.focal_loss import sigmoid_focal_loss
from detr_jax.criterion.varifocal_loss import varifocal_loss


class ClassConvention(Protocol):
    """What a class convention answers (SoftmaxNoObject and SigmoidFocal below)."""

    @classmethod
    def from_config(cls, loss_config) -> "ClassConvention":
        """The convention with its settings from the config's `loss` section."""

    def num_logits(self, num_classes: int) -> int:
        """C, the class head's width for K = num_classes."""

    def num_detections(self, num_queries: int, num_classes: int) -> int:
        """N, the detections per image of `detections`."""

    def matching_cost(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """The matching cost's class term: logits [L, B, Q, C], labels [B, M] -> [L, B, Q, M]."""

    def loss(self, logits: jax.Array, target_class: jax.Array, num_boxes: jax.Array, axis_name=None,
             quality: jax.Array | None = None) -> jax.Array:
        """The classification loss of each layer: [L, B, Q, C], [L, B, Q] -> [L]. quality
        [L, B, Q]: the IoU of each matched query's box with its target (0 for the others),
        for a convention whose targets are soft (varifocal); the others ignore it."""

    def predicted_objects(self, logits: jax.Array) -> jax.Array:
        """Which queries predict an object: [..., Q, C] -> bool [..., Q]."""

    def query_scores(self, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each query's best class and its probability: [..., C] -> ([...], [...])."""

    def detections(self, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Post-processing's ranking: [B, Q, C] -> (scores [B, N], labels [B, N], the
        query of each detection [B, N] int32, or None where detection i is query i)."""


def _label_index(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The index of each target's class in the logits, for a gather along their last axis:
    logits [L, B, Q, C], labels [B, M] -> [L, B, Q, M] int32. Padded slots hold arbitrary
    labels: clipped so the gather stays in range."""
    num_layers, batch, num_queries, num_logits = logits.shape
    index = jnp.clip(labels.astype(jnp.int32), 0, num_logits - 1)
    return jnp.broadcast_to(index[None, :, None, :], (num_layers, batch, num_queries, labels.shape[-1]))


def _onehot(logits: jax.Array, target_class: jax.Array) -> jax.Array:
    """[..., K] float32 one-hot targets of class ids [...], all zeros for K ("no object")."""
    num_classes = logits.shape[-1]
    return jax.nn.one_hot(target_class, num_classes + 1, dtype=jnp.float32)[..., :num_classes]


def _sum_layers(x: jax.Array, axis_name) -> jax.Array:
    """[L, ...] -> [L]: the sum over everything but the first axis, and over the devices
    of `axis_name` when called per device."""
    total = jnp.sum(x, axis=tuple(range(1, x.ndim)))
    return total if axis_name is None else jax.lax.psum(total, axis_name)


@dataclasses.dataclass(frozen=True)
class SoftmaxNoObject:
    """Official DETR's: a softmax over K + 1 logits, the last one "no object".

    eos_coef: the cross-entropy weight of "no object" (the other classes weigh 1).
    """

    eos_coef: float = 0.1

    @classmethod
    def from_config(cls, loss_config) -> "SoftmaxNoObject":
        return cls(eos_coef=float(loss_config.eos_coef))

    @staticmethod
    def num_logits(num_classes: int) -> int:
        return num_classes + 1

    @staticmethod
    def num_detections(num_queries: int, num_classes: int) -> int:
        """Detections per image that post-processing gives: one per query."""
        del num_classes
        return num_queries

    def matching_cost(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """-softmax(logits)[label]: logits [L, B, Q, K+1], labels [B, M] -> [L, B, Q, M]
        float32; a query with a NaN or +Inf logit is NaN in every column (reported as a
        non-finite cost whatever the labels are, as a softmax would spread it)."""
        logits = logits.astype(jnp.float32)
        label_index = _label_index(logits, labels)
        # softmax(logits)[label] as exp(logit[label] - logsumexp(logits)): gathering from the
        # logits instead of from a softmax output kept XLA CPU ~3x faster next to the callback.
        log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        cost = -jnp.exp(jnp.take_along_axis(logits, label_index, axis=-1) - log_norm)
        return jnp.where(jnp.isfinite(log_norm), cost, jnp.nan)

    def loss(self, logits: jax.Array, target_class: jax.Array, num_boxes: jax.Array, axis_name=None,
             quality: jax.Array | None = None) -> jax.Array:
        """Cross-entropy over ALL queries, as torch's `F.cross_entropy(..., weight)`: the
        weighted mean sum(w_i ce_i) / sum(w_i) over the (global) batch, w = eos_coef for
        "no object" and 1 otherwise. logits [L, B, Q, K+1], target_class [L, B, Q] -> [L].
        num_boxes and quality are not used (the weights normalize)."""
        del num_boxes, quality
        no_object = logits.shape[-1] - 1
        log_prob = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(log_prob, target_class[..., None], axis=-1)[..., 0]
        weight = jnp.where(target_class == no_object, self.eos_coef, 1.0)
        return _sum_layers(weight * ce, axis_name) / _sum_layers(weight, axis_name)

    @staticmethod
    def predicted_objects(logits: jax.Array) -> jax.Array:
        """[..., Q, K+1] -> bool [..., Q]: the most probable class is not "no object"."""
        return jnp.argmax(logits, axis=-1) != logits.shape[-1] - 1

    @staticmethod
    def query_scores(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each query's best class other than "no object" and its probability:
        [..., K+1] -> (scores float32 [...], labels int32 [...] category ids 0..K-1)."""
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., :-1]
        return probs.max(-1), probs.argmax(-1).astype(jnp.int32)

    def detections(self, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Official DETR's `PostProcess`: every query kept, with its best class.
        logits [B, Q, K+1] -> (scores [B, Q], labels [B, Q], queries None: query i is
        detection i)."""
        scores, labels = self.query_scores(logits)
        return scores, labels, None


@dataclasses.dataclass(frozen=True)
class SigmoidFocal:
    """K independent sigmoids, trained with the focal loss (Deformable DETR and after).

    alpha, gamma: the focal loss's (and the focal matching cost's) settings.
    num_select: detections kept per image by post-processing, the best (query, class)
      pairs over all queries x classes (official Deformable DETR's `PostProcess`: 100).
    """

    alpha: float = 0.25
    gamma: float = 2.0
    num_select: int = 100

    @classmethod
    def from_config(cls, loss_config) -> "SigmoidFocal":
        return cls(alpha=float(loss_config.focal_alpha), gamma=float(loss_config.focal_gamma))

    @staticmethod
    def num_logits(num_classes: int) -> int:
        return num_classes

    def num_detections(self, num_queries: int, num_classes: int) -> int:
        return min(self.num_select, num_queries * num_classes)

    def matching_cost(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """The focal cost of the references (Deformable DETR's HungarianMatcher):
        alpha (1-p)^g (-log p) - (1-alpha) p^g (-log(1-p)) at the target's class.
        logits [L, B, Q, K], labels [B, M] -> [L, B, Q, M] float32; a query with a
        non-finite logit is NaN in every column."""
        logits = logits.astype(jnp.float32)
        label_index = _label_index(logits, labels)
        prob = jax.nn.sigmoid(jnp.take_along_axis(logits, label_index, axis=-1))
        negative = (1 - self.alpha) * prob**self.gamma * -jnp.log(1 - prob + 1e-8)
        positive = self.alpha * (1 - prob) ** self.gamma * -jnp.log(prob + 1e-8)
        finite = jnp.isfinite(logits).all(-1, keepdims=True)
        return jnp.where(finite, positive - negative, jnp.nan)

    def loss(self, logits: jax.Array, target_class: jax.Array, num_boxes: jax.Array, axis_name=None,
             quality: jax.Array | None = None) -> jax.Array:
        """The references' `loss_ce`: the focal loss of every (query, class) against the
        one-hot target (all zeros for "no object"), summed over queries, classes and the
        (global) batch, divided by num_boxes. logits [L, B, Q, K], target_class
        [L, B, Q] (K = "no object") -> [L]; quality is not used."""
        del quality
        focal = sigmoid_focal_loss(logits.astype(jnp.float32), _onehot(logits, target_class), self.alpha, self.gamma)
        return _sum_layers(focal, axis_name) / num_boxes

    @staticmethod
    def predicted_objects(logits: jax.Array) -> jax.Array:
        """[..., Q, K] -> bool [..., Q]: some class is more likely than not (sigmoid > 0.5,
        as Hugging Face's Deformable DETR loss; official Deformable DETR counts
        `argmax != K - 1`, DETR's rule read on sigmoid logits)."""
        return jnp.max(logits, axis=-1) > 0

    @staticmethod
    def query_scores(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each query's most probable class and its probability: [..., K] ->
        (scores float32 [...], labels int32 [...])."""
        probs = jax.nn.sigmoid(logits.astype(jnp.float32))
        return probs.max(-1), probs.argmax(-1).astype(jnp.int32)

    def detections(self, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Official Deformable DETR's `PostProcess`: the `num_select` most probable
        (query, class) pairs of each image. logits [B, Q, K] -> (scores [B, N], labels
        [B, N], queries [B, N] int32) with N = min(num_select, Q * K), best first."""
        batch, num_queries, num_classes = logits.shape
        probs = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(batch, num_queries * num_classes)
        scores, index = jax.lax.top_k(probs, self.num_detections(num_queries, num_classes))
        return scores, (index % num_classes).astype(jnp.int32), (index // num_classes).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SigmoidVarifocal(SigmoidFocal):
    """K independent sigmoids trained with the varifocal loss (RT-DETR's IoU-aware
    classification: official lyuwenyu/RT-DETR's `loss_labels_vfl`, Hugging Face's
    `RTDetrLoss`); matched, counted and post-processed as SigmoidFocal.

    alpha, gamma: the focal matching cost's (RT-DETR's matcher: 0.25, 2).
    vfl_alpha, vfl_gamma: the varifocal loss's (RT-DETR's criterion: 0.75, 2).
    num_select: detections kept per image (RT-DETR's `RTDETRPostProcessor`: 300).
    """

    num_select: int = 300
    vfl_alpha: float = 0.75
    vfl_gamma: float = 2.0

    @classmethod
    def from_config(cls, loss_config) -> "SigmoidVarifocal":
        return cls(alpha=float(loss_config.focal_alpha), gamma=float(loss_config.focal_gamma),
                   vfl_alpha=float(loss_config.varifocal_alpha), vfl_gamma=float(loss_config.varifocal_gamma))

    def loss(self, logits: jax.Array, target_class: jax.Array, num_boxes: jax.Array, axis_name=None,
             quality: jax.Array | None = None) -> jax.Array:
        """The varifocal loss of every (query, class): the matched class's target is the
        query's `quality` [L, B, Q] (the IoU of its box with its target), every other target
        0; summed over queries, classes and the (global) batch, divided by num_boxes (the
        references' mean over queries times their number). logits [L, B, Q, K],
        target_class [L, B, Q] (K = "no object") -> [L]."""
        if quality is None:
            raise ValueError("the varifocal loss needs each matched query's IoU with its target (quality)")
        vfl = varifocal_loss(logits.astype(jnp.float32), _onehot(logits, target_class), quality.astype(jnp.float32),
                             self.vfl_alpha, self.vfl_gamma)
        return _sum_layers(vfl, axis_name) / num_boxes


# model.class_convention -> the convention's class. "" in the config: the detector's own
# (its DETECTORS entry says which).
CLASS_CONVENTIONS: dict[str, type] = {"softmax": SoftmaxNoObject, "sigmoid_focal": SigmoidFocal,
                                      "sigmoid_varifocal": SigmoidVarifocal}
