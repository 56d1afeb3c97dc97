"""Predictions -> detections, and the one jitted predict function of evaluation and inference.

Post-processing follows official DETR's `PostProcess`: the detector's class convention
ranks the detections (`detr_jax.criterion.class_convention`; DETR's: softmax over the classes, the
"no object" class dropped, each query's best remaining class and its probability, every
query kept; the sigmoid convention's: the best (query, class) pairs over all queries and
classes, as official Deformable DETR), boxes from normalized (cx, cy, w, h) to pixel
(x0, y0, x1, y1) of the ORIGINAL image. For COCO evaluation there is no threshold and no
NMS, as in the originals; `select_detections` then thresholds, sorts and clips one image's
detections for display.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from detr_jax.ops import box_ops
from detr_jax.criterion.class_convention import ClassConvention, SoftmaxNoObject
from detr_jax.runtime.sharding import batch_sharded, replicated


def postprocess(pred_logits: jax.Array, pred_boxes: jax.Array, orig_size: jax.Array,
                classes: ClassConvention = SoftmaxNoObject()) -> dict[str, jax.Array]:
    """Official DETR's PostProcess (of the detector's class convention `classes`).

    Args:
      pred_logits: [B, Q, C] class logits (DETR's: C = K + 1, the last "no object").
      pred_boxes: [B, Q, 4] normalized (cx, cy, w, h), relative to the unpadded image.
      orig_size: [B, 2] (h, w) of the original image, in pixels.

    Returns N = `classes.num_detections(Q, K)` detections per image (DETR: one per query):
      scores float32 [B, N]: the class probability;
      labels int32 [B, N]: that class (a category id, 0..K-1);
      boxes float32 [B, N, 4]: pixel (x0, y0, x1, y1) in the original image (not clipped);
      queries int32 [B, N]: the query of each detection, only where the convention does
        not keep every query in order (detection i is query i otherwise).
    """
    scores, labels, queries = classes.detections(pred_logits)
    h, w = orig_size[:, 0].astype(jnp.float32), orig_size[:, 1].astype(jnp.float32)
    scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
    boxes = box_ops.cxcywh_to_xyxy(pred_boxes.astype(jnp.float32)) * scale
    if queries is None:
        return {"scores": scores, "labels": labels, "boxes": boxes}
    boxes = jnp.take_along_axis(boxes, queries[..., None], axis=1)
    return {"scores": scores, "labels": labels, "boxes": boxes, "queries": queries}


def make_predict_fn(model, mesh: Mesh, classes: ClassConvention = SoftmaxNoObject()) -> Callable:
    """Jitted fn(variables, image, mask, orig_size) -> `postprocess` output of the last layer
    (ranked by the detector's class convention `classes`).

    The batch arguments and the outputs are sharded over the mesh's "data" axis, the
    variables replicated. Shapes: image [B, H, W, 3], mask [B, H, W], orig_size [B, 2].
    A model with a mask head adds its raw outputs, for the host-side segmentation
    post-processing (`detr_jax.evaluation.segmentation_postprocess`): pred_logits float32
    [B, Q, K + 1] and pred_masks float32 [B, Q, H/4, W/4]. Used by the Evaluator (global
    batches) and the Predictor (compiled ahead of time per bucket shape).
    """
    batch, full = batch_sharded(mesh), replicated(mesh)

    def predict(variables, image, mask, orig_size):
        out = model.apply(variables, image, mask, train=False)
        result = postprocess(out["pred_logits"][-1], out["pred_boxes"][-1], orig_size, classes)
        if "pred_masks" in out:
            result.update(pred_logits=out["pred_logits"][-1].astype(jnp.float32), pred_masks=out["pred_masks"])
        return result

    return jax.jit(predict, in_shardings=(full, batch, batch, batch), out_shardings=batch)


@dataclasses.dataclass
class Detections:
    """Detections of one image, best first.

    Attributes:
      boxes: float32 [N, 4] pixel (x0, y0, x1, y1) in the original image.
      scores: float32 [N] class probabilities.
      labels: int32 [N] category ids.
      names: [N] category names.
      queries: int32 [N] index of the object query that produced each detection.
      image_size: (h, w) of the original image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    queries: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    def to_json(self) -> dict:
        """JSON-ready dict: image size and a list of {label, name, score, box_xyxy}."""
        return {
            "height": int(self.image_size[0]),
            "width": int(self.image_size[1]),
            "detections": [
                {
                    "label": int(label),
                    "name": name,
                    "score": round(float(score), 5),
                    "box_xyxy": [round(float(v), 2) for v in box],
                }
                for box, score, label, name in zip(self.boxes, self.scores, self.labels, self.names)
            ],
        }


def class_name(class_names: Mapping[int, str] | Sequence[str] | None, label: int) -> str:
    """Name of category `label`; "class {label}" when unknown."""
    label = int(label)
    if isinstance(class_names, Mapping):
        return class_names.get(label, f"class {label}")
    if class_names is not None and 0 <= label < len(class_names):
        return class_names[label]
    return f"class {label}"


def select_detections(
    scores: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    image_size: tuple[int, int],
    score_threshold: float = 0.0,
    top_k: int | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    clip: bool = True,
    queries: np.ndarray | None = None,
) -> Detections:
    """One image's post-processed detections -> Detections with score >= threshold, best top_k.

    Args:
      scores: [N]; labels: [N]; boxes: [N, 4] pixel xyxy (as from `postprocess`).
      queries: [N] the query of each detection (`postprocess`'s, where it gives them);
        None: detection i is query i.
      image_size: (h, w) of the original image; boxes are clipped to it when `clip`.
      top_k: keep at most this many (None or 0: all).
    """
    scores = np.asarray(scores, np.float32)
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= score_threshold]
    if top_k:
        order = order[:top_k]
    picked = np.asarray(boxes, np.float32)[order]
    if clip:
        h, w = image_size
        picked = np.clip(picked, 0.0, np.array([w, h, w, h], np.float32))
    picked_labels = np.asarray(labels, np.int32)[order]
    return Detections(
        boxes=picked,
        scores=scores[order],
        labels=picked_labels,
        names=[class_name(class_names, label) for label in picked_labels],
        queries=(order if queries is None else np.asarray(queries)[order]).astype(np.int32),
        image_size=(int(image_size[0]), int(image_size[1])),
    )
