"""The grain input pipeline: source -> load + augment -> padded batches, per host.

Training stream (deterministic for a seed, whatever the number of workers or threads):
  global example stream = every epoch a fresh permutation of the dataset (grain shuffle,
  reseeded per epoch), each position augmented with its own generator (grain random_map);
  global batch k is positions [k*G, (k+1)*G) of that stream, and host h of S reads the
  contiguous block [k*G + h*G/S, k*G + (h+1)*G/S) of it. Concatenated in process order
  (as `jax.make_array_from_process_local_data` does), the hosts' k-th batches are the
  single-process k-th batch element for element, so a run does not depend on the number of
  hosts (per-position randomness such as dropout included), and within an epoch the hosts
  read disjoint examples. Batches are built whole in one worker (grain `batch` on the
  MapDataset), so their content does not depend on the worker count either.
Evaluation: host h reads the contiguous slice h of the dataset in order, one pass; every
  host yields the same number of full batches, padded with filler examples (is_real False).
Targets: crowd objects are dropped in training and evaluation batches (as official DETR;
  COCO evaluation gets them from the ground truth, see `coco_export.to_coco_dict`); images
  without objects are kept (as official DETR's COCO training set). With data.masks the
  objects' masks travel with their boxes through every transform (batch key "masks").
Hosts pad to the same bucket: with several processes each batch's size is agreed through a
  tiny allgather (a collective: every host must call next() the same number of times).

The iterators are grain `DatasetIterator`s: `get_state()` / `set_state()` (JSON-able, also
usable with `grain.checkpoint.CheckpointHandler`) resume at the same next batch (with the
same number of workers).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import grain
import ml_collections
import numpy as np

from detr_jax.data import batching
from detr_jax.data.checks import describe
from detr_jax.data.coco_folder import CocoFolderSource
from detr_jax.data.coco_panoptic import CocoPanopticSource
from detr_jax.data.config import validate
from detr_jax.data.records import DataError, DetectionSource, ImageLoadError
from detr_jax.data.stats import PipelineStats
from detr_jax.data.synthetic import SyntheticShapesSource
from detr_jax.data.tfds_source import TfdsSource  # TensorFlow itself is imported only when one is built
from detr_jax.data.transforms import EvalResize, TrainAugmentation, clean_record, to_normalized_cxcywh

log = logging.getLogger(__name__)

_MAX_LOAD_ATTEMPTS = 16  # consecutive unreadable images before training gives up
_LOGGED_SKIPS = 20  # unreadable files logged per process, each once (all are counted)
_FILLER_SIZE = 32

_FIRST_TIME_WARNINGS = {
    "truncated_boxes": "an image has more boxes than data.max_boxes; the first max_boxes are kept",
    "degenerate_boxes": "boxes of zero or negative size (after clipping to the image), or with an empty mask, "
                        "were dropped",
}

_DEFAULT_SPLITS = {
    "synthetic": ("train", "validation"),
    "coco_folder": ("train2017", "val2017"),
    "coco_panoptic": ("train2017", "val2017"),
    "tfds": ("train", "validation"),
}

# COCO-format sources: each constructor argument's explicit key (data.{train|eval}_...) and
# its place under data.coco_dir in the official layout.
_COCO_LAYOUTS = {
    "coco_folder": {
        "annotation_file": ("annotation_file", "annotations/instances_{split}.json"),
        "image_dir": ("image_dir", "{split}"),
    },
    "coco_panoptic": {
        "annotation_file": ("panoptic_file", "annotations/panoptic_{split}.json"),
        "image_dir": ("image_dir", "{split}"),
        "panoptic_dir": ("panoptic_png_dir", "annotations/panoptic_{split}"),
    },
}


def make_source(data: ml_collections.ConfigDict, split: str) -> DetectionSource:
    """The dataset behind `data` for split "train" or "eval"."""
    validate(data)
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    train = split == "train"
    name = (data.train_split if train else data.eval_split) or _DEFAULT_SPLITS[data.dataset][not train]
    if data.dataset == "synthetic":
        return SyntheticShapesSource(
            data.synthetic_train_examples if train else data.synthetic_eval_examples,
            seed=data.synthetic_seed,
            split=name,
            image_size=tuple(data.synthetic_image_size),
            num_objects=tuple(data.synthetic_num_objects),
            object_size=tuple(data.synthetic_object_size),
            masks=data.masks,
            stuff=data.synthetic_stuff,
        )
    if data.dataset == "coco_folder":
        return CocoFolderSource(**_coco_paths(data, split, name), masks=data.masks)
    if data.dataset == "coco_panoptic":
        return CocoPanopticSource(**_coco_paths(data, split, name))
    return TfdsSource(data.tfds_name, name, data.tfds_data_dir, data.tfds_label_mapping)


def _coco_paths(data: ml_collections.ConfigDict, split: str, name: str) -> dict[str, str]:
    """{constructor argument: path} of a COCO-format source (`_COCO_LAYOUTS`): each the
    explicit data.{split}_... key where set, else its place under data.coco_dir."""
    layout = _COCO_LAYOUTS[data.dataset]
    keys = {arg: f"{split}_{key}" for arg, (key, _) in layout.items()}
    if not data.coco_dir and not all(data[key] for key in keys.values()):
        raise DataError(
            f"data.dataset={data.dataset!r} needs data.coco_dir or all of "
            + ", ".join(f"data.{key}" for key in keys.values())
        )
    return {
        arg: data[keys[arg]] or os.path.join(data.coco_dir, relative.format(split=name))
        for arg, (_, relative) in layout.items()
    }


def num_examples(data: ml_collections.ConfigDict, split: str = "train") -> int:
    """Number of examples of a split (reads the annotation file for COCO folders)."""
    return len(make_source(data, split))


def steps_per_epoch(num_train_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch (at least 1); the stream itself crosses epochs freely."""
    return max(1, num_train_examples // global_batch_size)


def buckets_for(data: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
    """The bucket shapes (h, w) of the padded images, smallest first."""
    max_side = max(data.train_max_size, data.eval_max_size)
    return batching.make_buckets(data.bucket_shapes, max_side, data.bucket_step)


def train_augmentation(data: ml_collections.ConfigDict) -> TrainAugmentation:
    return TrainAugmentation(
        scales=tuple(data.train_scales),
        max_size=data.train_max_size,
        crop_scales=tuple(data.crop_scales),
        crop_size=tuple(data.crop_size),
        hflip_prob=data.hflip_prob,
        crop_prob=data.crop_prob,
    )


def make_train_iterator(
    data: ml_collections.ConfigDict,
    batch_size: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    *,
    source: DetectionSource | None = None,
    shape_sync: str | Callable | None = "auto",
) -> DetectionBatchIterator:
    """Endless iterator of augmented training batches for this host.

    Args:
      data: the `data` config section.
      batch_size: the global batch size; this host gets batch_size / shard_count.
      seed: fixes the shuffling and every augmentation.
      shard_index, shard_count: this host and the number of hosts; default
        jax.process_index() and jax.process_count().
      source: a source already built from `data` (avoids re-reading annotations).
      shape_sync: how hosts agree on the padded shape: "auto" (allgather across processes
        when there are several, else nothing), None, or fn(batch) -> (H, W).
    """
    validate(data)
    shard_index, shard_count = _shard(shard_index, shard_count)
    per_host = _per_host_batch(batch_size, shard_count)
    source = source if source is not None else make_source(data, "train")
    if len(source) == 0:
        raise DataError("the training dataset has no examples")
    _check_masks(data, source)
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    ds = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.random_map(
        _TrainExample(source, train_augmentation(data), data.skip_bad_images, data.masks), seed=augment_seed
    )
    ds = _HostBlocks(ds, shard_index, shard_count, per_host)
    ds = ds.batch(per_host, drop_remainder=True, batch_fn=_collate_fn(data))
    return _iterate(ds, data, shape_sync)


def make_eval_iterator(
    data: ml_collections.ConfigDict,
    batch_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    *,
    source: DetectionSource | None = None,
    shape_sync: str | Callable | None = "auto",
) -> DetectionBatchIterator:
    """One in-order pass over this host's slice of the eval split, in full batches.

    Every host yields `num_eval_batches(len(source), batch_size, shard_count)` batches; the
    last ones are padded with filler examples (is_real False, image_id -1, no boxes). An
    unreadable image raises ImageLoadError naming the file. Arguments as for
    `make_train_iterator` (batch_size is global).
    """
    validate(data)
    shard_index, shard_count = _shard(shard_index, shard_count)
    per_host = _per_host_batch(batch_size, shard_count)
    source = source if source is not None else make_source(data, "eval")
    _check_masks(data, source)
    start, stop = eval_shard_range(len(source), shard_index, shard_count)
    total = num_eval_batches(len(source), batch_size, shard_count) * per_host
    indices = list(range(start, stop)) + [-1] * (total - (stop - start))
    ds = grain.MapDataset.source(indices).map(
        _EvalExample(source, EvalResize(data.eval_scale, data.eval_max_size), data.masks)
    )
    ds = ds.batch(per_host, drop_remainder=True, batch_fn=_collate_fn(data))
    return _iterate(ds, data, shape_sync)


def eval_shard_range(num: int, shard_index: int, shard_count: int) -> tuple[int, int]:
    """[start, stop) of the examples host `shard_index` evaluates (contiguous slices)."""
    per_shard = _ceil_div(num, shard_count)
    start = min(num, shard_index * per_shard)
    return start, min(num, start + per_shard)


def num_eval_batches(num: int, batch_size: int, shard_count: int = 1) -> int:
    """Batches per host of one eval pass (the same on every host)."""
    if num == 0:
        raise DataError("the evaluation dataset has no examples")
    per_host = _per_host_batch(batch_size, shard_count)
    per_shard = _ceil_div(num, shard_count)
    return _ceil_div(per_shard, per_host)


def _check_masks(data: ml_collections.ConfigDict, source: DetectionSource) -> None:
    """DataError when data.masks is on and `source` gives no masks. Sources that can give
    masks have `category_isthing`; those where masks are optional also have `masks`, their
    constructor's keyword."""
    if data.masks and not (hasattr(source, "category_isthing") and getattr(source, "masks", True)):
        raise DataError(
            f"data.masks=True, but the dataset {describe(source)} (data.dataset={data.dataset!r}) gives no masks: "
            "masks come from data.dataset='synthetic', 'coco_folder' (the annotations' 'segmentation') "
            "or 'coco_panoptic'"
        )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class DetectionBatchIterator(grain.DatasetIterator):
    """Yields batch dicts (see `batching`), counts `stats`, agrees on shapes across hosts."""

    def __init__(self, parent: grain.DatasetIterator, buckets, step: int, shape_sync=None):
        super().__init__(parent)
        self.stats = PipelineStats()
        self._buckets, self._step, self._shape_sync = buckets, step, shape_sync

    def __next__(self) -> dict:
        batch = next(self._parent)
        counters = batch.pop(batching.STATS_KEY)
        skipped_files, overflow_images = counters.pop("skipped_files"), counters.pop("overflow_images")
        if self._shape_sync is not None:
            shape = tuple(int(v) for v in self._shape_sync(batch))
            if shape != batch["image"].shape[1:3]:
                batch = batching.repad(batch, shape)
        batch = batching.with_pixel_mask(batch)
        shape = tuple(batch["image"].shape[1:3])
        before = self.stats.as_dict()
        if self.stats.add(counters, skipped_files, shape):
            log.info("input: new padded batch shape %s (%d distinct)", shape, len(self.stats.batch_shapes))
        if counters["bucket_overflows"]:
            log.warning(
                "input: batch of size %s fit no bucket; padded to %s: %s",
                batch["size"].max(0), shape,
                "; ".join(overflow_images) or "each image fits a bucket, but not all together",
            )
        for key, what in _FIRST_TIME_WARNINGS.items():
            if counters[key] and not before[key]:
                log.warning("input: %s (counted in stats.%s; not repeated)", what, key)
        return batch

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return "DetectionBatchIterator"


def allgather_shape(buckets, step: int) -> Callable[[dict], tuple[int, int]]:
    """fn(batch) -> the bucket holding every host's images (a collective: all hosts call it)."""

    def sync(batch: dict) -> tuple[int, int]:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        sizes = np.asarray(multihost_utils.process_allgather(batch["size"].max(0)))
        height, width = sizes.reshape(-1, 2).max(0)
        return batching.choose_bucket(buckets, int(height), int(width), step)[0]

    return sync


def _iterate(ds: grain.MapDataset, data, shape_sync) -> DetectionBatchIterator:
    threads = data.num_threads
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, data.prefetch_batches))
    it_ds = ds.to_iter_dataset(read)
    if data.num_workers > 0:
        _use_default_grain_flags()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data.num_workers, per_worker_buffer_size=data.prefetch_batches
            )
        )
    buckets = buckets_for(data)
    if shape_sync == "auto":
        import jax  # pylint: disable=import-outside-toplevel

        shape_sync = allgather_shape(buckets, data.bucket_step) if jax.process_count() > 1 else None
    return DetectionBatchIterator(iter(it_ds), buckets, data.bucket_step, shape_sync)


class _HostBlocks(grain.MapDataset):
    """This host's contiguous block of every global batch of `parent` (see the module doc)."""

    def __init__(self, parent: grain.MapDataset, shard_index: int, shard_count: int, per_host: int):
        super().__init__(parent)
        self._index, self._count, self._per_host = shard_index, shard_count, per_host

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, within = divmod(index, self._per_host)
        return self._parent[(batch * self._count + self._index) * self._per_host + within]

    def __str__(self) -> str:
        return f"HostBlocks(shard={self._index}/{self._count}, per_host={self._per_host})"


def _use_default_grain_flags() -> None:
    """grain reads options from absl flags; outside absl.app (tests, notebooks) they are
    unparsed and grain's worker processes fail on them, so take the defaults."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _collate_fn(data):
    return functools.partial(
        batching.collate, buckets=buckets_for(data), max_boxes=data.max_boxes, step=data.bucket_step
    )


def _shard(shard_index, shard_count) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # pylint: disable=import-outside-toplevel

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
    return shard_index, shard_count


def _per_host_batch(batch_size: int, shard_count: int) -> int:
    if batch_size <= 0 or batch_size % shard_count:
        raise ValueError(f"global batch size {batch_size} is not a positive multiple of {shard_count} hosts")
    return batch_size // shard_count


@dataclasses.dataclass(frozen=True)
class _TrainExample:
    """grain random_map: source index -> augmented example dict (see batching.collate)."""

    source: DetectionSource
    augment: TrainAugmentation
    skip_bad_images: bool
    masks: bool

    def __call__(self, index: int, rng: np.random.Generator) -> dict:
        record, skipped_files = _load(self.source, int(index), self.skip_bad_images)
        return _example(record, self.augment, rng, skipped_files, self.masks)


@dataclasses.dataclass(frozen=True)
class _EvalExample:
    """grain map: source index (-1: filler) -> resized example dict."""

    source: DetectionSource
    resize: EvalResize
    masks: bool

    def __call__(self, index: int) -> dict:
        if index < 0:
            return _filler(self.masks)
        return _example(self.source[int(index)], self.resize, None, (), self.masks)


def _example(record, transform, rng, skipped_files: tuple[str, ...], with_masks: bool) -> dict:
    # `masks` is [] or [the masks]: the transforms take and return them as an optional last item
    boxes, labels, degenerate, *masks = clean_record(record, drop_crowd=True, with_masks=with_masks)
    image, boxes, labels, *masks = transform(record.image, boxes, labels, rng, *masks)
    h, w = image.shape[:2]
    example = {
        "image": image,
        "boxes": to_normalized_cxcywh(boxes, h, w),
        "labels": labels.astype(np.int32),
        "image_id": record.image_id,
        "orig_size": tuple(record.orig_size),
        "is_real": True,
        "name": record.name,
        "skipped_files": skipped_files,
        "num_degenerate": degenerate,
    }
    if masks:
        example["masks"] = masks[0]
    return example


def _filler(with_masks: bool = False) -> dict:
    size = (_FILLER_SIZE, _FILLER_SIZE)
    example = {
        "image": np.zeros(size + (3,), np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int32),
        "image_id": -1,
        "orig_size": size,
        "is_real": False,
        "name": "",
        "skipped_files": (),
        "num_degenerate": 0,
    }
    if with_masks:
        example["masks"] = np.zeros((0,) + size, bool)
    return example


_skips_logged: set[str] = set()  # this process's logged unreadable files


def _load(source, index: int, skip_bad_images: bool):
    """(record, names of the unreadable images skipped): tries index, index+1, ... (mod len).

    The names (`ImageLoadError.path`) let the stats count distinct files: the same bad file
    is met every epoch, and also by the example before it when that one is unreadable too.
    """
    error, skipped, attempts = None, [], min(_MAX_LOAD_ATTEMPTS, len(source))
    for attempt in range(attempts):
        try:
            return source[(index + attempt) % len(source)], tuple(skipped)
        except ImageLoadError as e:
            if not skip_bad_images:
                raise
            error = e
            skipped.append(e.path)
            if e.path not in _skips_logged and len(_skips_logged) < _LOGGED_SKIPS:
                _skips_logged.add(e.path)
                log.warning("input: skipping unreadable image (replaced by the next one): %s", e)
    raise DataError(f"{attempts} consecutive images failed to load; last: {error}")
