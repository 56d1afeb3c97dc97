"""int8 ONNX exports: onnxruntime's static quantization of a float32 export's convolutions.

`quantize_onnx(artifact, feeds)` rewrites an exported model.onnx in place:

1. onnxruntime's basic graph optimizations (`quant_pre_process`: constant folding, the
   frozen BatchNorm folded into the convolution before it), so that a convolution and its
   norm become one operator to quantize;
2. static quantization in the QDQ format: QuantizeLinear / DequantizeLinear pairs (standard
   ONNX) around each convolution, weights int8 per output channel, activations uint8 per
   tensor with ranges (MinMax) from running the float32 model on the calibration `feeds`.
   onnxruntime fuses each DequantizeLinear -> Conv -> QuantizeLinear into one int8
   QLinearConv when it loads the model.

Only the convolutions (the ResNet, DETR's input projection) are quantized, the op types in
`QUANTIZED_OPS`: they are most of the CPU time of a float32 DETR-R50 in onnxruntime (profiled in
docs/BENCHMARKS.md 2026-12-07); the transformer's matrix products, LayerNorms and
softmaxes stay float32. The result is an approximation of the float32 model, not equal to it
within the float exports' 1e-4: its AP cost is measured, not bounded.

`calibration_feeds` makes the feeds: images resized as the evaluation does (and shrunk to
fit the export's fixed size), padded bottom/right with their mask, as `Predictor.batches`
gives them. Without images of the user's own, a few images of the built-in synthetic data.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import tempfile
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from detr_jax.data.synthetic import SyntheticShapesSource
from detr_jax.data.transforms import EvalResize, resize, resized_size

log = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
QUANTIZED_OPS = ("Conv",)
# Calibration images when the caller gives none (the built-in synthetic data).
DEFAULT_CALIBRATION_IMAGES = 8


class QuantizationError(ValueError):
    """A quantization that cannot be made; the message names the file or input and the problem."""


def synthetic_calibration_images(config: ml_collections.ConfigDict, count: int = DEFAULT_CALIBRATION_IMAGES
                                 ) -> list[np.ndarray]:
    """`count` images of the built-in synthetic data (a split of their own, not the training
    or evaluation images), at the config's synthetic image sizes where it trains on them."""
    kwargs = {}
    if config.data.dataset == "synthetic":
        kwargs = {"image_size": tuple(config.data.synthetic_image_size), "stuff": bool(config.data.synthetic_stuff)}
    source = SyntheticShapesSource(count, seed=0, split="calibration", **kwargs)
    return [source[i].image for i in range(count)]


def calibration_feeds(config: ml_collections.ConfigDict, size: tuple[int, int] | None, batch: int | None,
                      images: Sequence[np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
    """The export's inputs ({"image", "mask", "orig_size"}) for each calibration batch.

    Each image (uint8 [H, W, 3]) is resized as the evaluation resizes it
    (`data.eval_scale`, `data.eval_max_size`), shrunk further where it would not fit `size`,
    and padded bottom/right to `size` with the mask False there. `batch` images per feed
    (None: 1; the last feed is filled with copies of its images).
    """
    if size is None:
        raise QuantizationError("int8 quantization needs a fixed image size (--size HxW)")
    if images is None:
        images = synthetic_calibration_images(config)
    if not len(images):
        raise QuantizationError("no calibration images")
    height, width = size
    evaluation = EvalResize(config.data.eval_scale, config.data.eval_max_size)
    rows = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or not min(image.shape[:2]):
            raise QuantizationError(f"calibration image {i} has dtype {image.dtype} and shape {image.shape}, "
                                    "expected uint8 [H, W, 3] RGB pixels")
        h, w = image.shape[:2]
        resized = evaluation(image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int32))[0]
        rh, rw = resized.shape[:2]
        if rh > height or rw > width:  # shrink to fit, keeping the aspect ratio
            scale = min(height / rh, width / rw)
            fit = resized_size(rh, rw, max(1, int(min(rh, rw) * scale)), max(height, width))
            resized = resize(resized, np.zeros((0, 4), np.float32), (min(fit[0], height), min(fit[1], width)))[0]
            rh, rw = resized.shape[:2]
        padded = np.zeros((height, width, 3), np.uint8)
        padded[:rh, :rw] = resized
        mask = np.zeros((height, width), bool)
        mask[:rh, :rw] = True
        rows.append((padded, mask, np.array([h, w], np.int32)))
    per_feed = batch or 1
    feeds = []
    for start in range(0, len(rows), per_feed):
        chunk = rows[start:start + per_feed]
        chunk += [chunk[j % len(chunk)] for j in range(per_feed - len(chunk))]
        feeds.append({"image": np.stack([r[0] for r in chunk]), "mask": np.stack([r[1] for r in chunk]),
                      "orig_size": np.stack([r[2] for r in chunk])})
    return feeds


def quantize_onnx(artifact: pathlib.Path, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Rewrites the float32 ONNX model at `artifact` (and its external data file, if any) as
    an int8 QDQ model calibrated on `feeds`; returns what to record in the export's
    metadata ("quantization")."""
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise QuantizationError(f"int8 quantization needs onnx and onnxruntime ({e}); install them with "
                                "pip install 'detr-jax[export]'") from e

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self._items = iter(feeds)

        def get_next(self):
            return next(self._items, None)

    artifact = pathlib.Path(artifact)
    with tempfile.TemporaryDirectory(prefix="detr_jax_quantize_") as tmp:
        single = pathlib.Path(tmp) / "float32.onnx"
        prepared = pathlib.Path(tmp) / "prepared.onnx"
        quantized = pathlib.Path(tmp) / "quantized.onnx"
        # One file with the weights inside (jax2onnx writes them beside the graph, where
        # quant_pre_process's copies would not find them).
        onnx.save(onnx.load(str(artifact)), str(single))
        # The quantization tools print their progress; our caller reports what was done.
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(single), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(quantized), Feeds(), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                calibration_providers=["CPUExecutionProvider"],
            )
        model = onnx.load(str(quantized))
    # One self-contained file (DETR-R50 with int8 convolutions: ~95 MB, far below protobuf's
    # 2 GB limit).
    for stale in (artifact, artifact.with_name(artifact.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save(model, str(artifact))
    return {
        "type": "int8",
        "method": "onnxruntime static quantization, QDQ format",
        "quantized_ops": list(QUANTIZED_OPS),
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor, MinMax calibration",
        "calibration_batches": len(feeds),
        "calibration_images": int(sum(len(f["image"]) for f in feeds)),
    }
