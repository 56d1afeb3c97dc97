"""`analyze`: the whole analysis of a model on a dataset split, written to a folder.

Files written to `out_dir`:
  predictions.npz          every slot's raw prediction on every image: scores [N, Q],
                           labels [N, Q], boxes [N, Q, 4] normalized cxcywh, source_index
                           [N], image_id [N] (everything below is computed from these)
  slots.json, slots.csv    per-slot numbers and the specialization measures (`slot_statistics`)
  query_slots_all.png      one panel per slot: centres of all its predicted boxes
  query_slots_confident.png  the same, score >= threshold
  attention/image_NNNNN.png  encoder and decoder attention maps of the first images (for
                           deformable cross-attention: where the detections' heads sample)
  index.html               the report page showing all of it
"""

from __future__ import annotations

import csv
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from detr_jax.analysis.collect import collect_predictions
from detr_jax.analysis.figures import attention_figure, sampling_figure, slot_grid
from detr_jax.analysis.report import write_report
from detr_jax.analysis.slots import SlotStatistics, csv_rows, slot_statistics
from detr_jax.config.errors import ConfigError
from detr_jax.data import make_source
from detr_jax.serving.predictor import category_names_for
from detr_jax.models import build_model

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.npz"
SLOTS_JSON = "slots.json"
SLOTS_CSV = "slots.csv"
SLOT_PICTURES = (("query_slots_all.png", None), ("query_slots_confident.png", "threshold"))
ATTENTION_DIR = "attention"


def analyze(
    variables: Mapping,
    config: ml_collections.ConfigDict,
    out_dir: str | pathlib.Path,
    *,
    split: str = "eval",
    max_images: int | None = None,
    score_threshold: float = 0.7,
    attention_images: int = 8,
    batch_size: int | None = None,
    dtype: str | None = None,
    encoder_layer: int = -1,
    decoder_layer: int = -1,
    grid: int = 4,
    shuffles: int = 20,
    progress: bool = True,
    description: Mapping[str, Any] | None = None,
) -> SlotStatistics:
    """Analyzes the model of `config` with `variables` on `split` ("eval" or "train", read
    with the evaluation resize, in order) and writes the files listed in the module
    docstring to `out_dir`; returns the slot statistics.

    `description`: extra {label: value} lines for the report's header (the checkpoint).
    Other arguments: see `collect_predictions` and `slot_statistics`.
    """
    for option, layer, count in (("encoder_layer", encoder_layer, config.model.num_encoder_layers),
                                 ("decoder_layer", decoder_layer, config.model.num_decoder_layers)):
        if count and not -count <= layer < count:
            raise ConfigError(f"{option}={layer}: the model has {count} {option.split('_')[0]} layers "
                              f"(indices {-count}..{count - 1})")
    out_dir = pathlib.Path(out_dir)
    (out_dir / ATTENTION_DIR).mkdir(parents=True, exist_ok=True)
    model = build_model(config.model, dtype)
    source = make_source(config.data, split)
    class_names = category_names_for(config)
    predictions = collect_predictions(
        model, variables, config, source, max_images=max_images, attention_images=attention_images,
        batch_size=batch_size, encoder_layer=encoder_layer, decoder_layer=decoder_layer, progress=progress)
    np.savez_compressed(out_dir / PREDICTIONS_FILE, scores=predictions.scores, labels=predictions.labels,
                        boxes=predictions.boxes, source_index=predictions.source_index,
                        image_id=predictions.image_id)

    stats = slot_statistics(predictions.scores, predictions.labels, predictions.boxes, config.model.num_classes,
                            score_threshold=score_threshold, grid=grid, shuffles=shuffles)
    with (out_dir / SLOTS_CSV).open("w", newline="") as f:
        csv.writer(f).writerows(csv_rows(stats, class_names))

    slot_pictures = []
    for file, which in SLOT_PICTURES:
        threshold = score_threshold if which else None
        slot_grid(predictions.boxes, predictions.scores, out_dir / file, threshold)
        caption = ("every prediction of every slot" if threshold is None
                   else f"predictions with score >= {score_threshold:g}")
        slot_pictures.append((file, caption))

    attention_pictures, attention_records = [], []
    for sample in predictions.attention:
        record = source[sample.index]
        i = sample.index
        file = f"{ATTENTION_DIR}/image_{i:05d}.png"
        # What the model sowed decides the picture: dense maps, or deformable sampling points.
        draw = attention_figure if sample.sampling_locations is None else sampling_figure
        shown = draw(
            record.image, sample, predictions.scores[i], predictions.labels[i], predictions.boxes[i], out_dir / file,
            score_threshold, class_names, title=f"{record.name} (image id {record.image_id})")
        attention_pictures.append((file, f"{record.name}: {shown['detections']} detection(s)"))
        attention_records.append({"file": file, "source_index": i, "image_id": int(record.image_id),
                                  "name": record.name, **shown})

    attention_summary = _in_box_summary(attention_records)
    summary = {
        **(description or {}),
        "split": f"{split} ({len(source)} images, {len(predictions.scores)} analyzed)",
        "model": (f"{config.model.backbone}{' (dilated)' if config.model.get('dilation') else ''}, "
                  f"{config.model.num_encoder_layers}+{config.model.num_decoder_layers} layers, width "
                  f"{config.model.hidden_dim}, {config.model.num_queries} queries, {config.model.num_classes} classes"),
        "attention layers": f"encoder {encoder_layer}, decoder {decoder_layer} (averaged over heads)",
        "confident": f"score >= {score_threshold:g}",
        **{f"{which} attention in the box": (f"{v['attention_in_box']:.1%} of the mass on {v['cells_in_box']:.1%} of "
                                             f"the cells (mean of {v['maps']} maps)")
           for which, v in attention_summary.items()},
    }
    document = {"summary": summary, **stats.to_json(), "attention": attention_records,
                "attention_in_box": attention_summary,
                "class_names": {int(k): v for k, v in class_names.items()}}
    (out_dir / SLOTS_JSON).write_text(json.dumps(document, indent=1) + "\n")
    write_report(out_dir, stats, summary=summary, slot_pictures=slot_pictures,
                 attention_pictures=attention_pictures, class_names=class_names)
    log.info("analysis of %d images written to %s", len(predictions.scores), out_dir)
    return stats


def _in_box_summary(records: list[dict]) -> dict[str, dict[str, float]]:
    """{"encoder" | "decoder": mean attention_in_box and cells_in_box over the drawn maps,
    and their number}, for the kinds of map drawn."""
    summary = {}
    for which in ("encoder", "decoder"):
        shares = [share for record in records for share in record[f"{which}_in_box"]]
        if shares:
            summary[which] = {key: float(np.mean([share[key] for share in shares]))
                              for key in ("attention_in_box", "cells_in_box")}
            summary[which]["maps"] = len(shares)
    return summary
