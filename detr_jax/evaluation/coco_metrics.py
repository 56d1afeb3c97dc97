"""Host-side COCO metrics: box and mask AP/AR through pycocotools, panoptic quality (PQ, SQ,
RQ) through hotcoco; results lists and printed tables."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Mapping, Sequence

import numpy as np
from hotcoco import panoptic as hotcoco_panoptic
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_jax.ops.mask_rle import encode_masks

# Names of pycocotools' `COCOeval.stats`, in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# (AP or AR, IoU threshold (None = 0.50:0.95), area range, maxDets) of each stat, as
# pycocotools' `summarize` prints them.
_SUMMARY_ROWS = (
    ("AP", None, "all", 100), ("AP", 0.5, "all", 100), ("AP", 0.75, "all", 100),
    ("AP", None, "small", 100), ("AP", None, "medium", 100), ("AP", None, "large", 100),
    ("AR", None, "all", 1), ("AR", None, "all", 10), ("AR", None, "all", 100),
    ("AR", None, "small", 100), ("AR", None, "medium", 100), ("AR", None, "large", 100),
)  # fmt: skip


def to_coco_results(image_ids: np.ndarray, scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray) -> list[dict]:
    """COCO results list ({image_id, category_id, bbox [x, y, w, h], score}).

    Args:
      image_ids: [N]; scores, labels: [N, Q]; boxes: [N, Q, 4] pixel xyxy.
    """
    results = []
    xywh = np.asarray(boxes, np.float64).copy()
    xywh[..., 2:] -= xywh[..., :2]
    for i, image_id in enumerate(np.asarray(image_ids).tolist()):
        for score, label, box in zip(scores[i].tolist(), labels[i].tolist(), xywh[i].tolist()):
            results.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
    return results


def to_coco_segm_results(image_id: int, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> list[dict]:
    """One image's COCO segm results ({image_id, category_id, segmentation RLE, score}).

    Args:
      scores, labels: [Q]; masks: bool [Q, H, W] at the original image size
        (`segmentation_postprocess.instance_masks`).
    """
    return [
        {"image_id": int(image_id), "category_id": label, "segmentation": rle, "score": score}
        for score, label, rle in zip(np.asarray(scores).tolist(), np.asarray(labels).tolist(), encode_masks(masks))
    ]


def coco_from_dict(dataset: dict):
    """A pycocotools COCO object (index built, quietly) from a COCO instances dict."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@dataclasses.dataclass
class CocoMetrics:
    """pycocotools' results.

    Attributes:
      stats: float64 [12] in METRIC_NAMES order (-1 where undefined, e.g. no small objects).
      per_class_ap: {category id: AP@[.50:.95]}, -1 where the category has no ground truth.
      category_names: {category id: name}.
    """

    stats: np.ndarray
    per_class_ap: dict[int, float]
    category_names: dict[int, str]

    @property
    def metrics(self) -> dict[str, float]:
        return dict(zip(METRIC_NAMES, (float(v) for v in self.stats)))


def coco_evaluate(ground_truth, results: list[dict], image_ids: Sequence[int] | None = None,
                  iou_type: str = "bbox") -> CocoMetrics:
    """COCO box or mask AP/AR of `results` against `ground_truth` (pycocotools COCOeval).

    Args:
      ground_truth: a COCO instances dict or a pycocotools COCO object; for "segm" its
        annotations need "segmentation" (RLE or polygons) and "area" (the mask's pixels:
        it decides small / medium / large).
      results: COCO results ({image_id, category_id, score} and "bbox" xywh, or
        "segmentation" RLE for "segm" (`to_coco_segm_results`)); not modified.
      image_ids: the evaluated images (default: every ground-truth image). Images left out
        of a partial evaluation must be left out here, or their objects count as missed.
      iou_type: "bbox" (box IoU) or "segm" (mask IoU).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm'; got {iou_type!r}")
    coco_gt = ground_truth if not isinstance(ground_truth, dict) else coco_from_dict(ground_truth)
    names = {int(c["id"]): c["name"] for c in coco_gt.dataset["categories"]}
    if iou_type == "segm":
        _require_key(coco_gt.dataset["annotations"], "segmentation", "ground-truth annotation")
        _require_key(results, "segmentation", "result")
    if not results:  # loadRes cannot load an empty list
        return CocoMetrics(np.full(12, -1.0), {c: -1.0 for c in names}, names)
    # Copies: loadRes adds keys in place. It gives a result with a box the box's area, which
    # decides small / medium / large, so mask results go without one (as detectron2 does).
    dropped = {"bbox"} if iou_type == "segm" else set()
    results = [{k: v for k, v in r.items() if k not in dropped} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [IoU T, recall R, class K, area A, maxDets M]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[int(cat_id)] = float(np.mean(p[p > -1])) if np.any(p > -1) else -1.0
    return CocoMetrics(np.asarray(evaluator.stats, np.float64), per_class, names)


def _require_key(entries: Sequence[dict], key: str, what: str) -> None:
    missing = next((e for e in entries if key not in e), None)
    if missing is not None:
        raise ValueError(f"mask evaluation needs {key!r} in every {what}; this one has only {sorted(missing)}")


def format_coco_summary(stats: Sequence[float]) -> str:
    """The 12-line table that pycocotools' `COCOeval.summarize()` prints, from the numbers."""
    lines = []
    for stat, (kind, iou, area, max_dets) in zip(stats, _SUMMARY_ROWS):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {stat:0.3f}")
    return "\n".join(lines)


def format_per_class_ap(per_class_ap: Mapping[int, float], category_names: Mapping[int, str]) -> str:
    """One "id name AP" line per category, in id order."""
    width = max((len(n) for n in category_names.values()), default=4)
    return "\n".join(
        f"{cat_id:>4d} {category_names.get(cat_id, '?'):<{width}} {ap:0.3f}"
        for cat_id, ap in sorted(per_class_ap.items())
    )


# ---------------------------------------------------------------------------------------
# Panoptic quality

# PQ, SQ, RQ over all categories, then things ("_th"), then stuff ("_st").
PANOPTIC_METRIC_NAMES = tuple(hotcoco_panoptic.METRIC_NAMES)


def to_panoptic_results(image_id: int, id_map: np.ndarray, segments_info: Sequence[dict]) -> list[dict]:
    """One image's panoptic segments as results for `panoptic_evaluate`, one per segment
    ({image_id, category_id, segmentation RLE}).

    Args:
      id_map: int [H, W] segment ids at the original image size (0 = void); segments_info:
        [{"id", "category_id", ...}] (`segmentation_postprocess.PanopticSegmentation`).
    """
    id_map = np.asarray(id_map)
    ids = np.array([s["id"] for s in segments_info], dtype=id_map.dtype)
    rles = encode_masks(id_map[None] == ids[:, None, None])
    return [{"image_id": int(image_id), "category_id": int(s["category_id"]), "segmentation": rle}
            for s, rle in zip(segments_info, rles)]


@dataclasses.dataclass
class PanopticMetrics:
    """Panoptic quality, as panopticapi computes it.

    Attributes:
      stats: float64 [9] in PANOPTIC_METRIC_NAMES order, fractions (panopticapi prints
        them x100); -1 where a split has no category with a segment.
      per_class: {category id: {"pq", "sq", "rq", "tp", "fp", "fn", "iou" (summed over
        TPs)}}; pq, sq, rq are -1 where the category has no segment on either side.
      category_names: {category id: name}.
    """

    stats: np.ndarray
    per_class: dict[int, dict[str, float]]
    category_names: dict[int, str]

    @property
    def metrics(self) -> dict[str, float]:
        return dict(zip(PANOPTIC_METRIC_NAMES, (float(v) for v in self.stats)))


def panoptic_evaluate(ground_truth, results: list[dict], image_ids: Sequence[int] | None = None) -> PanopticMetrics:
    """PQ, SQ, RQ (all, things, stuff, per class) of panoptic `results` (hotcoco's
    `PanopticEval`, which follows panopticapi, on RLE masks: no PNG files).

    panopticapi's protocol: a prediction matches a ground-truth segment of its category
    when IoU > 0.5, IoU leaving out the prediction's void pixels (pixels no ground-truth
    segment covers); an unmatched prediction is no false positive when more than half of
    it lies on void or on a crowd region of its category; crowd regions are never missed.
    PQ = sum IoU(TP) / (TP + FP / 2 + FN / 2) per category, averaged over the categories
    with a segment on either side.

    Args:
      ground_truth: a COCO dict or pycocotools COCO object: one annotation per segment with
        "segmentation" (RLE or polygons, not overlapping), "category_id" and "iscrowd";
        categories with "isthing".
      results: `to_panoptic_results` of the evaluated images; segments must not overlap.
      image_ids: the evaluated images (default: every ground-truth image). An evaluated
        image without results is an all-void prediction: its segments are missed.
    """
    dataset = ground_truth if isinstance(ground_truth, dict) else ground_truth.dataset
    categories = dataset["categories"]
    without = [c["id"] for c in categories if "isthing" not in c]
    if without:
        raise ValueError(f"panoptic quality needs 'isthing' in every category (things vs stuff); "
                         f"categories {without} have none")
    _require_key(dataset["annotations"], "segmentation", "ground-truth annotation")
    evaluated = {int(i) for i in image_ids} if image_ids is not None else {int(im["id"]) for im in dataset["images"]}
    images = [im for im in dataset["images"] if int(im["id"]) in evaluated]
    gt = {
        "images": images,
        "categories": categories,
        "annotations": [a for a in dataset["annotations"] if int(a["image_id"]) in evaluated],
    }
    kept = [r for r in results if int(r["image_id"]) in evaluated]
    predictions = {
        "images": images,  # every evaluated image, also those without a segment
        "annotations": [{**r, "id": i} for i, r in enumerate(kept, start=1)],
    }
    evaluator = hotcoco_panoptic.PanopticEval(gt, predictions)
    evaluator.evaluate()
    per_class = {int(c): dict(v) for c, v in evaluator.results()["per_class"].items()}
    names = {int(c["id"]): c["name"] for c in categories}
    return PanopticMetrics(np.asarray(evaluator.stats, np.float64), per_class, names)
