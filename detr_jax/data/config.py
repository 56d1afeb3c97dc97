"""Defaults of the `data` config section: official DETR's COCO recipe on the synthetic set.

`configs/synthetic_tiny.py` overrides the sizes with small ones; the COCO configs set
`dataset` and the paths.
"""

from __future__ import annotations

import ml_collections

from detr_jax.config.errors import ConfigError
from detr_jax.data.tfds_source import LABEL_MAPPINGS
from detr_jax.data.transforms import COCO_TRAIN_SCALES

DATASETS = ("synthetic", "coco_folder", "coco_panoptic", "tfds")


def data_config() -> ml_collections.ConfigDict:
    """COCO-size defaults (see the comments for each key)."""
    return ml_collections.ConfigDict(
        dict(
            # "synthetic" (built-in shapes, no download), "coco_folder" (instances json +
            # image folder), "coco_panoptic" (panoptic json + image folder + PNG folder;
            # things and stuff, with masks) or "tfds" (tfds.data_source, ArrayRecord format).
            dataset="synthetic",
            # Split names; "" = the dataset's default: synthetic "train"/"validation",
            # coco_folder and coco_panoptic "train2017"/"val2017", tfds "train"/"validation".
            train_split="",
            eval_split="",
            # --- coco_folder: {coco_dir}/annotations/instances_{split}.json and
            # {coco_dir}/{split}/ (the official COCO layout) unless the explicit paths are set.
            coco_dir="",
            train_annotation_file="",
            train_image_dir="",  # coco_folder and coco_panoptic
            eval_annotation_file="",
            eval_image_dir="",  # coco_folder and coco_panoptic
            # --- coco_panoptic: {coco_dir}/annotations/panoptic_{split}.json, its PNGs in
            # {coco_dir}/annotations/panoptic_{split}/ and the images in {coco_dir}/{split}/
            # (the official layout) unless the explicit paths (and *_image_dir) are set.
            train_panoptic_file="",
            train_panoptic_png_dir="",
            eval_panoptic_file="",
            eval_panoptic_png_dir="",
            # --- tfds
            tfds_name="coco/2017",
            tfds_data_dir="",  # "" = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
            # "auto": coco/* datasets map TFDS's label indices 0..79 to COCO ids 1..90
            # (num_classes 91, official checkpoints work); "coco" forces it; "none" keeps
            # TFDS labels (num_classes = number of labels).
            tfds_label_mapping="auto",
            # --- synthetic shapes (category ids 1..3 -> model.num_classes = 4)
            synthetic_train_examples=10000,
            synthetic_eval_examples=500,
            synthetic_seed=0,  # fixes the images; independent of the training seed
            synthetic_image_size=(320, 640),  # (min, max) of each side, px
            synthetic_num_objects=(1, 4),  # (min, max) shapes per image
            synthetic_object_size=(0.2, 0.5),  # (min, max) shape side / shorter image side
            # The background becomes two "stuff" regions, sky (id 4) and ground (id 5),
            # listed as objects after the shapes (a panoptic dataset; num_classes = 6).
            synthetic_stuff=False,
            # --- targets: boxes per image are padded (or truncated, counted) to this.
            max_boxes=100,
            # Batches carry each object's pixels, "masks" bool [B, max_boxes, H, W] (for the
            # mask head); the dataset must provide them: synthetic, coco_folder (from the
            # annotations' "segmentation") or coco_panoptic.
            masks=False,
            # --- training augmentation (official: flip, then multi-scale resize or
            # resize-crop-resize, each with p 0.5)
            train_scales=COCO_TRAIN_SCALES,  # shorter side of the final resize
            train_max_size=1333,  # longer side cap of the final resize
            crop_scales=(400, 500, 600),  # shorter side before the random crop
            crop_size=(384, 600),  # (min, max) side of the random crop
            hflip_prob=0.5,
            crop_prob=0.5,
            # --- evaluation resize
            eval_scale=800,
            eval_max_size=1333,
            # --- padding: images are padded to the smallest bucket (h, w) that holds the
            # batch. Empty bucket_shapes = every (h, w) with sides multiples of bucket_step
            # below the max size, or the max size rounded up to 32 (COCO: 128..1280, 1344).
            # Batches that fit none are padded to their size rounded up to bucket_step
            # (counted as bucket_overflows).
            bucket_shapes=(),
            bucket_step=128,
            # --- loading
            num_workers=0,  # worker processes (0: in this process, with threads)
            num_threads=4,  # threads per process decoding and augmenting batches
            prefetch_batches=2,  # batches buffered per process
            # Training replaces an unreadable image by the next readable one (counted,
            # logged). Evaluation always fails on one, naming the file.
            skip_bad_images=True,
        )
    )


def validate(data: ml_collections.ConfigDict) -> None:
    """Checks the `data` section; raises ConfigError naming the key."""

    def fail(key, message):
        raise ConfigError(f"data.{key}={data[key]!r}: {message}")

    if data.dataset not in DATASETS:
        fail("dataset", f"expected one of {DATASETS}")
    if data.tfds_label_mapping not in LABEL_MAPPINGS:
        fail("tfds_label_mapping", f"expected one of {LABEL_MAPPINGS}")
    for key in ("masks", "synthetic_stuff"):
        if not isinstance(data[key], bool):
            fail(key, "must be True or False")
    for key in ("max_boxes", "train_max_size", "eval_scale", "eval_max_size", "bucket_step",
                "synthetic_train_examples", "synthetic_eval_examples"):
        if data[key] < 1:
            fail(key, "must be positive")
    for key in ("train_scales", "crop_scales"):
        if not data[key] or min(data[key]) < 1:
            fail(key, "must be a non-empty list of positive sizes")
    for key in ("crop_size", "synthetic_image_size", "synthetic_num_objects", "synthetic_object_size"):
        if len(data[key]) != 2 or not 0 <= data[key][0] <= data[key][1]:
            fail(key, "must be (min, max) with 0 <= min <= max")
    if data.crop_size[0] < 1 or data.synthetic_image_size[0] < 1:
        fail("crop_size" if data.crop_size[0] < 1 else "synthetic_image_size", "sizes must be positive")
    if not 0 < data.synthetic_object_size[0] <= data.synthetic_object_size[1] <= 1:
        fail("synthetic_object_size", "fractions must be in (0, 1]")
    for key in ("hflip_prob", "crop_prob"):
        if not 0.0 <= data[key] <= 1.0:
            fail(key, "must be a probability")
    if any(len(s) != 2 or min(s) < 1 for s in data.bucket_shapes):
        fail("bucket_shapes", "must be (height, width) pairs of positive sizes")
    for key in ("num_workers", "num_threads", "prefetch_batches"):
        if data[key] < 0:
            fail(key, "must be >= 0")
