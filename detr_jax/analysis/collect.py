"""One batched, jitted pass over a dataset split: every query slot's prediction on every
image, and the head-averaged attention maps of the first images.

The split is read by the evaluation pipeline (`data.make_eval_iterator`: evaluation resize,
bucket padding, in order), the batch is split over this host's devices, and one jitted
function per bucket shape returns the predictions and the attention maps together. The
attention maps are copied to the host only for the images that are drawn.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from detr_jax.analysis.attention import forward_with_attention
from detr_jax.config.errors import ConfigError
from detr_jax.data import make_eval_iterator
from detr_jax.criterion.class_convention import ClassConvention, SoftmaxNoObject
from detr_jax.models import build_class_convention
from detr_jax.runtime.sharding import DATA_AXIS, batch_sharded, data_size, make_mesh, replicated


@dataclasses.dataclass
class AttentionSample:
    """One image's attention maps (last-selected layers, averaged over heads), or where its
    deformable attention samples.

    Attributes:
      index: the image's index in the source.
      size: (h, w) the image was resized to (the unpadded part of the model's input).
      stride: input pixels per feature cell (the padded input over the feature map).
      feature_mask: bool [h_f, w_f], True on the feature cells of real pixels (a
        multi-level model's: its first, finest level's).
      encoder: float32 [S, S] encoder self-attention (row = query cell), S = h_f * w_f
        row-major; None when the model has no encoder layer or no dense one.
      decoder: float32 [Q, S] decoder cross-attention of each query slot; None when the
        decoder's cross-attention is deformable.
      sampling_locations: float32 [Q, H, L, P, 2] the decoder's deformable cross-attention:
        normalized (x, y) over the padded input of each head's P points on each of L
        levels; None for dense attention.
      sampling_weights: float32 [Q, H, L, P] their weights (softmax over L x P per head).
      padded_size: (H, W) of the padded input the locations are normalized over.
    """

    index: int
    size: tuple[int, int]
    stride: tuple[float, float]
    feature_mask: np.ndarray
    encoder: np.ndarray | None
    decoder: np.ndarray | None
    sampling_locations: np.ndarray | None = None
    sampling_weights: np.ndarray | None = None
    padded_size: tuple[int, int] | None = None


@dataclasses.dataclass
class SlotPredictions:
    """Every slot's prediction on each image (N images in source order, Q slots).

    Attributes:
      scores: float32 [N, Q] probability of the slot's best class (other than "no object").
      labels: int32 [N, Q] that class.
      boxes: float32 [N, Q, 4] normalized (cx, cy, w, h) of the unpadded image.
      source_index: int64 [N]; image_id: int64 [N] the dataset's ids.
      attention: the first images' attention maps.
    """

    scores: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    source_index: np.ndarray
    image_id: np.ndarray
    attention: list[AttentionSample]


def make_analysis_fn(model, mesh, encoder_layer: int = -1, decoder_layer: int = -1,
                     classes: ClassConvention = SoftmaxNoObject()):
    """Jitted fn(variables, image [B, H, W, 3], mask [B, H, W]) -> {scores [B, Q], labels
    [B, Q] (each query's best class as the class convention `classes` reads it), boxes
    [B, Q, 4] (last decoder layer), decoder_attention [B, Q, S] (cross-attention
    of `decoder_layer`), encoder_attention [B, S, S] (self-attention of `encoder_layer`; absent
    without an encoder), feature_mask [B, h, w]}; attention averaged over heads. Where the
    cross-attention is deformable instead, decoder_locations [B, Q, H, L, P, 2] and
    decoder_weights [B, Q, H, L, P] of `decoder_layer` take decoder_attention's place
    (per head), and feature_mask is the first level's."""
    batch, full = batch_sharded(mesh), replicated(mesh)

    def analysis(variables, image, mask):
        outputs, attention = forward_with_attention(
            model, variables, image, mask, encoder_layers=(encoder_layer,), decoder_layers=(decoder_layer,),
            average_heads=True)
        scores, labels = classes.query_scores(outputs["pred_logits"][-1])
        # A multi-level model has a mask per level: its first (finest) stands for it.
        feature_mask = outputs["memory_mask"]
        if isinstance(feature_mask, (tuple, list)):
            feature_mask = feature_mask[0]
        result = {"scores": scores, "labels": labels, "boxes": outputs["pred_boxes"][-1], "feature_mask": feature_mask}
        if "decoder_cross" in attention:
            result["decoder_attention"] = attention["decoder_cross"][0]
        if "decoder_cross_locations" in attention:
            result["decoder_locations"] = attention["decoder_cross_locations"][0]
            result["decoder_weights"] = attention["decoder_cross_weights"][0]
        if "encoder_self" in attention:
            result["encoder_attention"] = attention["encoder_self"][0]
        return result

    return jax.jit(analysis, in_shardings=(full, batch, batch), out_shardings=batch)


def collect_predictions(
    model,
    variables,
    config: ml_collections.ConfigDict,
    source,
    *,
    max_images: int | None = None,
    attention_images: int = 8,
    batch_size: int | None = None,
    encoder_layer: int = -1,
    decoder_layer: int = -1,
    progress: bool = True,
) -> SlotPredictions:
    """Runs `model` over the first `max_images` images of `source` (all when None).

    Args:
      model: a DETR; variables: {"params", "frozen_bn"}.
      config: the full config (`data` for resizing and buckets, `eval.batch_size`).
      source: a DetectionSource (`data.make_source(config.data, split)`).
      attention_images: keep the attention maps of this many first images.
      batch_size: images per batch (default eval.batch_size); a multiple of this host's
        device count.
    """
    mesh = make_mesh(jax.local_devices())
    batch_size = int(batch_size or config.eval.batch_size)
    if batch_size % data_size(mesh):
        raise ConfigError(f"batch size {batch_size} must be a multiple of the {data_size(mesh)} devices of the "
                          f"mesh's '{DATA_AXIS}' axis")
    total = len(source) if max_images is None else min(int(max_images), len(source))
    if total < 1:
        raise ValueError("no images to analyze")
    fn = make_analysis_fn(model, mesh, encoder_layer, decoder_layer, build_class_convention(config))
    variables = jax.device_put(dict(variables), replicated(mesh))
    sharding = batch_sharded(mesh)
    batches = make_eval_iterator(config.data, batch_size, 0, 1, source=source)
    keep = {"scores": [], "labels": [], "boxes": [], "image_id": []}
    attention: list[AttentionSample] = []
    seen = 0
    with tqdm(total=total, unit="image", desc="analyze", disable=not progress) as bar:
        for _ in range(math.ceil(total / batch_size)):
            batch = next(batches)
            args = [jax.device_put(batch[key], sharding) for key in ("image", "mask")]
            out = fn(variables, *args)
            rows = min(batch_size, total - seen, int(batch["is_real"].sum()))
            for key in ("scores", "labels", "boxes"):
                keep[key].append(np.asarray(out[key][:rows]))
            keep["image_id"].append(batch["image_id"][:rows])
            wanted = min(rows, attention_images - len(attention))
            if wanted > 0:
                attention += _attention_samples(out, batch, seen, wanted)
            seen += rows
            bar.update(rows)
    return SlotPredictions(
        scores=np.concatenate(keep["scores"]).astype(np.float32),
        labels=np.concatenate(keep["labels"]).astype(np.int32),
        boxes=np.concatenate(keep["boxes"]).astype(np.float32),
        source_index=np.arange(total, dtype=np.int64),
        image_id=np.concatenate(keep["image_id"]).astype(np.int64),
        attention=attention,
    )


def _attention_samples(out: dict, batch: dict, first_index: int, count: int) -> list[AttentionSample]:
    """The first `count` rows' attention maps, copied to the host."""
    def host(key):
        return np.asarray(out[key][:count], np.float32) if key in out else None

    feature_mask = np.asarray(out["feature_mask"][:count])
    decoder, encoder = host("decoder_attention"), host("encoder_attention")
    locations, weights = host("decoder_locations"), host("decoder_weights")
    padded_h, padded_w = batch["mask"].shape[1:]
    stride = (padded_h / feature_mask.shape[1], padded_w / feature_mask.shape[2])

    def row(array, i):
        return None if array is None else array[i]

    return [
        AttentionSample(index=first_index + i, size=tuple(int(v) for v in batch["size"][i]), stride=stride,
                        feature_mask=feature_mask[i], encoder=row(encoder, i), decoder=row(decoder, i),
                        sampling_locations=row(locations, i), sampling_weights=row(weights, i),
                        padded_size=(int(padded_h), int(padded_w)))
        for i in range(count)
    ]
