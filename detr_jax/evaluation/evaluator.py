"""Data-parallel COCO evaluation over every device of every host: box AP, and with a mask
head panoptic quality and mask AP.

One pass over the eval split. Each host reads its slice of the dataset
(`detr_jax.data.make_eval_iterator`), the batch is sharded over the mesh's "data" axis that
spans every device of every host, parameters are replicated, and the predict function is
`postprocess.make_predict_fn`. Each host keeps its own detections; at the end they are
gathered on process 0 (fixed-size arrays, `process_allgather`), filler examples are dropped,
and pycocotools (`detr_jax.evaluation.coco_metrics`) computes the 12 standard numbers against ground
truth built from the source's records (`detr_jax.data.to_coco_dict`), one code path for
every source. With a mask head (model.masks) and mask targets (data.masks), each host also
post-processes its images' masks as the batches arrive (`detr_jax.evaluation.segmentation_eval`), and
process 0 adds PQ/SQ/RQ and mask AP. The numbers are broadcast so that every process
returns the same metrics.

Typical use (an Evaluator compiles once and builds the ground truth once):
    evaluator = Evaluator(model, config, mesh)
    result = evaluator(variables)          # EvalResult
    result.metrics["AP"], result.summary   # the 12 numbers, the printed table
In a training loop, `make_eval_fn(config, workdir)` wraps this and saves drawn samples.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from detr_jax.evaluation import visualize
from detr_jax.evaluation.coco_metrics import METRIC_NAMES, coco_evaluate, coco_from_dict, format_coco_summary, to_coco_results
from detr_jax.config.errors import ConfigError
from detr_jax.data import eval_shard_range, make_eval_iterator, make_source, num_eval_batches, to_coco_dict
from detr_jax.data.checks import check_category_ids, check_image_files
from detr_jax.models import build_class_convention, build_model
from detr_jax.evaluation.postprocess import make_predict_fn, select_detections
from detr_jax.evaluation.segmentation_eval import (
    SEGMENTATION_METRIC_NAMES,
    SegmentationResults,
    panoptic_id_map,
    segmentation_metrics,
)
from detr_jax.runtime.sharding import DATA_AXIS, batch_sharded, data_size, make_mesh, replicated

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalResult:
    """One evaluation pass (the same on every process, except `detections` and `source_indices`).

    Attributes:
      metrics: {"AP", "AP50", ..., "ARl"} (METRIC_NAMES) as floats; with segmentation also
        SEGMENTATION_METRIC_NAMES ("PQ", ..., "RQ_st", "mask_AP", ..., "mask_ARl").
      per_class_ap: {category id: AP@[.50:.95]} (-1: no ground truth for the category).
      category_names: {category id: name}.
      summary: the 12-line pycocotools table.
      num_images: real images evaluated.
      detections: process 0: {"image_id" [N], "scores" [N, Q], "labels" [N, Q],
        "boxes" [N, Q, 4] pixel xyxy of the original image}, every query of every real
        image in dataset order; other processes: None.
      source_indices: process 0: int64 [N], each image's index in the eval source.
      segments: process 0, with segmentation: the panoptic segments of every image
        (`coco_metrics.to_panoptic_results` entries: image_id, category_id, RLE); else None.
    """

    metrics: dict[str, float]
    per_class_ap: dict[int, float]
    category_names: dict[int, str]
    summary: str
    num_images: int
    detections: dict[str, np.ndarray] | None = None
    source_indices: np.ndarray | None = None
    segments: list[dict] | None = None

    def to_json(self) -> dict:
        return {
            "metrics": self.metrics,
            "per_class_ap": [
                {"id": cat_id, "name": self.category_names.get(cat_id, ""), "AP": ap}
                for cat_id, ap in sorted(self.per_class_ap.items())
            ],
            "num_images": self.num_images,
        }


class Evaluator:
    """COCO evaluation of a model on the eval split of `config.data`, reusable across calls.

    Build it once (the predict step is compiled once per bucket shape and the ground truth
    is built once), then call it with each new set of variables. Every process must call it
    (the batch is sharded over all hosts).

    Args:
      model: the config's detector (`models.build_model`, any compute dtype).
      config: the full config (uses `data` and `eval.batch_size`, the global batch size).
      mesh: a Mesh with a "data" axis; default: all devices of all hosts.
      source: the eval source, if already built (default `make_source(config.data, "eval")`).
    """

    def __init__(self, model, config: ml_collections.ConfigDict, mesh: Mesh | None = None, source=None):
        self.model = model
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh()
        self.batch_size = int(config.eval.batch_size)
        num_shards = data_size(self.mesh)
        if self.batch_size % num_shards or self.batch_size % jax.process_count():
            raise ConfigError(
                f"eval.batch_size={self.batch_size} (global) must be a multiple of the "
                f"{num_shards} devices of the mesh's '{DATA_AXIS}' axis"
            )
        self.source = source if source is not None else make_source(config.data, "eval")
        check_category_ids(self.source, config.model.num_classes)
        check_image_files(self.source)
        self._predict = make_predict_fn(model, self.mesh, build_class_convention(config))
        self._batch_sharding = batch_sharded(self.mesh)
        self._ground_truth = None  # built on first use, on process 0 only
        # Segmentation needs the mask head's outputs and ground-truth masks.
        self.segmentation = bool(config.model.masks and config.data.masks)
        if config.model.masks and not config.data.masks:
            log.info("evaluation: the model has a mask head but data.masks=False: box metrics only")

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
            self._ground_truth = coco_from_dict(to_coco_dict(self.source))
        return self._ground_truth

    def __call__(self, variables, max_batches: int | None = None, progress: bool = False) -> EvalResult:
        """Evaluates `variables` ({"params", "frozen_bn"}) on the eval split (or its first
        `max_batches` batches per host)."""
        segmentation = SegmentationResults(self.source.category_isthing) if self.segmentation else None
        local = self._predict_local(variables, max_batches, progress, segmentation)
        gathered = _gather_to_all(local)
        segments, instances = segmentation.gathered() if segmentation else (None, None)
        is_main = jax.process_index() == 0
        real = gathered["is_real"]
        detections = {k: gathered[k][real] for k in ("image_id", "scores", "labels", "boxes")}
        num_images = int(real.sum())
        names = self.category_names
        cat_ids = sorted(names)
        segm_names = SEGMENTATION_METRIC_NAMES if segmentation else ()
        segm_summary = ""
        if is_main:
            results = to_coco_results(detections["image_id"], detections["scores"], detections["labels"], detections["boxes"])
            coco = coco_evaluate(self.ground_truth(), results, image_ids=detections["image_id"])
            segm_numbers = []
            if segmentation:
                segm_metrics, segm_summary = segmentation_metrics(
                    self.ground_truth(), segments, instances, detections["image_id"])
                segm_numbers = [segm_metrics[name] for name in segm_names]
            numbers = np.concatenate([coco.stats, segm_numbers, [coco.per_class_ap.get(c, -1.0) for c in cat_ids]])
        else:
            numbers = np.zeros(12 + len(segm_names) + len(cat_ids))
        if jax.process_count() > 1:
            # Sent as the float64's bytes: jax without x64 would round them to float32.
            sent = multihost_utils.broadcast_one_to_all(numbers.astype(np.float64).view(np.uint32))
            numbers = np.asarray(sent, np.uint32).view(np.float64)
        stats, segm_stats, class_stats = np.split(numbers, [12, 12 + len(segm_names)])
        return EvalResult(
            metrics={**dict(zip(METRIC_NAMES, (float(v) for v in stats))),
                     **dict(zip(segm_names, (float(v) for v in segm_stats)))},
            per_class_ap={c: float(v) for c, v in zip(cat_ids, class_stats)},
            category_names=names,
            summary=format_coco_summary(stats) + (f"\n{segm_summary}" if segm_summary else ""),
            num_images=num_images,
            detections=detections if is_main else None,
            source_indices=gathered["source_index"][real] if is_main else None,
            segments=segments if is_main else None,
        )

    def _predict_local(self, variables, max_batches: int | None, progress: bool,
                       segmentation: SegmentationResults | None) -> dict[str, np.ndarray]:
        """This host's detections of every batch it evaluates (fillers included), stacked;
        the mask head's outputs go to `segmentation` batch by batch."""
        process, processes = jax.process_index(), jax.process_count()
        per_host = self.batch_size // processes
        num_batches = num_eval_batches(len(self.source), self.batch_size, processes)
        if max_batches is not None:
            num_batches = min(num_batches, max(1, int(max_batches)))
        start, _ = eval_shard_range(len(self.source), process, processes)
        variables = jax.device_put(variables, replicated(self.mesh))
        batches = make_eval_iterator(self.config.data, self.batch_size, source=self.source)
        chunks: list[dict[str, np.ndarray]] = []
        pending = None  # the previous batch's device outputs: fetched after the next dispatch
        for b in tqdm(range(num_batches), desc="eval", unit="batch", disable=not (progress and process == 0)):
            batch = next(batches)
            args = [
                jax.make_array_from_process_local_data(self._batch_sharding, batch[key])
                for key in ("image", "mask", "orig_size")
            ]
            outputs = self._predict(variables, *args)
            host = {
                "image_id": batch["image_id"].astype(np.int64),
                "is_real": batch["is_real"].astype(bool),
                "source_index": start + b * per_host + np.arange(per_host, dtype=np.int64),
                "size": batch["size"],
                "orig_size": batch["orig_size"],
            }
            if pending is not None:
                self._fetch(pending, chunks[-1], segmentation)
            chunks.append(host)
            pending = outputs
        self._fetch(pending, chunks[-1], segmentation)
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def _fetch(self, outputs: dict[str, jax.Array], chunk: dict[str, np.ndarray],
               segmentation: SegmentationResults | None) -> None:
        """Adds a batch's detections to its host `chunk`; hands the mask head's outputs,
        if any, to `segmentation` (they are not kept)."""
        host = self._to_host(outputs)
        mask_outputs = {k: host.pop(k) for k in ("pred_logits", "pred_masks") if k in host}
        chunk.update(host)
        if segmentation is not None:
            segmentation.add_batch({**mask_outputs, **host}, chunk["image_id"], chunk["is_real"], chunk["size"],
                                   chunk["orig_size"])

    def _to_host(self, outputs: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """This host's rows of globally sharded outputs, as numpy."""
        if jax.process_count() > 1:
            outputs = multihost_utils.global_array_to_host_local_array(outputs, self.mesh, P(DATA_AXIS))
        return {k: np.asarray(v) for k, v in outputs.items()}


def _gather_to_all(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenates every process's arrays (the same shapes on every process) in process order."""
    if jax.process_count() == 1:
        return local
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


def save_eval_samples(
    result: EvalResult,
    source,
    out_dir: str | pathlib.Path,
    num: int = 8,
    score_threshold: float = 0.5,
    name: str = "eval_samples",
) -> pathlib.Path | None:
    """Draws the detections (score >= threshold), or with segmentation the panoptic
    segments, of the first `num` evaluated images.

    Writes `out_dir/{name}.png` (a grid) and returns its path; None on processes other
    than 0 (which hold no detections) or when num is 0.
    """
    if result.detections is None or num <= 0:
        return None
    drawn = []
    dets = result.detections
    for row in range(min(num, len(dets["image_id"]))):
        record = source[int(result.source_indices[row])]
        if result.segments is not None:
            id_map, info = panoptic_id_map(result.segments, dets["image_id"][row], record.image.shape[:2])
            drawn.append(visualize.draw_segments(record.image, id_map, info, result.category_names))
            continue
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
    evaluator = Evaluator(model if model is not None else build_model(config.model), config, mesh, source)

    def eval_fn(variables, step: int) -> dict[str, float]:
        result = evaluator(variables, progress=progress)
        if jax.process_index() == 0:
            log.info("evaluation at step %d (%d images):\n%s", step, result.num_images, result.summary)
            save_eval_samples(result, evaluator.source, pathlib.Path(workdir) / "eval_samples",
                              num=config.eval.num_visualized, name=f"step_{step}")
        return result.metrics

    return eval_fn
