"""The segmentation half of an evaluation pass: what a mask head predicts, per image, and
its metrics (panoptic quality and mask AP).

Each process turns its images' raw outputs (`pred_logits`, `pred_masks`, as
`postprocess.make_predict_fn` returns them for a model with a mask head) into a panoptic
segmentation (`segmentation_postprocess.panoptic_segmentation`) and one instance mask per
query (`segmentation_postprocess.instance_masks`, scored as the detections), both at the
original image size and kept as COCO RLE results, so that no mask array outlives its batch.
At the end the results are gathered on process 0, which computes PQ/SQ/RQ (hotcoco) and
mask AP (pycocotools) against the source's ground truth (`to_coco_dict` with masks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from detr_jax.evaluation.coco_metrics import (
    METRIC_NAMES,
    PANOPTIC_METRIC_NAMES,
    coco_evaluate,
    format_coco_summary,
    panoptic_evaluate,
    to_coco_segm_results,
    to_panoptic_results,
)
from detr_jax.evaluation.segmentation_postprocess import instance_masks, panoptic_segmentation
from detr_jax.ops.mask_rle import decode_masks

# What `segmentation_metrics` returns: PQ, SQ, RQ (all, things, stuff), then mask AP/AR.
MASK_METRIC_NAMES = tuple(f"mask_{name}" for name in METRIC_NAMES)
SEGMENTATION_METRIC_NAMES = PANOPTIC_METRIC_NAMES + MASK_METRIC_NAMES


class SegmentationResults:
    """Collects one process's panoptic and instance-mask results, image by image.

    A segment of a class the dataset does not have (say id 0, which a barely trained model
    can predict) is left out of the panoptic results: its pixels count as void (panopticapi
    would refuse the prediction outright, and so does hotcoco).

    Args:
      category_isthing: {category id: bool} (the eval source's).
      method: the panoptic post-processing (`segmentation_postprocess.PANOPTIC_METHODS`).
      options: that method's thresholds (official: threshold 0.85).
    """

    def __init__(self, category_isthing: Mapping[int, bool], method: str = "official", **options):
        self.category_isthing = dict(category_isthing)
        self.method, self.options = method, options
        self.panoptic: list[dict] = []  # to_panoptic_results entries
        self.instances: list[dict] = []  # COCO segm results

    def add_batch(self, outputs: Mapping[str, np.ndarray], image_ids, is_real, sizes, orig_sizes) -> None:
        """One batch's host outputs: pred_logits [B, Q, K + 1], pred_masks [B, Q, h, w],
        scores [B, Q], labels [B, Q]; image_ids [B], is_real [B] (fillers are skipped),
        sizes [B, 2] (h, w before padding), orig_sizes [B, 2]."""
        for row in np.flatnonzero(np.asarray(is_real)):
            image_id, size, orig = int(image_ids[row]), sizes[row], orig_sizes[row]
            segmentation = panoptic_segmentation(outputs["pred_logits"][row], outputs["pred_masks"][row], size, orig,
                                                 self.category_isthing, self.method, **self.options)
            known = [s for s in segmentation.segments_info if s["category_id"] in self.category_isthing]
            self.panoptic += to_panoptic_results(image_id, segmentation.id_map, known)
            masks = instance_masks(outputs["pred_masks"][row], size, orig)
            self.instances += to_coco_segm_results(image_id, outputs["scores"][row], outputs["labels"][row], masks)

    def gathered(self) -> tuple[list[dict], list[dict]]:
        """(panoptic, instances) of every process, in process order (every process gets them)."""
        return _gather_json(self.panoptic), _gather_json(self.instances)


def segmentation_metrics(ground_truth, panoptic: list[dict], instances: list[dict],
                         image_ids: Sequence[int]) -> tuple[dict[str, float], str]:
    """({SEGMENTATION_METRIC_NAMES: value}, a printed table) of the gathered results.

    ground_truth: `to_coco_dict` of the eval source with masks (RLE segmentations, areas
    of the masks, categories with isthing), or the pycocotools COCO object built from it
    (the Evaluator's, indexed once for box and mask AP); image_ids: the evaluated images.
    """
    pq = panoptic_evaluate(ground_truth, panoptic, image_ids)
    masks = coco_evaluate(ground_truth, instances, image_ids, iou_type="segm")
    metrics = {**pq.metrics, **dict(zip(MASK_METRIC_NAMES, (float(v) for v in masks.stats)))}
    rows = [f"{'':8s}{'PQ':>7s}{'SQ':>7s}{'RQ':>7s}"]
    for split, suffix, classes in (("All", "", "classes"), ("Things", "_th", "thing classes"),
                                   ("Stuff", "_st", "stuff classes")):
        if metrics[f"PQ{suffix}"] < 0:  # hotcoco's -1 (not a score): no category of the split has a segment
            rows.append(f"{split:8s}  no {classes} with a segment")
            continue
        values = [100 * metrics[f"{name}{suffix}"] for name in ("PQ", "SQ", "RQ")]
        rows.append(f"{split:8s}" + "".join(f"{v:7.1f}" for v in values))
    summary = "panoptic quality (x100):\n" + "\n".join(rows) + "\nmask AP:\n" + format_coco_summary(masks.stats)
    return metrics, summary


def panoptic_id_map(segments: Sequence[dict], image_id: int, shape: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
    """One image's segments among `to_panoptic_results` entries, as (id_map int32 [H, W],
    0 = void, segment ids 1..n in list order; segments_info [{"id", "category_id"}])."""
    mine = [s for s in segments if int(s["image_id"]) == int(image_id)]
    id_map = np.zeros(shape, np.int32)
    if mine:
        for i, mask in enumerate(decode_masks([s["segmentation"] for s in mine]), start=1):
            id_map[mask] = i
    return id_map, [{"id": i, "category_id": s["category_id"]} for i, s in enumerate(mine, start=1)]


def _gather_json(items: list[dict]) -> list[dict]:
    """Every process's JSON-able list, concatenated in process order."""
    if jax.process_count() == 1:
        return items
    data = np.frombuffer(json.dumps(items).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(data)] = data
    everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [item for row, n in zip(everything, lengths) for item in json.loads(row[:n].tobytes())]
