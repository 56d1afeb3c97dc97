"""Pictures of the analysis: the query-slot grid and per-image attention maps (PNG).

Drawn with matplotlib's object API (`matplotlib.figure.Figure`, Agg canvas): no pyplot
state, safe in a library. Image coordinates: x to the right, y down, as in the image.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from detr_jax.evaluation import visualize
from detr_jax.analysis.collect import AttentionSample
from detr_jax.analysis.slots import box_sizes
from detr_jax.evaluation.postprocess import class_name

SIZE_COLORMAP = "viridis"
ATTENTION_COLORMAP = "inferno"


def slot_grid(boxes: np.ndarray, scores: np.ndarray, path: str | pathlib.Path, score_threshold: float | None = None,
              title: str = "") -> pathlib.Path:
    """One panel per query slot: the centres of its predicted boxes in the unit square.

    Args:
      boxes: [N, Q, 4] normalized (cx, cy, w, h); scores: [N, Q].
      score_threshold: None: every prediction; else only those scoring at least this.
    Points are coloured by box size sqrt(w * h) (one scale for all panels); a panel's title
    is the slot and its number of points. Returns the path written.
    """
    num_slots = boxes.shape[1]
    columns = math.ceil(math.sqrt(num_slots))
    rows = math.ceil(num_slots / columns)
    sizes = box_sizes(boxes)
    shown = np.ones(scores.shape, bool) if score_threshold is None else scores >= score_threshold
    vmax = float(sizes[shown].max()) if shown.any() else 1.0
    panel = 1.6
    fig = Figure(figsize=(columns * panel + 1.2, rows * panel + 0.7))
    axes = fig.subplots(rows, columns, squeeze=False)
    marker = float(np.clip(3000 / max(1, shown.sum() / num_slots), 1, 12))
    points = None
    for q, ax in enumerate(axes.ravel()):
        if q >= num_slots:
            ax.axis("off")
            continue
        keep = shown[:, q]
        points = ax.scatter(boxes[keep, q, 0], boxes[keep, q, 1], c=sizes[keep, q], s=marker, cmap=SIZE_COLORMAP,
                            vmin=0.0, vmax=vmax, alpha=0.6, linewidths=0, rasterized=True)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"slot {q} ({int(keep.sum())})", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.86, bottom=0.02, top=1 - 0.7 / (rows * panel + 0.7), wspace=0.08, hspace=0.25)
    colorbar_axes = fig.add_axes([0.89, 0.1, 0.02, 0.75])
    fig.colorbar(points, cax=colorbar_axes).set_label("box size sqrt(w h), fraction of the image side")
    fig.suptitle(title or ("every prediction" if score_threshold is None else f"score >= {score_threshold:g}"))
    path = pathlib.Path(path)
    fig.savefig(path, dpi=90)
    return path


def _valid_cells(sample: AttentionSample) -> tuple[int, int]:
    """(h_v, w_v): the rows and columns of feature cells on real pixels (padding is at the
    bottom and right, so they are the top-left block)."""
    return int(sample.feature_mask[:, 0].sum()), int(sample.feature_mask[0, :].sum())


def _feature_extent(sample: AttentionSample, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple]:
    """((h_v, w_v), imshow extent (left, right, bottom, top) of those cells in the pixels of
    an image of `image_size` (h, w))."""
    hv, wv = _valid_cells(sample)
    (h, w), (rh, rw) = image_size, sample.size
    sy, sx = sample.stride
    return (hv, wv), (0.0, wv * sx * w / rw, hv * sy * h / rh, 0.0)


def reference_cells(sample: AttentionSample, boxes: np.ndarray, slots: list[int]) -> list[tuple[int, tuple[int, int]]]:
    """(slot, feature cell (row, column) holding its box centre) for each of `slots`, the
    first slot of a cell only; boxes: [Q, 4] normalized (cx, cy, w, h)."""
    hv, wv = _valid_cells(sample)
    rh, rw = sample.size
    sy, sx = sample.stride
    cells = {}
    for q in slots:
        cx, cy = boxes[q, :2]
        cells.setdefault((int(np.clip(cy * rh // sy, 0, hv - 1)), int(np.clip(cx * rw // sx, 0, wv - 1))), q)
    return [(q, cell) for cell, q in cells.items()]


def cells_in_box(sample: AttentionSample, box: np.ndarray) -> np.ndarray:
    """bool [h_v, w_v]: the valid feature cells whose centres lie in a normalized (cx, cy,
    w, h) box."""
    hv, wv = _valid_cells(sample)
    rh, rw = sample.size
    sy, sx = sample.stride
    x = (np.arange(wv) + 0.5) * sx / rw
    y = (np.arange(hv) + 0.5) * sy / rh
    cx, cy, w, h = (float(v) for v in box)
    return ((np.abs(y - cy) <= h / 2)[:, None]) & ((np.abs(x - cx) <= w / 2)[None, :])


def _share(heat: np.ndarray, inside: np.ndarray) -> dict:
    """The attention mass on the cells inside a box, and the cells' share (what uniform
    attention would put there)."""
    return {"attention_in_box": float(heat[inside].sum() / max(heat.sum(), 1e-12)), "cells_in_box": float(inside.mean())}


def _color(label: int) -> tuple[float, float, float]:
    """The class's colour in the detection drawings (`visualize.class_color`), as matplotlib's RGB."""
    return tuple(c / 255 for c in visualize.class_color(label))


def _box(ax, xyxy: np.ndarray, label: int) -> None:
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=_color(label), lw=1.5))


def _overlay(ax, image: np.ndarray, heat: np.ndarray, extent: tuple, title: str) -> None:
    h, w = image.shape[:2]
    ax.imshow(image)
    ax.imshow(heat, cmap=ATTENTION_COLORMAP, alpha=0.6, extent=extent, interpolation="nearest",
              vmin=0.0, vmax=max(float(heat.max()), 1e-12))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def attention_figure(
    image: np.ndarray,
    sample: AttentionSample,
    scores: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    path: str | pathlib.Path,
    score_threshold: float = 0.7,
    class_names: Mapping[int, str] | None = None,
    max_objects: int = 6,
    max_points: int = 4,
    title: str = "",
) -> dict:
    """One image's attention maps overlaid on it, as a PNG.

    Top row: the image with its detections (score >= threshold), then the encoder's
    self-attention from the feature cells at the centres of the first `max_points`
    detections (the cell marked). Bottom row: each detection's decoder cross-attention, its
    box drawn. Without detections, the best-scoring slots are shown, marked as below the
    threshold. Maps are at feature resolution (one block per cell), each scaled to its max.

    Args:
      image: uint8 [H, W, 3] the original image; sample: its AttentionSample.
      scores [Q], labels [Q], boxes [Q, 4] normalized (cx, cy, w, h): its predictions.
    Returns {"slots": the slots shown, "points": the reference cells, "detections": count,
    "encoder_in_box", "decoder_in_box": per map, {"slot", "attention_in_box": the map's mass
    on the cells inside that slot's box, "cells_in_box": those cells' share of the map}}.
    """
    h, w = image.shape[:2]
    order = np.argsort(-scores, kind="stable")
    detected = [int(q) for q in order if scores[q] >= score_threshold][:max_objects]
    slots = detected or [int(q) for q in order[: min(3, max_objects)]]
    (hv, wv), extent = _feature_extent(sample, (h, w))
    h_f, w_f = sample.feature_mask.shape
    xyxy = np.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                     boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], -1) * np.array([w, h, w, h])
    points = reference_cells(sample, boxes, slots)[:max_points] if sample.encoder is not None else []
    columns = max(1 + len(points), len(slots))
    fig = Figure(figsize=(2.6 * columns, 2.6 * 2 * max(h / w, 0.5) + 0.6))
    axes = fig.subplots(2, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")

    ax = axes[0, 0]
    ax.axis("on")
    ax.imshow(image)
    for q in detected:
        _box(ax, xyxy[q], labels[q])
        ax.text(xyxy[q][0], xyxy[q][1], f"{q}: {class_name(class_names, labels[q])} {scores[q]:.2f}", fontsize=6,
                va="bottom", color="black", bbox=dict(fc=_color(labels[q]), ec="none", pad=0.5), clip_on=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(detected)} detection(s) >= {score_threshold:g} (slot: class score)", fontsize=8)
    cell_w, cell_h = extent[1] / wv, extent[2] / hv
    encoder_shares, decoder_shares = [], []
    for ax, (q, (r, c)) in zip(axes[0, 1:], points):
        ax.axis("on")
        heat = sample.encoder[r * w_f + c].reshape(h_f, w_f)[:hv, :wv]
        encoder_shares.append({"slot": q, **_share(heat, cells_in_box(sample, boxes[q]))})
        _overlay(ax, image, heat, extent, f"encoder, from slot {q}'s centre")
        ax.plot([(c + 0.5) * cell_w], [(r + 0.5) * cell_h], "o", ms=7, mfc="none", mec="cyan", mew=2)
    for ax, q in zip(axes[1], slots):
        ax.axis("on")
        heat = sample.decoder[q].reshape(h_f, w_f)[:hv, :wv]
        decoder_shares.append({"slot": q, **_share(heat, cells_in_box(sample, boxes[q]))})
        below = "" if scores[q] >= score_threshold else ", below threshold"
        _overlay(ax, image, heat, extent,
                 f"slot {q}: {class_name(class_names, labels[q])} {scores[q]:.2f}{below}")
        _box(ax, xyxy[q], labels[q])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=90)
    return {"slots": slots, "points": [list(cell) for _, cell in points], "detections": len(detected),
            "encoder_in_box": encoder_shares, "decoder_in_box": decoder_shares}


SAMPLING_COLORMAP = "autumn"


def sampling_figure(
    image: np.ndarray,
    sample: AttentionSample,
    scores: np.ndarray,
    labels: np.ndarray,
    boxes: np.ndarray,
    path: str | pathlib.Path,
    score_threshold: float = 0.7,
    class_names: Mapping[int, str] | None = None,
    max_objects: int = 6,
    title: str = "",
) -> dict:
    """One image's deformable cross-attention as the Deformable DETR paper's Figure 6, a PNG.

    First panel: the image with its detections (score >= threshold). Then one panel per
    detection (without any: the best-scoring slots, marked as below the threshold): every
    sampling point of every head on every level as a dot at its location on the image,
    sized and coloured by its weight (one colour scale for the image), and the slot's box.
    A head's weights sum to 1 over its L x P points, so a slot's dots weigh H in all.

    Args:
      image: uint8 [H, W, 3] the original image; sample: its AttentionSample, with
        sampling_locations [Q, heads, L, P, 2] and sampling_weights [Q, heads, L, P].
      scores [Q], labels [Q], boxes [Q, 4] normalized (cx, cy, w, h): its predictions.
    Returns {"slots", "points": [], "detections": count, "encoder_in_box": [],
    "decoder_in_box": per slot {"slot", "attention_in_box": the share of its sampling
    weight on points inside its box, "cells_in_box": the box's share of the image (what
    uniformly spread points would put there)}}, the keys of `attention_figure`.
    """
    h, w = image.shape[:2]
    order = np.argsort(-scores, kind="stable")
    detected = [int(q) for q in order if scores[q] >= score_threshold][:max_objects]
    slots = detected or [int(q) for q in order[: min(3, max_objects)]]
    xyxy = np.stack([boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2,
                     boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2], -1) * np.array([w, h, w, h])
    # Locations are normalized over the padded input; the image shown is the original,
    # of which the resized image is the top-left `sample.size` part of the padded input.
    (ph, pw), (rh, rw) = sample.padded_size, sample.size
    to_pixels = np.array([pw * w / rw, ph * h / rh])
    weights = sample.sampling_weights
    vmax = max(float(weights[slots].max()), 1e-12)
    fig = Figure(figsize=(2.8 * (1 + len(slots)), 2.8 * max(h / w, 0.5) + 0.6))
    axes = fig.subplots(1, 1 + len(slots), squeeze=False)[0]
    ax = axes[0]
    ax.imshow(image)
    for q in detected:
        _box(ax, xyxy[q], labels[q])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(detected)} detection(s) >= {score_threshold:g}", fontsize=8)
    shares, dots = [], None
    for ax, q in zip(axes[1:], slots):
        points = sample.sampling_locations[q].reshape(-1, 2) * to_pixels  # [heads * L * P, 2] pixels
        weight = weights[q].reshape(-1)
        cx, cy, bw, bh = (float(v) for v in boxes[q])
        normalized = points / np.array([w, h])
        inside = (np.abs(normalized[:, 0] - cx) <= bw / 2) & (np.abs(normalized[:, 1] - cy) <= bh / 2)
        area = max(0.0, min(1.0, cx + bw / 2) - max(0.0, cx - bw / 2)) * max(0.0, min(1.0, cy + bh / 2) -
                                                                                max(0.0, cy - bh / 2))
        shares.append({"slot": q, "attention_in_box": float(weight[inside].sum() / max(weight.sum(), 1e-12)),
                       "cells_in_box": float(area)})
        ax.imshow(image, alpha=0.6)
        draw = np.argsort(weight)  # the heaviest on top
        dots = ax.scatter(points[draw, 0], points[draw, 1], s=4 + 60 * weight[draw] / vmax, c=weight[draw],
                          cmap=SAMPLING_COLORMAP, vmin=0.0, vmax=vmax, linewidths=0)
        _box(ax, xyxy[q], labels[q])
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        below = "" if scores[q] >= score_threshold else ", below threshold"
        ax.set_title(f"slot {q}: {class_name(class_names, labels[q])} {scores[q]:.2f}{below}", fontsize=8)
    if dots is not None:
        fig.colorbar(dots, ax=list(axes[1:]), fraction=0.02).set_label("sampling weight", fontsize=7)
    fig.suptitle(title, fontsize=9)
    path = pathlib.Path(path)
    fig.savefig(path, dpi=90)
    return {"slots": slots, "points": [], "detections": len(detected), "encoder_in_box": [],
            "decoder_in_box": shares}
