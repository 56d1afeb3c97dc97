"""Post-processing and COCO box evaluation (pycocotools), data-parallel over devices and hosts.

Post-processing follows official DETR's `PostProcess`: softmax over the classes, the
"no object" class dropped, each query's best remaining class and its probability, boxes
from normalized (cx, cy, w, h) to pixel (x0, y0, x1, y1) of the ORIGINAL image. For COCO
evaluation every query is kept (no threshold, no NMS), as in the original.

Evaluation: one pass over the eval split. Each host reads its slice of the dataset
(`detr_jax.data.make_eval_iterator`), the batch is sharded over a Mesh "data" axis that spans
every device of every host, parameters are replicated. Each host keeps its own detections;
at the end they are gathered on process 0 (fixed-size arrays, `process_allgather`), filler
examples are dropped, and pycocotools computes the 12 standard numbers against ground truth
built from the source's records (`detr_jax.data.to_coco_dict`), one code path for every
source. The numbers are broadcast so that every process returns the same metrics.

Typical use (an Evaluator compiles once and builds the ground truth once):
    evaluator = Evaluator(model, config, mesh)
    result = evaluator(variables)          # EvalResult
    result.metrics["AP"], result.summary   # the 12 numbers, the printed table
In a training loop, `make_eval_fn(config, workdir)` wraps this and saves drawn samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from detr_jax import box_ops

log = logging.getLogger(__name__)

DATA_AXIS = "data"

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


# ----------------------------------------------------------------------------------------
# Post-processing


def postprocess(pred_logits: jax.Array, pred_boxes: jax.Array, orig_size: jax.Array) -> dict[str, jax.Array]:
    """Official DETR's PostProcess, every query kept.

    Args:
      pred_logits: [B, Q, K + 1] class logits; the last class is "no object".
      pred_boxes: [B, Q, 4] normalized (cx, cy, w, h), relative to the unpadded image.
      orig_size: [B, 2] (h, w) of the original image, in pixels.

    Returns:
      scores float32 [B, Q]: probability of the best class other than "no object";
      labels int32 [B, Q]: that class (a category id, 0..K-1);
      boxes float32 [B, Q, 4]: pixel (x0, y0, x1, y1) in the original image (not clipped).
    """
    probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
    scores = probs.max(-1)
    labels = probs.argmax(-1).astype(jnp.int32)
    h, w = orig_size[:, 0].astype(jnp.float32), orig_size[:, 1].astype(jnp.float32)
    scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
    boxes = box_ops.cxcywh_to_xyxy(pred_boxes.astype(jnp.float32)) * scale
    return {"scores": scores, "labels": labels, "boxes": boxes}


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
) -> Detections:
    """One image's post-processed queries -> Detections with score >= threshold, best top_k.

    Args:
      scores: [Q]; labels: [Q]; boxes: [Q, 4] pixel xyxy (as from `postprocess`).
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
        queries=order.astype(np.int32),
        image_size=(int(image_size[0]), int(image_size[1])),
    )


# ----------------------------------------------------------------------------------------
# COCO evaluation (host side)


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
    from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel

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
    from pycocotools.cocoeval import COCOeval  # pylint: disable=import-outside-toplevel

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


# ----------------------------------------------------------------------------------------
# Data-parallel evaluation


@dataclasses.dataclass
class EvalResult:
    """One evaluation pass (the same on every process, except `detections` and `source_indices`).

    Attributes:
      metrics: {"AP", "AP50", ..., "ARl"} (METRIC_NAMES) as floats.
      per_class_ap: {category id: AP@[.50:.95]} (-1: no ground truth for the category).
      category_names: {category id: name}.
      summary: the 12-line pycocotools table.
      num_images: real images evaluated.
      detections: process 0: {"image_id" [N], "scores" [N, Q], "labels" [N, Q],
        "boxes" [N, Q, 4] pixel xyxy of the original image}, every query of every real
        image in dataset order; other processes: None.
      source_indices: process 0: int64 [N], each image's index in the eval source.
    """

    metrics: dict[str, float]
    per_class_ap: dict[int, float]
    category_names: dict[int, str]
    summary: str
    num_images: int
    detections: dict[str, np.ndarray] | None = None
    source_indices: np.ndarray | None = None

    def to_json(self) -> dict:
        return {
            "metrics": self.metrics,
            "per_class_ap": [
                {"id": cat_id, "name": self.category_names.get(cat_id, ""), "AP": ap}
                for cat_id, ap in sorted(self.per_class_ap.items())
            ],
            "num_images": self.num_images,
        }


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D Mesh with axis "data" over `devices` (default: every device of every host)."""
    devices = jax.devices() if devices is None else list(devices)
    # A plain Mesh (automatic axis types), as training builds it: jax.make_mesh's explicit
    # axes would make every gather in the model name its output sharding.
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def make_predict_step(model, mesh: Mesh):
    """Jitted fn(variables, image, mask, orig_size) -> `postprocess` output of the last layer.

    The batch arguments and the outputs are sharded over the mesh's "data" axis, the
    variables replicated. Shapes: image [B, H, W, 3], mask [B, H, W], orig_size [B, 2].
    """
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    replicated = NamedSharding(mesh, P())

    def predict(variables, image, mask, orig_size):
        out = model.apply(variables, image, mask, train=False)
        return postprocess(out["pred_logits"][-1], out["pred_boxes"][-1], orig_size)

    return jax.jit(
        predict,
        in_shardings=(replicated, batch_sharding, batch_sharding, batch_sharding),
        out_shardings=batch_sharding,
    )


class Evaluator:
    """COCO evaluation of a model on the eval split of `config.data`, reusable across calls.

    Build it once (the predict step is compiled once per bucket shape and the ground truth
    is built once), then call it with each new set of variables. Every process must call it
    (the batch is sharded over all hosts).

    Args:
      model: a DETR (any compute dtype).
      config: the full config (uses `data` and `eval.batch_size`, the global batch size).
      mesh: a Mesh with a "data" axis; default: all devices of all hosts.
      source: the eval source, if already built (default `make_source(config.data, "eval")`).
    """

    def __init__(self, model, config: ml_collections.ConfigDict, mesh: Mesh | None = None, source=None):
        from detr_jax.data import make_source  # pylint: disable=import-outside-toplevel

        self.model = model
        self.config = config
        self.mesh = mesh if mesh is not None else data_mesh()
        self.batch_size = int(config.eval.batch_size)
        num_shards = self.mesh.shape[DATA_AXIS]
        if self.batch_size % num_shards or self.batch_size % jax.process_count():
            raise ValueError(
                f"eval.batch_size={self.batch_size} (global) must be a multiple of the "
                f"{num_shards} devices of the mesh's '{DATA_AXIS}' axis"
            )
        self.source = source if source is not None else make_source(config.data, "eval")
        self._step = make_predict_step(model, self.mesh)
        self._batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        self._ground_truth = None  # built on first use, on process 0 only

    @property
    def category_names(self) -> dict[int, str]:
        return dict(self.source.category_names)

    def ground_truth(self):
        """The pycocotools COCO object of the whole eval source (original-size boxes).

        Object areas (which decide small / medium / large) are those `to_coco_dict` gives:
        box areas. COCO's annotation files hold segmentation areas instead, so on COCO the
        APs/APm/APl and ARs/ARm/ARl can differ slightly from official DETR's numbers.
        """
        if self._ground_truth is None:
            from detr_jax.data import to_coco_dict  # pylint: disable=import-outside-toplevel

            self._ground_truth = coco_from_dict(to_coco_dict(self.source))
        return self._ground_truth

    def __call__(self, variables, max_batches: int | None = None, progress: bool = False) -> EvalResult:
        """Evaluates `variables` ({"params", "frozen_bn"}) on the eval split (or its first
        `max_batches` batches per host)."""
        local = self._predict_local(variables, max_batches, progress)
        gathered = _gather_to_all(local)
        is_main = jax.process_index() == 0
        real = gathered["is_real"]
        detections = {k: gathered[k][real] for k in ("image_id", "scores", "labels", "boxes")}
        num_images = int(real.sum())
        names = self.category_names
        cat_ids = sorted(names)
        if is_main:
            results = to_coco_results(detections["image_id"], detections["scores"], detections["labels"], detections["boxes"])
            coco = coco_evaluate(self.ground_truth(), results, image_ids=detections["image_id"])
            numbers = np.concatenate([coco.stats, [coco.per_class_ap.get(c, -1.0) for c in cat_ids]])
        else:
            numbers = np.zeros(12 + len(cat_ids))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

            # Sent as the float64's bytes: jax without x64 would round them to float32.
            sent = multihost_utils.broadcast_one_to_all(numbers.astype(np.float64).view(np.uint32))
            numbers = np.asarray(sent, np.uint32).view(np.float64)
        stats = numbers[:12]
        return EvalResult(
            metrics=dict(zip(METRIC_NAMES, (float(v) for v in stats))),
            per_class_ap={c: float(v) for c, v in zip(cat_ids, numbers[12:])},
            category_names=names,
            summary=format_coco_summary(stats),
            num_images=num_images,
            detections=detections if is_main else None,
            source_indices=gathered["source_index"][real] if is_main else None,
        )

    def _predict_local(self, variables, max_batches: int | None, progress: bool) -> dict[str, np.ndarray]:
        """This host's detections of every batch it evaluates (fillers included), stacked."""
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

        from detr_jax.data import eval_shard_range, make_eval_iterator, num_eval_batches  # pylint: disable=import-outside-toplevel

        process, processes = jax.process_index(), jax.process_count()
        per_host = self.batch_size // processes
        num_batches = num_eval_batches(len(self.source), self.batch_size, processes)
        if max_batches is not None:
            num_batches = min(num_batches, max(1, int(max_batches)))
        start, _ = eval_shard_range(len(self.source), process, processes)
        variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
        batches = make_eval_iterator(self.config.data, self.batch_size, source=self.source)
        chunks: list[dict[str, np.ndarray]] = []
        pending = None  # the previous batch's device outputs: fetched after the next dispatch
        for b in tqdm(range(num_batches), desc="eval", unit="batch", disable=not (progress and process == 0)):
            batch = next(batches)
            args = [
                jax.make_array_from_process_local_data(self._batch_sharding, batch[key])
                for key in ("image", "mask", "orig_size")
            ]
            outputs = self._step(variables, *args)
            host = {
                "image_id": batch["image_id"].astype(np.int64),
                "is_real": batch["is_real"].astype(bool),
                "source_index": start + b * per_host + np.arange(per_host, dtype=np.int64),
            }
            if pending is not None:
                chunks[-1].update(self._to_host(pending))
            chunks.append(host)
            pending = outputs
        chunks[-1].update(self._to_host(pending))
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def _to_host(self, outputs: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """This host's rows of globally sharded outputs, as numpy."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

            outputs = multihost_utils.global_array_to_host_local_array(outputs, self.mesh, P(DATA_AXIS))
        return {k: np.asarray(v) for k, v in outputs.items()}


def _gather_to_all(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenates every process's arrays (the same shapes on every process) in process order."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    # The arrays travel through the devices, where jax without x64 would truncate 64-bit
    # values (image ids, scores are float32 already): send their bytes as uint32 columns.
    sendable = {k: _as_uint32_rows(v) for k, v in local.items()}
    gathered = multihost_utils.process_allgather(sendable, tiled=True)
    return {k: _from_uint32_rows(np.asarray(gathered[k]), v) for k, v in local.items()}


def _as_uint32_rows(x: np.ndarray) -> np.ndarray:
    """[N, ...] -> uint32 [N, C] holding the same bytes (bool is widened to uint32 first)."""
    x = np.ascontiguousarray(x.astype(np.uint32) if x.dtype == bool else x)
    return x.reshape(len(x), -1).view(np.uint32)


def _from_uint32_rows(rows: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Inverse of `_as_uint32_rows` for rows of arrays shaped and typed like `like`."""
    dtype = np.uint32 if like.dtype == bool else like.dtype
    out = np.ascontiguousarray(rows).view(dtype).reshape(-1, *like.shape[1:])
    return out.astype(bool) if like.dtype == bool else out


def evaluate(model, variables, config: ml_collections.ConfigDict, mesh: Mesh | None = None,
             max_batches: int | None = None) -> dict[str, float]:
    """COCO metrics {"AP", ..., "ARl"} of `variables` on the eval split (see `Evaluator`).

    Builds a new Evaluator (and so compiles again) on every call: a loop that evaluates
    periodically should keep one `Evaluator` instead.
    """
    return Evaluator(model, config, mesh).__call__(variables, max_batches=max_batches).metrics


# ----------------------------------------------------------------------------------------
# Output: sample drawings, JSON, the `detr-jax eval` command


def save_eval_samples(
    result: EvalResult,
    source,
    out_dir: str | pathlib.Path,
    num: int = 8,
    score_threshold: float = 0.5,
    name: str = "eval_samples",
) -> pathlib.Path | None:
    """Draws the detections (score >= threshold) of the first `num` evaluated images.

    Writes `out_dir/{name}.png` (a grid) and returns its path; None on processes other
    than 0 (which hold no detections) or when num is 0.
    """
    from detr_jax import visualize  # pylint: disable=import-outside-toplevel

    if result.detections is None or num <= 0:
        return None
    drawn = []
    dets = result.detections
    for row in range(min(num, len(dets["image_id"]))):
        record = source[int(result.source_indices[row])]
        selected = select_detections(
            dets["scores"][row], dets["labels"][row], dets["boxes"][row], record.image.shape[:2],
            score_threshold=score_threshold, class_names=result.category_names,
        )
        drawn.append(visualize.draw_detections(record.image, selected.boxes, selected.labels, selected.scores,
                                               result.category_names))
    return visualize.save_grid(drawn, pathlib.Path(out_dir) / f"{name}.png")


def make_eval_fn(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, model=None,
                 mesh: Mesh | None = None, source=None, progress: bool = False):
    """fn(variables, step) -> metrics {"AP", ..., "ARl"} for a training loop.

    Builds one `Evaluator` (compiled once, ground truth built once) for the model of
    `config` (or `model`). Each call evaluates the whole eval split, logs the table, and on
    process 0 saves `config.eval.num_visualized` images with their detections to
    `workdir/eval_samples/step_{step}.png`. Every process must call it.
    """
    from detr_jax.models.detr import DETR  # pylint: disable=import-outside-toplevel

    evaluator = Evaluator(model if model is not None else DETR.from_config(config.model), config, mesh, source)

    def eval_fn(variables, step: int) -> dict[str, float]:
        result = evaluator(variables, progress=progress)
        if jax.process_index() == 0:
            log.info("evaluation at step %d (%d images):\n%s", step, result.num_images, result.summary)
            save_eval_samples(result, evaluator.source, pathlib.Path(workdir) / "eval_samples",
                              num=config.eval.num_visualized, name=f"step_{step}")
        return result.metrics

    return eval_fn


def eval_main(
    config: ml_collections.ConfigDict,
    checkpoint: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    max_batches: int | None = None,
    dtype: str | None = None,
    num_visualized: int | None = None,
    save_detections: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """`detr-jax eval`: COCO evaluation of a checkpoint on `config`'s eval split.

    Prints the 12-number table and the per-class AP; writes to `out_dir` (process 0):
      eval_metrics.json   {"metrics", "per_class_ap", "num_images", "checkpoint", "dataset", ...}
      eval_samples.png    the first `num_visualized` (default config.eval.num_visualized)
                          images with their detections (score >= 0.5)
      detections_coco.json  every query of every image in the COCO results format
                          (only with save_detections)

    Args:
      config: the full config; its `model` section must match the checkpoint.
      checkpoint: a params checkpoint directory (`detr_jax.inference.load_checkpoint`).
      max_batches: evaluate only the first batches (per host), e.g. for a quick check.
      dtype: compute dtype override ("float32", "bfloat16").

    Returns the metrics dict (METRIC_NAMES).
    """
    from detr_jax import inference  # pylint: disable=import-outside-toplevel

    variables, config = inference.load_checkpoint(checkpoint, config)
    model = inference.build_model(config, dtype)
    evaluator = Evaluator(model, config)
    result = evaluator(variables, max_batches=max_batches, progress=progress)
    if jax.process_index() == 0:
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"COCO box evaluation of {checkpoint} on {result.num_images} images ({config.data.dataset}):")
        print(result.summary)
        print("per-class AP@[.50:.95]:")
        print(format_per_class_ap(result.per_class_ap, result.category_names))
        report = result.to_json()
        report.update(checkpoint=str(checkpoint), dataset=config.data.dataset, max_batches=max_batches,
                      dtype=dtype or config.model.dtype, summary=result.summary.splitlines())
        (out_dir / "eval_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        written = [out_dir / "eval_metrics.json"]
        if save_detections:
            dets = result.detections
            path = out_dir / "detections_coco.json"
            path.write_text(json.dumps(to_coco_results(dets["image_id"], dets["scores"], dets["labels"], dets["boxes"])))
            written.append(path)
        num = config.eval.num_visualized if num_visualized is None else num_visualized
        grid = save_eval_samples(result, evaluator.source, out_dir, num=num)
        if grid is not None:
            written.append(grid)
        print("wrote " + ", ".join(str(p) for p in written))
    return result.metrics
