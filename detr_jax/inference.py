"""Inference: a jit-compiled batch `Predictor` on images of any size, and `detr-jax predict`.

Images go through the evaluation transform of the data pipeline (shorter side
`data.eval_scale`, longer at most `data.eval_max_size`), are normalized and padded into the
pipeline's bucket shapes (`batching.collate`), and the batch is padded to a fixed size with
filler images. So the model is compiled once per bucket shape (and compute dtype), never
per image size: `Predictor.num_compilations` counts the compiled programs.

Outputs are `evaluate.Detections`: boxes in pixel (x0, y0, x1, y1) of the ORIGINAL image
(clipped to it), scores, category ids and names, best first.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from detr_jax import checkpoint_io
from detr_jax.checkpoint import is_train_checkpoint, load_train_checkpoint
from detr_jax.config import base_config, config_from_dict, validate
from detr_jax.data import batching
from detr_jax.data.coco_categories import COCO_CATEGORIES, COCO_NUM_CLASSES
from detr_jax.data.images import decode_image
from detr_jax.data.pipeline import buckets_for
from detr_jax.data.records import ImageLoadError
from detr_jax.data.synthetic import SHAPE_NAMES
from detr_jax.data.transforms import EvalResize
from detr_jax.evaluate import Detections, postprocess, select_detections
from detr_jax.models.detr import DETR, DTYPES, init_variables

log = logging.getLogger(__name__)

ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Model config fields that may differ between a checkpoint and the config it is used with.
_FREE_MODEL_FIELDS = ("dtype", "dropout")
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip
_FILLER_SIZE = 32


# ----------------------------------------------------------------------------------------
# Checkpoints and models


def load_checkpoint(path: str | os.PathLike, config: ml_collections.ConfigDict | None = None):
    """Variables of a params checkpoint directory and the config to use them with.

    Args:
      path: a directory written by `checkpoint_io.save_variables` (`detr-jax convert`).
      config: the config to run with; its `model` section must agree with the checkpoint's
        metadata (compute dtype and dropout may differ). None: the default config with the
        checkpoint's model (COCO-size evaluation resize).

    Returns:
      (variables {"params", "frozen_bn"} as numpy, config).

    Raises:
      checkpoint_io.CheckpointError: not a checkpoint, only a backbone, or the variables do
        not fit the model (every problem listed).
    """
    path = pathlib.Path(path)
    if is_train_checkpoint(path):
        variables, saved_config, step = load_train_checkpoint(path)
        if config is None:
            config = config_from_dict(saved_config, source=str(path))
        else:
            saved_model = saved_config.get("model", {})
            _check_model_matches(path, saved_model, config)
        check_variables_fit(build_model(config), variables, str(path))
        log.info("loaded training checkpoint %s (step %d)", path, step)
        return variables, config
    metadata = checkpoint_io.load_metadata(path)
    contents = metadata.get("contents", "detr")
    if contents != "detr":
        raise checkpoint_io.CheckpointError(
            f"{path}: holds only a {contents} (no transformer or heads), so it cannot detect "
            "objects; it is meant for train.init_from"
        )
    saved_model = metadata.get("model", {})
    if config is None:
        config = base_config()
        for key, value in saved_model.items():
            if key in config.model:
                config.model[key] = value
        validate(config)
    else:
        _check_model_matches(path, saved_model, config)
    variables = checkpoint_io.load_variables(path)
    check_variables_fit(build_model(config), variables, str(path))
    return variables, config


def _check_model_matches(path, saved_model: dict, config: ml_collections.ConfigDict) -> None:
    mismatches = [
        f"  model.{key}: checkpoint has {value!r}, config has {config.model[key]!r}"
        for key, value in saved_model.items()
        if key in config.model and key not in _FREE_MODEL_FIELDS and config.model[key] != value
    ]
    if mismatches:
        raise checkpoint_io.CheckpointError(f"{path}: the checkpoint's model differs from the config:\n" + "\n".join(mismatches))


def build_model(config: ml_collections.ConfigDict, dtype: str | Any | None = None) -> DETR:
    """DETR of `config.model`, with compute dtype `dtype` ("float32", "bfloat16", a jnp
    dtype) instead of `model.dtype` when given. Parameters stay float32 either way."""
    model = DETR.from_config(config.model)
    if dtype is None:
        return model
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return model.clone(dtype=jnp.dtype(dtype))


def _flat_shapes(tree: Mapping, prefix: str = "") -> dict[str, tuple[int, ...]]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat_shapes(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = tuple(np.shape(value))
    return flat


def check_variables_fit(model: DETR, variables: Mapping, source: str = "variables") -> None:
    """Raises CheckpointError unless `variables` has exactly the model's leaves and shapes."""
    expected = _flat_shapes(jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0)))
    got = _flat_shapes(variables)
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    mismatched = sorted(f"{k}: {got[k]} given, {expected[k]} in the model" for k in set(got) & set(expected)
                        if got[k] != expected[k])
    if missing or unknown or mismatched:
        lines = [f"{source}: does not fit the model"]
        for title, items in (("missing", missing), ("not in the model", unknown), ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {item}" for item in items[:20]] + (["    ..."] if len(items) > 20 else [])
        raise checkpoint_io.CheckpointError("\n".join(lines))


def category_names_for(config: ml_collections.ConfigDict) -> dict[int, str]:
    """{category id: name} for the classes of `config` (COCO, synthetic shapes, or the
    categories of a COCO-folder eval annotation file); {} when unknown."""
    if config.model.num_classes == COCO_NUM_CLASSES:
        return dict(COCO_CATEGORIES)
    if config.data.dataset == "synthetic" and config.model.num_classes == max(SHAPE_NAMES) + 1:
        return dict(SHAPE_NAMES)
    if config.data.dataset == "coco_folder":
        from detr_jax.data import make_source  # pylint: disable=import-outside-toplevel

        try:
            return dict(make_source(config.data, "eval").category_names)
        except Exception as e:  # names are a convenience: fall back to "class {id}"
            log.warning("no category names (%s); labels will be shown as ids", e)
    return {}


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
        `load_checkpoint` or a training state.
      dtype: compute dtype override ("float32", "bfloat16"); default `config.model.dtype`.
      batch_size: images per compiled call (shorter batches are padded with fillers).
      class_names: {category id: name}; default `category_names_for(config)`.
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
        group_by_bucket: bool = True,
    ):
        self.config = config
        self.model = build_model(config, dtype)
        self.dtype = jnp.dtype(self.model.dtype).name
        self.batch_size = int(batch_size or config.eval.batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        self.class_names = dict(class_names) if class_names is not None else category_names_for(config)
        self.group_by_bucket = group_by_bucket
        self._buckets = buckets_for(config.data)
        self._step = int(config.data.bucket_step)
        self._resize = EvalResize(config.data.eval_scale, config.data.eval_max_size)
        self._variables = jax.device_put(dict(variables))
        self._forward = jax.jit(self._forward_batch)
        self._executables: dict[tuple, Any] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
                        **kwargs) -> "Predictor":
        """A Predictor of a params checkpoint directory (see `load_checkpoint`)."""
        variables, config = load_checkpoint(checkpoint, config)
        return cls(config, variables, **kwargs)

    @property
    def num_compilations(self) -> int:
        """Programs compiled so far: one per (bucket shape, dtype) seen."""
        return len(self._executables)

    @property
    def compiled_shapes(self) -> list[tuple[int, int]]:
        """The padded (H, W) bucket shapes compiled so far."""
        return [key[0] for key in self._executables]

    def _forward_batch(self, variables, image, mask, orig_size):
        out = self.model.apply(variables, image, mask, train=False)
        return postprocess(out["pred_logits"][-1], out["pred_boxes"][-1], orig_size)

    def _executable(self, shape: tuple[int, int]):
        key = (tuple(shape), self.dtype)
        if key not in self._executables:
            b, (h, w) = self.batch_size, shape
            specs = (
                jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
                jax.ShapeDtypeStruct((b, h, w), jnp.bool_),
                jax.ShapeDtypeStruct((b, 2), jnp.int32),
            )
            # Compiled ahead of time: calling it with another shape raises instead of
            # silently compiling again.
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
        raw = self.predict_queries(arrays)
        return [
            select_detections(r["scores"], r["labels"], r["boxes"], a.shape[:2], score_threshold, top_k, self.class_names)
            for r, a in zip(raw, arrays)
        ]

    def predict_one(self, image: ImageLike, score_threshold: float = 0.5, top_k: int | None = 100) -> Detections:
        return self.predict([image], score_threshold, top_k)[0]

    def predict_queries(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Every query of each image, in query order, unfiltered and unclipped.

        Args:
          images: uint8 [H, W, 3] arrays.
        Returns per image: scores float32 [Q], labels int32 [Q], boxes float32 [Q, 4]
        pixel xyxy of the original image.
        """
        resized = [self._resize(image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int32))[0] for image in images]
        results: list[dict | None] = [None] * len(images)
        for indices in self._plan_batches([r.shape[:2] for r in resized]):
            examples = [_example(resized[i], images[i].shape[:2]) for i in indices]
            examples += [_example(np.zeros((_FILLER_SIZE, _FILLER_SIZE, 3), np.uint8), (1, 1))] * (
                self.batch_size - len(indices))
            batch = batching.collate(examples, self._buckets, max_boxes=1, step=self._step)
            shape = batch["image"].shape[1:3]
            outputs = self._executable(shape)(self._variables, batch["image"], batch["mask"], batch["orig_size"])
            outputs = {k: np.asarray(v) for k, v in outputs.items()}
            for row, i in enumerate(indices):
                results[i] = {k: v[row] for k, v in outputs.items()}
        return results

    def _plan_batches(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Indices of the images of each batch (at most batch_size each)."""
        if not self.group_by_bucket:
            return [list(range(i, min(i + self.batch_size, len(sizes)))) for i in range(0, len(sizes), self.batch_size)]
        groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for i, (h, w) in enumerate(sizes):
            groups[batching.choose_bucket(self._buckets, int(h), int(w), self._step)[0]].append(i)
        return [idx[j : j + self.batch_size] for idx in groups.values() for j in range(0, len(idx), self.batch_size)]


def _example(image: np.ndarray, orig_size: tuple[int, int]) -> dict:
    """An example for `batching.collate`: a resized image without targets."""
    return {
        "image": image,
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int32),
        "image_id": -1,
        "orig_size": tuple(int(v) for v in orig_size),
        "is_real": True,
        "num_skipped": 0,
        "num_degenerate": 0,
    }


# ----------------------------------------------------------------------------------------
# `detr-jax predict`


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


def _unique_stem(path: pathlib.Path, used: set[str]) -> str:
    stem = path.stem or "image"
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def predict_main(
    checkpoint: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: ml_collections.ConfigDict | None = None,
    score_threshold: float = 0.5,
    top_k: int | None = 100,
    dtype: str | None = None,
    batch_size: int | None = None,
    draw: bool = True,
    progress: bool = True,
) -> int:
    """`detr-jax predict --checkpoint CKPT IMAGES_OR_FOLDERS... --out DIR`.

    Writes to `out_dir`, per readable image `<stem>.json` ({"file", "height", "width",
    "detections": [{"label", "name", "score", "box_xyxy"}]}, pixel xyxy of the image as
    viewed) and `<stem>.png` (the detections drawn; skipped when not `draw`), and
    `detections.json` with every image plus the failures. An unreadable image is reported
    (file and problem) and skipped; the others go on.

    Returns the exit status: 0 if at least one image was processed, 1 if none was (all
    failed, or no image found).
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files, failures, ignored = find_images(inputs)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_checkpoint(checkpoint, config, dtype=dtype, batch_size=batch_size)
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    records, used_stems = [], set()
    chunk_size = 4 * predictor.batch_size  # images held in memory at once
    with tqdm(total=len(files), unit="image", desc="predict", disable=not progress or len(files) <= 1) as bar:
        for start in range(0, len(files), chunk_size):
            chunk = files[start : start + chunk_size]
            loaded = []
            for path in chunk:
                try:
                    loaded.append((path, load_image(path)))
                except ImageLoadError as e:
                    failures.append((str(path), e.reason))
                    bar.write(f"skipping {path}: {e.reason}", file=sys.stderr)
            detections = predictor.predict([a for _, a in loaded], score_threshold, top_k)
            for (path, array), dets in zip(loaded, detections):
                stem = _unique_stem(path, used_stems)
                record = {"file": str(path), **dets.to_json()}
                (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
                record["json"] = f"{stem}.json"
                if draw:
                    from detr_jax import visualize  # pylint: disable=import-outside-toplevel

                    visualize.draw_detections(array, dets.boxes, dets.labels, dets.scores, predictor.class_names).save(
                        out_dir / f"{stem}.png")
                    record["png"] = f"{stem}.png"
                records.append(record)
            bar.update(len(chunk))

    summary = {
        "checkpoint": str(checkpoint),
        "score_threshold": score_threshold,
        "top_k": top_k,
        "dtype": predictor.dtype,
        "images": records,
        "failed": [{"file": f, "error": reason} for f, reason in failures],
    }
    (out_dir / "detections.json").write_text(json.dumps(summary, indent=2) + "\n")
    num_dets = sum(len(r["detections"]) for r in records)
    print(f"predicted {len(records)} image(s), {num_dets} detection(s) with score >= {score_threshold}; "
          f"results in {out_dir}")
    if ignored:
        print(f"ignored {ignored} file(s) without an image extension ({', '.join(IMAGE_EXTENSIONS)})")
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for f, reason in failures:
            print(f"  {f}: {reason}", file=sys.stderr)
    if not records:
        print("error: no image could be processed" if files or failures else "error: no images found", file=sys.stderr)
        return 1
    return 0
