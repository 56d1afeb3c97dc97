"""Inference: a jit-compiled batch `Predictor` on images of any size, and image loading.

Images go through the evaluation transform of the data pipeline (shorter side
`data.eval_scale`, longer at most `data.eval_max_size`), are padded as uint8 pixels into the
pipeline's bucket shapes (`batching.collate`), and the batch is padded to a fixed size with
filler images. So the model is compiled once per bucket shape (and compute dtype), never
per image size: `Predictor.num_compilations` counts the compiled programs.

Outputs are `postprocess.Detections`: boxes in pixel (x0, y0, x1, y1) of the ORIGINAL image
(clipped to it), scores, category ids and names, best first.
"""

from __future__ import annotations

import collections
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from detr_jax.data import batching, make_source
from detr_jax.data.coco_categories import COCO_CATEGORIES, COCO_NUM_CLASSES
from detr_jax.data.images import decode_image
# The pipeline's filler example (a blank image that pads a batch) pads the Predictor's too.
from detr_jax.data.pipeline import _filler as filler_example
from detr_jax.data.pipeline import buckets_for
from detr_jax.data.synthetic import SyntheticShapesSource
from detr_jax.data.transforms import EvalResize
from detr_jax.serving.export import ExportedDetector, ExportError, is_export
from detr_jax.models import build_class_convention, build_model
from detr_jax.evaluation.postprocess import Detections, make_predict_fn, select_detections
from detr_jax.checkpoints.restore import load_checkpoint
from detr_jax.evaluation.segmentation_postprocess import PanopticSegmentation, panoptic_segmentation
from detr_jax.runtime.sharding import data_size, make_mesh, replicated

log = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip


# ----------------------------------------------------------------------------------------
# Class names


# Official DETR's panoptic models (250 classes, COCO panoptic ids): ids up to 90 are things.
COCO_PANOPTIC_NUM_CLASSES, COCO_PANOPTIC_LAST_THING = 250, 90


def category_names_for(config: ml_collections.ConfigDict, source=None) -> dict[int, str]:
    """{category id: name} for the classes of `config` (COCO, synthetic shapes and stuff, or
    the categories of a COCO-folder or COCO-panoptic eval annotation file); {} when unknown.
    `source`: `eval_source(config)` when the caller has it (read only if needed)."""
    if config.model.num_classes == COCO_NUM_CLASSES:
        return dict(COCO_CATEGORIES)
    source = source if source is not None else eval_source(config)
    return dict(source.category_names) if source is not None else {}


def category_isthing_for(config: ml_collections.ConfigDict, source=None) -> dict[int, bool]:
    """{category id: thing (True) or stuff (False)} for panoptic post-processing: the eval
    source's where `config` describes one with stuff, official DETR's rule (ids <= 90) for
    its 250-class COCO panoptic models, else every class a thing. `source`: as for
    `category_names_for`."""
    source = source if source is not None else eval_source(config)
    if source is not None and hasattr(source, "category_isthing"):
        return dict(source.category_isthing)
    if config.model.num_classes == COCO_PANOPTIC_NUM_CLASSES:
        return {i: i <= COCO_PANOPTIC_LAST_THING for i in range(COCO_PANOPTIC_NUM_CLASSES)}
    return {i: True for i in range(config.model.num_classes)}


def eval_source(config: ml_collections.ConfigDict):
    """The eval source of `config` where it names the model's classes (the synthetic data,
    or a COCO annotation file that reads), else None."""
    if config.data.dataset == "synthetic":
        source = SyntheticShapesSource(1, stuff=config.data.synthetic_stuff)
        return source if source.num_classes == config.model.num_classes else None
    if config.data.dataset in ("coco_folder", "coco_panoptic"):
        try:
            return make_source(config.data, "eval")
        except Exception as e:  # names are a convenience: fall back to "class {id}"
            log.warning("no category names (%s); labels will be shown as ids", e)
    return None


# ----------------------------------------------------------------------------------------
# Images


def load_image(image: ImageLike, exif_transpose: bool = True) -> np.ndarray:
    """uint8 [H, W, 3] RGB from a file path, a PIL image or an array.

    Arrays: uint8 [H, W, 3], [H, W, 4] (alpha dropped), [H, W, 1] or [H, W] (grey).
    Files are decoded as in the data pipeline (`data.images.decode_image`); with
    `exif_transpose` a photo's EXIF orientation is applied, so boxes refer to the image as
    viewers show it (COCO evaluation ignores EXIF, as the dataset's annotations do).

    Raises:
      ImageLoadError: an unreadable file (names it and the problem).
      TypeError / ValueError: an array of another dtype or shape.
    """
    if isinstance(image, (str, os.PathLike)):
        array = decode_image(image)
        return _apply_exif_orientation(image, array) if exif_transpose else array
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image array, got {array.dtype} (convert with .astype(np.uint8))")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image array [H, W, 3] (or [H, W], [H, W, 1], [H, W, 4]), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"empty image of shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def _apply_exif_orientation(path, array: np.ndarray) -> np.ndarray:
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # the pixels decoded; unreadable EXIF just means no rotation
        return array
    if orientation not in _EXIF_TRANSPOSE:
        return array
    return np.asarray(Image.fromarray(array).transpose(_EXIF_TRANSPOSE[orientation]))


# ----------------------------------------------------------------------------------------
# Predictor


class Predictor:
    """Jit-compiled batch inference of a DETR.

    Args:
      config: full config; uses `model`, `data.eval_scale`, `data.eval_max_size`, the
        bucket settings of `data`, and `eval.batch_size` (default batch size).
      variables: {"params", "frozen_bn"} (numpy or jax arrays), e.g. from
        `restore.load_checkpoint` or a training state; None with `exported`.
      dtype: compute dtype override ("float32", "bfloat16"); default `config.model.dtype`.
      batch_size: images per compiled call (shorter batches are padded with fillers).
      class_names: {category id: name}; default `category_names_for(config)`.
      mesh: the devices a batch is split over (batch_size must be a multiple of their
        number); default: one device.
      exported: run this exported model (`detr_jax.serving.export.ExportedDetector`) in its own
        runtime instead of compiling the model (`variables` None; see `from_export`).
      group_by_bucket: True: images are batched with others of the same bucket, so each
        image is padded exactly as if it were alone and its result does not depend on the
        other images. False: consecutive images share a batch padded to the smallest bucket
        holding all of them (as the evaluation pipeline does; padding changes the border
        convolutions, so results shift slightly with the batch's other images).

    The compiled program depends only on (bucket shape, dtype): see `num_compilations`.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        variables: Mapping,
        *,
        dtype: str | Any | None = None,
        batch_size: int | None = None,
        class_names: Mapping[int, str] | None = None,
        mesh: Mesh | None = None,
        exported: ExportedDetector | None = None,
        group_by_bucket: bool = True,
    ):
        self.config = config
        self._exported = exported
        self.batch_size = int(batch_size or config.eval.batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        # A mask head needs both the names and the stuff classes: one read of the annotations.
        source = eval_source(config) if config.model.masks else None
        self.class_names = dict(class_names) if class_names is not None else category_names_for(config, source)
        self.category_isthing = category_isthing_for(config, source) if config.model.masks else {}
        self.group_by_bucket = group_by_bucket
        self._buckets = buckets_for(config.data)
        self._step = int(config.data.bucket_step)
        self._resize = EvalResize(config.data.eval_scale, config.data.eval_max_size)
        self._executables: dict[tuple, Any] = {}
        if exported is not None:
            self.model, self.mesh, self._variables = None, None, None
            self.dtype = exported.metadata["dtype"]
            return
        self.model = build_model(config.model, dtype)
        self.dtype = jnp.dtype(self.model.dtype).name
        self.mesh = mesh if mesh is not None else make_mesh(jax.local_devices()[:1])
        if self.batch_size % data_size(self.mesh):
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of the mesh's {data_size(self.mesh)} devices")
        self._variables = jax.device_put(dict(variables), replicated(self.mesh))
        self._forward = make_predict_fn(self.model, self.mesh, build_class_convention(config))

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
                        overrides: Mapping[str, Any] | None = None, **kwargs) -> "Predictor":
        """A Predictor of a checkpoint (see `detr_jax.checkpoints.restore.load_checkpoint`: `overrides`
        apply to the checkpoint's own config, when `config` is None), or of an exported
        directory (`from_export`; its config is its own)."""
        if is_export(checkpoint):
            if config is not None or overrides:
                raise ExportError(f"{checkpoint}: an exported model has its config built in; "
                                  "drop --config and the --config.* overrides")
            return cls.from_export(checkpoint, **kwargs)
        variables, config = load_checkpoint(checkpoint, config, overrides)
        return cls(config, variables, **kwargs)

    @classmethod
    def from_export(cls, path: str | os.PathLike, *, dtype: str | None = None, batch_size: int | None = None,
                    threads: int | None = None, **kwargs) -> "Predictor":
        """A Predictor that runs an exported directory (`detr-jax export`) in its runtime
        (onnxruntime, TensorFlow or jax.export) with the same resize, padding and
        post-processing as the compiled model. A fixed-size export pads every image to its
        size; a fixed-batch export takes that batch size.
        """
        exported = ExportedDetector(path, threads=threads)
        meta, where = exported.metadata, f"{exported.path} ({exported.format})"
        if dtype is not None and jnp.dtype(dtype).name != meta["dtype"]:
            raise ExportError(f"{where}: exported for {meta['dtype']}, not {jnp.dtype(dtype).name}")
        if meta["batch"] is not None and batch_size not in (None, meta["batch"]):
            raise ExportError(f"{where}: exported for batches of {meta['batch']}, not {batch_size}")
        config = exported.config
        if meta["size"] is not None:
            config.data.bucket_shapes = (tuple(meta["size"]),)
        else:
            multiple = meta["size_multiple"]
            sizes = [*buckets_for(config.data), (config.data.bucket_step, config.data.bucket_step)]
            if any(side % multiple for shape in sizes for side in shape):
                raise ExportError(f"{where}: its image sizes must be multiples of {multiple}, but the config's "
                                  f"buckets {buckets_for(config.data)} (step {config.data.bucket_step}) are not")
        return cls(config, None, exported=exported, batch_size=meta["batch"] or batch_size,
                   class_names=exported.class_names or None, **kwargs)

    @property
    def segments(self) -> bool:
        """Whether `segment` works: a mask head (model.masks), run by JAX (an export serves
        the detections only)."""
        return bool(self.config.model.masks) and self._exported is None

    @property
    def num_compilations(self) -> int:
        """Programs compiled so far: one per (bucket shape, dtype) seen (with an exported
        model: the shapes it has run, each compiled by its runtime)."""
        return len(self._executables)

    @property
    def compiled_shapes(self) -> list[tuple[int, int]]:
        """The padded (H, W) bucket shapes compiled so far."""
        return [key[0] for key in self._executables]

    def _executable(self, shape: tuple[int, int]):
        key = (tuple(shape), self.dtype)
        if key not in self._executables and self._exported is not None:
            self._executables[key] = lambda _, image, mask, orig_size: self._exported(image, mask, orig_size)
        if key not in self._executables:
            b, (h, w) = self.batch_size, shape
            specs = (
                jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
                jax.ShapeDtypeStruct((b, h, w), jnp.bool_),
                jax.ShapeDtypeStruct((b, 2), jnp.int32),
            )
            # Compiled ahead of time: calling it with another shape raises instead of
            # silently compiling again. With XLA's default options: none of the XLA:CPU
            # options studied (YNNPACK fusions, schedulers, vector width, fast math, matmul
            # precision; scripts/bench_jit_options.py) made DETR-R50 inference faster
            # beyond the run's noise (docs/BENCHMARKS.md, 2026-12-07), unlike the train step's.
            self._executables[key] = self._forward.lower(self._variables, *specs).compile()
            log.info("predictor: compiled for batch %d x %s (%s); %d programs", b, shape, self.dtype, len(self._executables))
        return self._executables[key]

    def predict(self, images: Sequence[ImageLike], score_threshold: float = 0.5, top_k: int | None = 100) -> list[Detections]:
        """Detections of each image (score >= score_threshold, at most top_k, best first).

        Args:
          images: file paths, PIL images or uint8 arrays (see `load_image`), any sizes.
          score_threshold: 0 keeps every query.
          top_k: None or 0: no limit.
        """
        arrays = [load_image(image) for image in images]
        return [self.detections_of(r, a, score_threshold, top_k) for r, a in zip(self.predict_queries(arrays), arrays)]

    def detections_of(self, queries: Mapping[str, np.ndarray], image: np.ndarray, score_threshold: float = 0.5,
                      top_k: int | None = 100) -> Detections:
        """`predict`'s result for one image from its `predict_queries` output."""
        return select_detections(queries["scores"], queries["labels"], queries["boxes"], image.shape[:2],
                                 score_threshold, top_k, self.class_names, queries=queries.get("queries"))

    def segmentation_of(self, queries: Mapping[str, np.ndarray], image: np.ndarray, method: str = "official",
                        **options) -> PanopticSegmentation:
        """`segment`'s result for one image from its `predict_queries` output."""
        if "pred_masks" not in queries:
            raise ValueError("panoptic segmentation needs a model with a mask head (model.masks=True), run by "
                             "JAX: exports serve the detections only")
        return panoptic_segmentation(queries["pred_logits"], queries["pred_masks"], queries["size"], image.shape[:2],
                                     self.category_isthing, method, **options)

    def predict_queries(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Every detection of each image (`postprocess.postprocess`: DETR's, every query in
        query order), unfiltered and unclipped.

        Args:
          images: uint8 [H, W, 3] arrays.
        Returns per image: scores float32 [N], labels int32 [N], boxes float32 [N, 4]
        pixel xyxy of the original image (queries int32 [N] where detection i is not query
        i: a sigmoid class convention's), size int32 [2] (h, w) of the resized image the
        model saw; with a mask head also pred_logits float32 [Q, K + 1] and pred_masks
        float32 [Q, H/4, W/4] (the padded input's stride-4 grid).
        """
        results: list[dict | None] = [None] * len(images)
        for indices, batch in self.batches(images):
            shape = batch["image"].shape[1:3]
            outputs = self._executable(shape)(self._variables, batch["image"], batch["mask"], batch["orig_size"])
            outputs = {k: np.asarray(v) for k, v in outputs.items()}
            for row, i in enumerate(indices):
                results[i] = {**{k: v[row] for k, v in outputs.items()}, "size": batch["size"][row]}
        return results

    def segment(self, images: Sequence[ImageLike], method: str = "official", **options) -> list[PanopticSegmentation]:
        """The panoptic segmentation of each image (a model with a mask head).

        Args:
          images: file paths, PIL images or uint8 arrays (see `load_image`), any sizes.
          method, options: the post-processing (`segmentation_postprocess.PANOPTIC_METHODS`,
            official DETR's by default, threshold 0.85) and its thresholds.
        Returns per image: id_map int32 [H, W] at the image's size (0 = void) and
        segments_info [{"id", "category_id", "isthing", "area"}].
        """
        arrays = [load_image(image) for image in images]
        return [self.segmentation_of(r, a, method, **options) for r, a in zip(self.predict_queries(arrays), arrays)]

    def batches(self, images: Sequence[np.ndarray]) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
        """The model's input batches of `images` (uint8 [H, W, 3] arrays): resized and padded
        into bucket shapes, with filler images up to `batch_size`.

        Yields (indices of the images in rows 0.., batch) with batch image uint8
        [batch_size, H, W, 3], mask bool [batch_size, H, W], orig_size int32 [batch_size, 2]
        (and the pipeline's other keys): the inputs of an exported model (detr_jax.serving.export).
        """
        resized = [self._resize(image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int32))[0] for image in images]
        for indices in self._plan_batches([r.shape[:2] for r in resized]):
            examples = [_image_example(resized[i], images[i].shape[:2]) for i in indices]
            examples += [filler_example()] * (self.batch_size - len(indices))
            yield indices, batching.with_pixel_mask(batching.collate(examples, self._buckets, max_boxes=1, step=self._step))

    def _plan_batches(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Indices of the images of each batch (at most batch_size each)."""
        if not self.group_by_bucket:
            return [list(range(i, min(i + self.batch_size, len(sizes)))) for i in range(0, len(sizes), self.batch_size)]
        groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for i, (h, w) in enumerate(sizes):
            groups[batching.choose_bucket(self._buckets, int(h), int(w), self._step)[0]].append(i)
        return [idx[j : j + self.batch_size] for idx in groups.values() for j in range(0, len(idx), self.batch_size)]


def _image_example(image: np.ndarray, orig_size: tuple[int, int]) -> dict:
    """An example for `batching.collate`: a resized image without targets."""
    return {
        "image": image,
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int32),
        "image_id": -1,
        "orig_size": tuple(int(v) for v in orig_size),
        "is_real": True,
        "name": "",
        "skipped_files": (),
        "num_degenerate": 0,
    }


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[pathlib.Path], list[tuple[str, str]], int]:
    """The image files named by `inputs` (files, or folders: their files with an image
    extension, sorted, not recursive).

    Returns (files, problems [(path, reason)] for inputs that do not exist, number of files
    in folders skipped for their extension). A file named explicitly is always tried.
    """
    files, problems, ignored = [], [], 0
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in IMAGE_EXTENSIONS:
                    files.append(child)
                elif child.is_file():
                    ignored += 1
        elif path.exists():
            files.append(path)
        else:
            problems.append((str(path), "no such file or directory"))
    return files, problems, ignored
