"""Mask AP and panoptic quality (detr_jax.evaluation.coco_metrics) on hand-built cases.

PQ: a 12x12 image whose expected per-class TP / FP / FN and IoUs are worked out by hand in
the comments, then turned into PQ, SQ, RQ by panopticapi's formula (`reference_pq`). Mask
AP: exact predictions, shifted ones, and masks with the right boxes but the wrong pixels.

Tolerance: 1e-9, float rounding only; every expected value is a ratio of pixel counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detr_jax.evaluation import coco_metrics
from detr_jax.ops.mask_rle import encode_masks
from detr_jax.evaluation.coco_metrics import PANOPTIC_METRIC_NAMES
from detr_jax.evaluation.segmentation_eval import segmentation_metrics

TOL = 1e-9
CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "grass", "isthing": 0},
]
H = W = 12


def box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[rows, cols] = True
    return mask


def gt_annotation(ann_id: int, image_id: int, category: int, mask: np.ndarray, crowd: bool = False) -> dict:
    ys, xs = np.nonzero(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": int(crowd),
            "segmentation": encode_masks(mask[None])[0], "area": int(mask.sum()),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]}


# (image id, category, mask, crowd). Image 1: person g1 (rows 0-3, cols 0-3), car g2 (rows
# 0-3, cols 6-9), sky g3 (rows 4-7), a person crowd region (rows 8-11, cols 0-3); the rest is
# void. Image 2: sky (rows 0-5), and no prediction at all.
PANOPTIC_SEGMENTS = [
    (1, 1, box(slice(0, 4), slice(0, 4)), False),
    (1, 2, box(slice(0, 4), slice(6, 10)), False),
    (1, 3, box(slice(4, 8), slice(0, 12)), False),
    (1, 1, box(slice(8, 12), slice(0, 4)), True),
    (2, 3, box(slice(0, 6), slice(0, 12)), False),
]


def panoptic_ground_truth() -> dict:
    annotations = [gt_annotation(i + 1, *segment) for i, segment in enumerate(PANOPTIC_SEGMENTS)]
    images = [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in (1, 2)]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def panoptic_prediction(car_pixels: int) -> tuple[np.ndarray, list[dict]]:
    """Image 1's id map and segments_info:
    1 person: rows 0-3 cols 0-2 (12 px on g1) + rows 0-3 col 4 (4 px void): IoU with g1 =
      12 / (16 + 16 - 12 - 4 void) = 0.75 -> TP;
    2 car: the top `car_pixels` pixels of g2 in row-major order: IoU = car_pixels / 16
      (8 -> exactly 0.5: no match, a FP and g2 a FN; 9 -> 0.5625: TP);
    3 sky: rows 4-7 (= g3) + rows 8-9 cols 4-11 (16 px void): IoU = 48 / (64 + 48 - 48 - 16) = 1 -> TP;
    4 person: the crowd region exactly: unmatched, all on its category's crowd -> no FP;
    5 grass: rows 10-11 cols 4-11, all void -> no FP."""
    id_map = np.zeros((H, W), np.int32)
    id_map[0:4, 0:3] = 1
    id_map[0:4, 4] = 1
    car = np.zeros(16, np.int32)
    car[:car_pixels] = 2
    id_map[0:4, 6:10] = car.reshape(4, 4)
    id_map[4:8, :] = 3
    id_map[8:10, 4:12] = 3
    id_map[8:12, 0:4] = 4
    id_map[10:12, 4:12] = 5
    info = [{"id": i, "category_id": c} for i, c in enumerate([1, 2, 3, 1, 4], start=1)]
    return id_map, info


def reference_pq(counts: dict[int, tuple[int, int, int, float]], things: set[int]) -> dict[str, float]:
    """panopticapi's pq_average from per-class (TP, FP, FN, summed IoU): per class
    PQ = IoU / (TP + FP/2 + FN/2), SQ = IoU / TP (0 without TP), RQ = TP / (TP + FP/2 + FN/2),
    averaged over the classes with TP + FP + FN > 0."""
    out = {}
    for suffix, keep in (("", lambda c: True), ("_th", lambda c: c in things), ("_st", lambda c: c not in things)):
        rows = [(tp, fp, fn, iou) for c, (tp, fp, fn, iou) in counts.items() if keep(c) and tp + fp + fn]
        out["PQ" + suffix] = np.mean([iou / (tp + fp / 2 + fn / 2) for tp, fp, fn, iou in rows])
        out["SQ" + suffix] = np.mean([iou / tp if tp else 0.0 for tp, fp, fn, iou in rows])
        out["RQ" + suffix] = np.mean([tp / (tp + fp / 2 + fn / 2) for tp, fp, fn, iou in rows])
    return out


@pytest.mark.parametrize("car_pixels", [8, 9])
def test_panoptic_quality_by_hand(car_pixels):
    ground_truth = panoptic_ground_truth()
    results = coco_metrics.to_panoptic_results(1, *panoptic_prediction(car_pixels))
    metrics = coco_metrics.panoptic_evaluate(ground_truth, results)
    car = (0, 1, 1, 0.0) if car_pixels == 8 else (1, 0, 0, 9 / 16)
    # (TP, FP, FN, summed IoU); sky: TP in image 1, FN in image 2 (no prediction there).
    counts = {1: (1, 0, 0, 0.75), 2: car, 3: (1, 0, 1, 1.0)}
    expected = reference_pq(counts, things={1, 2})
    assert set(metrics.metrics) == set(PANOPTIC_METRIC_NAMES)
    for name in PANOPTIC_METRIC_NAMES:
        assert metrics.metrics[name] == pytest.approx(expected[name], abs=TOL), name
    for category, (tp, fp, fn, iou) in counts.items():
        got = metrics.per_class[category]
        assert (got["tp"], got["fp"], got["fn"]) == (tp, fp, fn) and got["iou"] == pytest.approx(iou, abs=TOL)
    # grass: its only prediction lies on void: no segment on either side.
    assert (metrics.per_class[4]["tp"], metrics.per_class[4]["fp"], metrics.per_class[4]["pq"]) == (0, 0, -1.0)


def test_panoptic_quality_of_a_subset_and_of_perfect_predictions():
    ground_truth = panoptic_ground_truth()
    results = coco_metrics.to_panoptic_results(1, *panoptic_prediction(9))
    only_first = coco_metrics.panoptic_evaluate(ground_truth, results, image_ids=[1])
    assert only_first.per_class[3]["fn"] == 0  # image 2's sky is not evaluated
    perfect = []
    for image_id in (1, 2):
        id_map, info = np.zeros((H, W), np.int32), []
        for image, category, mask, crowd in PANOPTIC_SEGMENTS:
            if image == image_id and not crowd:
                info.append({"id": len(info) + 1, "category_id": category})
                id_map[mask] = len(info)
        perfect += coco_metrics.to_panoptic_results(image_id, id_map, info)
    metrics = coco_metrics.panoptic_evaluate(ground_truth, perfect)
    assert metrics.metrics == pytest.approx(dict.fromkeys(PANOPTIC_METRIC_NAMES, 1.0), abs=TOL)


def test_the_table_says_a_split_without_segments_has_none():
    """Data without stuff classes: hotcoco's -1 for stuff is no score, and is not printed as one."""
    ground_truth = panoptic_ground_truth()
    ground_truth["categories"] = CATEGORIES[:2]
    ground_truth["annotations"] = [a for a in ground_truth["annotations"] if a["category_id"] in (1, 2)]
    id_map = np.zeros((H, W), np.int32)
    id_map[PANOPTIC_SEGMENTS[0][2]] = 1
    results = coco_metrics.to_panoptic_results(1, id_map, [{"id": 1, "category_id": 1}])
    metrics, summary = segmentation_metrics(ground_truth, results, [], [1, 2])
    assert metrics["PQ_st"] == -1.0 and metrics["PQ_th"] > 0
    assert "Stuff     no stuff classes with a segment" in summary.splitlines() and "-100.0" not in summary


def test_panoptic_quality_needs_isthing():
    ground_truth = panoptic_ground_truth()
    ground_truth["categories"] = [{"id": 1, "name": "person"}, *CATEGORIES[1:]]
    with pytest.raises(ValueError, match=r"'isthing'.*\[1\]"):
        coco_metrics.panoptic_evaluate(ground_truth, [])


# ---------------------------------------------------------------------------------------
# Mask AP


def instance_ground_truth() -> tuple[dict, list[np.ndarray]]:
    """Two 12x12 images: two objects and one object, each a filled square."""
    masks = [box(slice(1, 7), slice(1, 7)), box(slice(5, 11), slice(4, 12)), box(slice(2, 10), slice(2, 10))]
    image_of = [1, 1, 2]
    annotations = [gt_annotation(i + 1, image_of[i], 1 + i % 2, m) for i, m in enumerate(masks)]
    images = [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in (1, 2)]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES[:2]}, masks


def corner(mask: np.ndarray) -> np.ndarray:
    """The top row and left column of a rectangular mask: the same box, < half the pixels."""
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    out[ys.min(), xs.min():xs.max() + 1] = out[ys.min():ys.max() + 1, xs.min()] = True
    return out


def segm_results(ground_truth: dict, masks: list[np.ndarray]) -> list[dict]:
    results = []
    for a, m in zip(ground_truth["annotations"], masks):
        results += coco_metrics.to_coco_segm_results(a["image_id"], [0.9], [a["category_id"]], m[None])
    return results


def test_segm_ap_perfect_shifted_and_wrong_pixels():
    ground_truth, masks = instance_ground_truth()
    perfect = coco_metrics.coco_evaluate(ground_truth, segm_results(ground_truth, masks), iou_type="segm")
    assert perfect.metrics["AP"] == pytest.approx(1.0, abs=TOL)
    shifted = [np.roll(m, -1, axis=1) for m in masks]  # one column left: IoU 30/42, 42/54, 56/72
    shifted_ap = coco_metrics.coco_evaluate(ground_truth, segm_results(ground_truth, shifted), iou_type="segm")
    assert 0 < shifted_ap.metrics["AP"] < 0.9
    # The right boxes (bbox AP 1 with the boxes added), mask IoU < 0.5.
    corners = [corner(m) for m in masks]
    assert all(c.sum() < m.sum() / 2 for c, m in zip(corners, masks))
    results = segm_results(ground_truth, corners)
    for r, a in zip(results, ground_truth["annotations"]):
        r["bbox"] = a["bbox"]
    mask_ap = coco_metrics.coco_evaluate(ground_truth, results, iou_type="segm").metrics["AP"]
    assert mask_ap == pytest.approx(0.0, abs=TOL)
    assert coco_metrics.coco_evaluate(ground_truth, results).metrics["AP"] == pytest.approx(1.0, abs=TOL)


def test_segm_areas_are_mask_areas():
    """A 5x5 object found exactly, after a false positive: an L of 79 pixels (small) whose box
    is 40x40 (medium). Sized by its mask, the false positive counts in the small range (APs
    ~0.5); sized by its box (a result carrying "bbox", loaded as is) it would not (APs 1)."""
    size = 40
    target = np.zeros((size, size), bool)
    target[10:15, 10:15] = True
    l_shape = np.zeros((size, size), bool)
    l_shape[0, :] = l_shape[:, 0] = True
    ground_truth = {"images": [{"id": 1, "height": size, "width": size}], "categories": CATEGORIES[:1],
                    "annotations": [gt_annotation(1, 1, 1, target)]}
    results = coco_metrics.to_coco_segm_results(1, [0.9, 0.95], [1, 1], np.stack([target, l_shape]))
    for result, box_xywh in zip(results, ([10.0, 10.0, 5.0, 5.0], [0.0, 0.0, float(size), float(size)])):
        result["bbox"] = box_xywh
    metrics = coco_metrics.coco_evaluate(ground_truth, results, iou_type="segm").metrics
    assert metrics["AP"] == metrics["APs"] == pytest.approx(0.5, abs=0.01)  # 101-point interpolation


def test_segm_results_format_and_bad_input():
    ground_truth, masks = instance_ground_truth()
    results = coco_metrics.to_coco_segm_results(1, np.array([0.5, 0.25]), np.array([1, 2]), np.stack(masks[:2]))
    assert [(r["image_id"], r["category_id"], r["score"]) for r in results] == [(1, 1, 0.5), (1, 2, 0.25)]
    assert isinstance(results[0]["segmentation"]["counts"], str) and results[0]["segmentation"]["size"] == [H, W]
    np.testing.assert_array_equal(mask_utils.decode(results[1]["segmentation"]), masks[1])
    assert coco_metrics.to_coco_segm_results(1, [], [], np.zeros((0, H, W), bool)) == []
    with pytest.raises(ValueError, match="iou_type"):
        coco_metrics.coco_evaluate(ground_truth, results, iou_type="keypoints")
    for a in ground_truth["annotations"]:
        del a["segmentation"]
    with pytest.raises(ValueError, match="'segmentation' in every ground-truth annotation"):
        coco_metrics.coco_evaluate(ground_truth, results, iou_type="segm")
