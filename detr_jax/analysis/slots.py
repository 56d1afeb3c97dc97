"""What each object-query slot predicts over a dataset, and how specialized the slots are.

Input: every slot's last-layer prediction on every image (N images, Q slots): scores
[N, Q], labels [N, Q] (best class other than "no object"), boxes [N, Q, 4] normalized
(cx, cy, w, h). "Confident" predictions are those with score >= the threshold.

Specialization is the mutual information, in bits, between the slot index and a property
of its prediction: the location cell of the box centre (a G x G grid over the image), the
box size (terciles of sqrt(w * h)) and the class. It is measured over all predictions and
over the confident ones. A plug-in estimate from counts is biased upwards on finite data,
so each number has a baseline: the same estimate after permuting the slots within each
image (the images' contents kept, slot identity destroyed), averaged over several seeded
permutations. Specialization shows as MI well above its baseline; MI / H(property) is the
share of the property's uncertainty the slot explains.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

PROPERTIES = ("location", "size", "class")


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy in bits of the distribution given by nonnegative counts (any shape)."""
    p = np.asarray(counts, np.float64).ravel()
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * np.log2(p)).sum())) if p.size else 0.0


def mutual_information_bits(x: np.ndarray, y: np.ndarray, num_x: int, num_y: int) -> float:
    """Plug-in mutual information I(X; Y) in bits of paired samples of two discrete
    variables with values in [0, num_x) and [0, num_y): H(X) + H(Y) - H(X, Y)."""
    if len(x) == 0:
        return 0.0
    joint = np.bincount(np.asarray(x) * num_y + np.asarray(y), minlength=num_x * num_y).reshape(num_x, num_y)
    # Clipped at 0: the three entropies' rounding can leave -1e-16 for independent variables.
    return max(0.0, entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint))


def location_cells(boxes: np.ndarray, grid: int) -> np.ndarray:
    """Index (row * grid + column) of the grid cell holding each box centre.

    boxes: [..., 4] normalized (cx, cy, w, h); centres outside [0, 1) go to the edge cells.
    """
    col = np.clip(np.floor(boxes[..., 0] * grid), 0, grid - 1).astype(np.int64)
    row = np.clip(np.floor(boxes[..., 1] * grid), 0, grid - 1).astype(np.int64)
    return row * grid + col


def box_sizes(boxes: np.ndarray) -> np.ndarray:
    """sqrt(w * h) of normalized boxes [..., 4]: the side of a square of the same area."""
    return np.sqrt(np.clip(boxes[..., 2], 0, None) * np.clip(boxes[..., 3], 0, None))


@dataclasses.dataclass
class SlotStatistics:
    """What `slot_statistics` measured (JSON-ready through `to_json`).

    Attributes:
      settings: score_threshold, grid, shuffles, seed, num_images, num_slots, num_classes.
      per_slot: one dict per slot (see `slot_statistics`).
      specialization: {"all" | "confident": {property: {"mi_bits", "baseline_mi_bits",
        "baseline_std_bits", "entropy_bits", "mi_share", "samples", ...}}}.
    """

    settings: dict[str, Any]
    per_slot: list[dict[str, Any]]
    specialization: dict[str, dict[str, dict[str, Any]]]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _centre_stats(boxes: np.ndarray) -> dict[str, Any]:
    """Centre mean, standard deviation and spread (RMS distance from the mean centre),
    mean width and height of boxes [n, 4]; None values when n = 0."""
    if len(boxes) == 0:
        return {"cx_mean": None, "cy_mean": None, "cx_std": None, "cy_std": None, "centre_spread": None,
                "w_mean": None, "h_mean": None}
    cx, cy, w, h = boxes.T.astype(np.float64)
    return {"cx_mean": float(cx.mean()), "cy_mean": float(cy.mean()), "cx_std": float(cx.std()),
            "cy_std": float(cy.std()), "centre_spread": float(np.sqrt(cx.var() + cy.var())),
            "w_mean": float(w.mean()), "h_mean": float(h.mean())}


def _size_bins(sizes: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Tercile bins (0, 1, 2) of `sizes` and the two edges (edges of an empty set: [])."""
    if len(sizes) == 0:
        return np.zeros(0, np.int64), []
    edges = np.quantile(sizes.astype(np.float64), [1 / 3, 2 / 3])
    return np.searchsorted(edges, sizes, side="right").astype(np.int64), [float(e) for e in edges]


def slot_statistics(
    scores: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    num_classes: int,
    score_threshold: float = 0.7,
    grid: int = 4,
    shuffles: int = 20,
    seed: int = 0,
) -> SlotStatistics:
    """Per-slot numbers and dataset-level specialization measures.

    Args:
      scores: float [N, Q]; labels: int [N, Q] category ids in [0, num_classes);
      boxes: float [N, Q, 4] normalized (cx, cy, w, h), as the model predicts them.
      num_classes: the class head's number of categories (without "no object").
      score_threshold: confident = score >= this.
      grid: location cells per side.
      shuffles: permutations for the shuffled-slot baseline; seed: their seed.

    Per slot: slot, predictions (N), confident (count), confident_rate, mean_score; the
    centre statistics of all its predictions (`all_` prefix) and of its confident ones
    (`confident_` prefix): cx_mean, cy_mean, cx_std, cy_std, centre_spread (RMS distance
    from the mean centre), w_mean, h_mean (None without confident predictions);
    classes {category id: confident predictions}; top_class and top_class_share.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, np.int64)
    boxes = np.asarray(boxes, np.float64)
    num_images, num_slots = scores.shape
    if labels.shape != scores.shape or boxes.shape != (num_images, num_slots, 4):
        raise ValueError(f"shapes differ: scores {scores.shape}, labels {labels.shape}, boxes {boxes.shape}")
    confident = scores >= score_threshold

    per_slot = []
    for q in range(num_slots):
        keep = confident[:, q]
        classes = np.bincount(labels[keep, q], minlength=num_classes)
        top = int(classes.argmax()) if keep.any() else None
        per_slot.append({
            "slot": q,
            "predictions": int(num_images),
            "confident": int(keep.sum()),
            "confident_rate": float(keep.mean()) if num_images else 0.0,
            "mean_score": float(scores[:, q].mean()) if num_images else 0.0,
            **{f"all_{k}": v for k, v in _centre_stats(boxes[:, q]).items()},
            **{f"confident_{k}": v for k, v in _centre_stats(boxes[keep, q]).items()},
            "classes": {int(c): int(n) for c, n in enumerate(classes) if n},
            "top_class": top,
            "top_class_share": float(classes[top] / keep.sum()) if top is not None else None,
        })

    slots = np.broadcast_to(np.arange(num_slots), (num_images, num_slots))
    rng = np.random.default_rng(seed)
    permutations = [rng.permuted(slots, axis=1) for _ in range(shuffles)]
    specialization = {}
    for subset, keep in (("all", np.ones_like(confident)), ("confident", confident)):
        sizes, edges = _size_bins(box_sizes(boxes[keep]))
        values = {"location": (location_cells(boxes[keep], grid), grid * grid),
                  "size": (sizes, 3), "class": (labels[keep], num_classes)}
        measures = {}
        for prop in PROPERTIES:
            value, num_values = values[prop]
            mi = mutual_information_bits(slots[keep], value, num_slots, num_values)
            baseline = np.array([mutual_information_bits(p[keep], value, num_slots, num_values) for p in permutations])
            entropy = entropy_bits(np.bincount(value, minlength=num_values))
            measures[prop] = {
                "mi_bits": mi,
                "baseline_mi_bits": float(baseline.mean()) if shuffles else None,
                "baseline_std_bits": float(baseline.std()) if shuffles else None,
                "entropy_bits": entropy,
                "mi_share": mi / entropy if entropy > 0 else 0.0,
                "samples": int(keep.sum()),
            }
        measures["size"]["tercile_edges"] = edges
        specialization[subset] = measures
    settings = {"score_threshold": float(score_threshold), "grid": int(grid), "shuffles": int(shuffles),
                "seed": int(seed), "num_images": int(num_images), "num_slots": int(num_slots),
                "num_classes": int(num_classes)}
    return SlotStatistics(settings, per_slot, specialization)


CSV_COLUMNS = ("slot", "predictions", "confident", "confident_rate", "mean_score",
               "confident_cx_mean", "confident_cy_mean", "confident_cx_std", "confident_cy_std",
               "confident_centre_spread", "confident_w_mean", "confident_h_mean",
               "all_cx_mean", "all_cy_mean", "all_centre_spread", "all_w_mean", "all_h_mean",
               "top_class", "top_class_share", "classes")


def csv_rows(stats: SlotStatistics, class_names: dict[int, str] | None = None) -> list[list[str]]:
    """The per-slot table as CSV rows (header first); classes as "name:count" pairs."""
    names = class_names or {}

    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    rows = [list(CSV_COLUMNS)]
    for slot in stats.per_slot:
        row = [cell(slot[c]) for c in CSV_COLUMNS[:-1]]
        row.append(" ".join(f"{names.get(c, c)}:{n}" for c, n in slot["classes"].items()))
        rows.append(row)
    return rows
