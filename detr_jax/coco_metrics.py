"""Host-side COCO box metrics through pycocotools: results lists, AP/AR, printed tables."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

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


def coco_evaluate(ground_truth, results: list[dict], image_ids: Sequence[int] | None = None) -> CocoMetrics:
    """COCO box AP/AR of `results` against `ground_truth` (pycocotools COCOeval, "bbox").

    Args:
      ground_truth: a COCO instances dict or a pycocotools COCO object.
      results: COCO results ({image_id, category_id, bbox xywh, score}); not modified.
      image_ids: the evaluated images (default: every ground-truth image). Images left out
        of a partial evaluation must be left out here, or their objects count as missed.
    """
    coco_gt = ground_truth if not isinstance(ground_truth, dict) else coco_from_dict(ground_truth)
    names = {int(c["id"]): c["name"] for c in coco_gt.dataset["categories"]}
    if not results:  # loadRes cannot load an empty list
        return CocoMetrics(np.full(12, -1.0), {c: -1.0 for c in names}, names)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
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
