"""Input pipeline: sources (synthetic shapes, COCO-format folders, COCO panoptic, TFDS),
DETR's augmentations (boxes, and masks with data.masks), padding to bucket shapes, and the
grain iterators.

Typical use:
    source = make_source(config.data, "train")
    steps = steps_per_epoch(len(source), config.train.batch_size)
    it = make_train_iterator(config.data, config.train.batch_size, config.seed, source=source)
    batch = next(it)          # dict of numpy arrays, see detr_jax.data.batching
    state = it.get_state()    # save with the checkpoint; it.set_state(state) to resume
    it.stats.as_dict()        # skipped images, dropped boxes, distinct shapes, ...
"""

from detr_jax.data.batching import BATCH_KEYS
from detr_jax.data.coco_export import to_coco_dict, write_coco_folder
from detr_jax.data.coco_folder import CocoFolderSource
from detr_jax.data.coco_panoptic import CocoPanopticSource
from detr_jax.data.pipeline import (
    DetectionBatchIterator,
    buckets_for,
    eval_shard_range,
    make_eval_iterator,
    make_source,
    make_train_iterator,
    num_eval_batches,
    num_examples,
    steps_per_epoch,
)
from detr_jax.data.records import DataError, DatasetFormatError, DetectionSource, ImageLoadError, Record
from detr_jax.data.stats import PipelineStats
from detr_jax.data.synthetic import SyntheticShapesSource

__all__ = [
    "BATCH_KEYS",
    "CocoFolderSource",
    "CocoPanopticSource",
    "DataError",
    "DatasetFormatError",
    "DetectionBatchIterator",
    "DetectionSource",
    "ImageLoadError",
    "PipelineStats",
    "Record",
    "SyntheticShapesSource",
    "buckets_for",
    "eval_shard_range",
    "make_eval_iterator",
    "make_source",
    "make_train_iterator",
    "num_eval_batches",
    "num_examples",
    "steps_per_epoch",
    "to_coco_dict",
    "write_coco_folder",
]
