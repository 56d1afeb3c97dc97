"""Export a detector for serving where JAX is not: StableHLO, TF SavedModel, ONNX.

Every format holds the same function, the model with its weights followed by its class
convention's post-processing (`postprocess.postprocess`; DETR's keeps every query):

  inputs   image      uint8   [B, H, W, 3]  RGB pixels, padded bottom/right (the padding's
                                            values are ignored); normalized inside
           mask       bool    [B, H, W]     True = real pixel
           orig_size  int32   [B, 2]        (h, w) of each original image, in pixels
  outputs  scores     float32 [B, N]        class probability (DETR: each query's best
                                            class other than "no object", N = Q)
           labels     int32   [B, N]        that class's category id
           boxes      float32 [B, N, 4]     pixel (x0, y0, x1, y1) of the original image

B is symbolic ("dynamic") or fixed; H and W are fixed, or symbolic multiples of
`SIZE_MULTIPLE` where the model allows it (a ResNet does; a ViT's position embedding is
resized for one grid, so a ViT needs a fixed size). Thresholding, sorting and clipping to
the image (`postprocess.select_detections`) stay outside, on the caller's side, as does
the resize (`data.transforms.EvalResize`): both are a few lines of NumPy in any runtime.

Next to the artifact, `detr_export.json` describes it: the inputs and outputs with their
shapes (null = dynamic), the preprocessing, the class names and the model's config.
`ExportedDetector` runs an exported directory in its own runtime (jax.export,
tf.saved_model, onnxruntime) with clear errors for a bad request; the artifacts also load
without detr-jax (see the README).

The matcher's host callback is training-only: no export contains it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from detr_jax.config import config_from_dict
from detr_jax.ops.image_statistics import IMAGENET_MEAN, IMAGENET_STD, normalize
from detr_jax.criterion.class_convention import ClassConvention, SoftmaxNoObject
from detr_jax.models import build_class_convention, build_model
from detr_jax.ops.formulation import ONNXRUNTIME, formulated_for
from detr_jax.serving.quantize import QUANTIZATIONS, QuantizationError, calibration_feeds, quantize_onnx
from detr_jax.evaluation.postprocess import postprocess

log = logging.getLogger(__name__)

FORMATS = ("stablehlo", "savedmodel", "onnx")
ARTIFACTS = {"stablehlo": "model.stablehlo", "savedmodel": "saved_model", "onnx": "model.onnx"}
METADATA_FILE = "detr_export.json"
# 2: uint8 image input (normalized inside). Version 1 took normalized float32 images;
# ExportedDetector still runs those, normalizing uint8 requests on the host.
FORMAT_VERSION = 2
INPUT_NAMES = ("image", "mask", "orig_size")
OUTPUT_NAMES = ("scores", "labels", "boxes")
# A dynamic image size is a symbolic multiple of this: the ResNet's total stride, so every
# stage's size is an exact expression of it and the residual shapes provably agree.
SIZE_MULTIPLE = 32
ONNX_OPSET = 21

# onnxruntime's SessionOptions for an ONNX export, recorded in its detr_export.json
# ("onnxruntime") and applied by ExportedDetector; chosen for one inference call at a time on
# CPU (measured in docs/BENCHMARKS.md):
ONNXRUNTIME_SESSION_OPTIONS = {
    # ENABLE_ALL adds the layout optimizations to EXTENDED's fusions: the convolutions run in
    # the blocked channel layout (NCHWc) with the frozen BatchNorm, ReLU and residual add
    # fused in; EXTENDED keeps plain NCHW convolutions, slower.
    "graph_optimization_level": "ORT_ENABLE_ALL",
    # None: as many threads as the cores this process may run on (os.sched_getaffinity):
    # onnxruntime's own default counts the machine's physical cores, which oversubscribes a
    # process given fewer (taskset, a container's cpuset).
    "intra_op_num_threads": None,
    # The graph is a chain of large operators: parallel branches would only add threads.
    "execution_mode": "ORT_SEQUENTIAL",
    "inter_op_num_threads": 1,
    # Keep freed buffers for the next call (the arena) and plan them once per shape (the
    # memory pattern): as the jit path and the PyTorch peer keep theirs (host_memory.py).
    "enable_cpu_mem_arena": True,
    "enable_mem_pattern": True,
    # Idle worker threads sleep instead of spinning: spinning threads take the cores from
    # whatever else runs (another session, the host's data loading, other processes).
    "allow_spinning": False,
}


class ExportError(ValueError):
    """An export that cannot be made, an exported directory that cannot be read, or a bad
    request to an exported model. The message names the file or input and the problem."""


@dataclasses.dataclass(frozen=True)
class ExportShape:
    """The exported input shape: batch and (height, width), None where symbolic."""

    batch: int | None = None
    size: tuple[int, int] | None = None

    def input_shapes(self) -> dict[str, tuple]:
        """{input name: shape with None for a symbolic dimension}."""
        b = self.batch
        h, w = self.size if self.size else (None, None)
        return {"image": (b, h, w, 3), "mask": (b, h, w), "orig_size": (b, 2)}

    def polymorphic_specs(self) -> list[str]:
        """jax.export / jax2tf shape specs of the inputs ("b", "32*h", ...)."""
        b = "b" if self.batch is None else str(self.batch)
        h, w = (f"{SIZE_MULTIPLE}*h", f"{SIZE_MULTIPLE}*w") if self.size is None else map(str, self.size)
        return [f"{b}, {h}, {w}, 3", f"{b}, {h}, {w}", f"{b}, 2"]

    def abstract_inputs(self) -> list[jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs of the inputs, symbolic dimensions sharing one scope."""
        specs = self.polymorphic_specs()
        scope = jax.export.SymbolicScope()
        shapes = [jax.export.symbolic_shape(s, scope=scope) for s in specs]
        return [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in zip(shapes, (jnp.uint8, jnp.bool_, jnp.int32))]


def serving_function(model, variables: Mapping, classes: ClassConvention = SoftmaxNoObject()):
    """fn(image, mask, orig_size) -> (scores, labels, boxes): the model's last layer,
    post-processed as its class convention `classes` ranks detections, with `variables`
    closed over (so they become constants of the export)."""

    def serve(image, mask, orig_size):
        out = model.apply(variables, image, mask, train=False)
        result = postprocess(out["pred_logits"][-1], out["pred_boxes"][-1], orig_size, classes)
        return tuple(result[name] for name in OUTPUT_NAMES)

    return serve


def parse_batch(text: str | int | None) -> int | None:
    """"dynamic" / None -> None; a positive integer -> it."""
    if text is None or text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ExportError(f"batch {text!r}: expected a positive integer or 'dynamic'") from None
    if value < 1:
        raise ExportError(f"batch {value}: must be positive")
    return value


def parse_size(text: str | tuple | None) -> tuple[int, int] | None:
    """"dynamic" / None -> None; "HxW" or (H, W) -> (H, W)."""
    if text is None or text == "dynamic":
        return None
    if isinstance(text, str):
        parts = text.lower().split("x")
        try:
            text = tuple(int(p) for p in parts)
        except ValueError:
            raise ExportError(f"size {text!r}: expected HxW (e.g. 800x1216) or 'dynamic'") from None
    if len(text) != 2 or min(text) < 1:
        raise ExportError(f"size {text!r}: expected two positive sizes (height, width)")
    return int(text[0]), int(text[1])


def export_detector(
    config: ml_collections.ConfigDict,
    variables: Mapping,
    out_dir: str | os.PathLike,
    format: str,
    batch: int | str | None = None,
    size: tuple[int, int] | str | None = None,
    dtype: str | None = None,
    class_names: Mapping[int, str] | None = None,
    quantize: str | None = None,
    calibration_images: Sequence[np.ndarray] | None = None,
) -> pathlib.Path:
    """Writes the serving function of a detector to `out_dir` in `format`.

    Args:
      config: the model's config (its `model` and `data` evaluation resize are recorded).
      variables: {"params", "frozen_bn"}.
      out_dir: a new or empty directory.
      format: "stablehlo", "savedmodel" or "onnx".
      batch: an int, or None / "dynamic" for a symbolic batch size.
      size: (H, W) or "HxW", or None / "dynamic" for symbolic multiples of SIZE_MULTIPLE.
      dtype: compute dtype ("float32", "bfloat16"); default `config.model.dtype`. Inputs
        and outputs are float32 either way.
      quantize: None, or "int8" (ONNX only): the convolutions in int8, by onnxruntime's
        static quantization (`detr_jax.serving.quantize`); calibrated on
        `calibration_images` (uint8 [H, W, 3] arrays), default a few images of the built-in
        synthetic data.
    Returns the directory.
    """
    if format not in FORMATS:
        raise ExportError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    shape = ExportShape(parse_batch(batch), parse_size(size))
    out_dir = pathlib.Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: already exists and is not an empty directory")
    model = build_model(config.model, dtype)
    compute_dtype = jnp.dtype(model.dtype).name
    if format == "onnx" and shape.size is None:
        # jax2onnx (0.12.5, 0.13.0) fails on the symbolic multiples of SIZE_MULTIPLE (its
        # pad and slice converters expect plain symbols); a symbolic batch converts.
        raise ExportError("ONNX export needs a fixed image size (--size HxW, e.g. the largest bucket "
                          "your images are padded to); the batch can stay dynamic")
    if format == "onnx" and compute_dtype != "float32":
        raise ExportError(f"ONNX export is float32 only (asked for {compute_dtype}): onnxruntime's Conv "
                          "takes no bfloat16 input")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize {quantize!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if quantize is not None and format != "onnx":
        raise ExportError(f"--quantize {quantize} is for the onnx format (onnxruntime's quantization), "
                          f"not {format}")
    variables = jax.tree.map(np.asarray, dict(variables))
    classes = build_class_convention(config)
    fn = serving_function(model, variables, classes)
    detections = classes.num_detections(config.model.num_queries, config.model.num_classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifact = out_dir / ARTIFACTS[format]
    try:
        {"stablehlo": _write_stablehlo, "savedmodel": _write_savedmodel, "onnx": _write_onnx}[format](fn, shape, artifact)
        if quantize is not None:
            quantization = quantize_onnx(artifact, calibration_feeds(config, shape.size, shape.batch, calibration_images))
    except Exception as e:
        # Nothing half-written is left behind (the directory was new or empty).
        shutil.rmtree(out_dir, ignore_errors=True)
        if isinstance(e, QuantizationError):
            raise ExportError(f"{artifact}: int8 quantization: {e}") from e
        if not isinstance(e, ExportError) and shape.size is None and "shape" in str(e).lower():
            raise ExportError(f"this model cannot be exported with a dynamic image size ({type(e).__name__}: "
                              f"{str(e)[:300]}); pass a fixed size (--size HxW)") from e
        raise
    metadata = {
        "format": format,
        "format_version": FORMAT_VERSION,
        "artifact": artifact.name,
        "dtype": compute_dtype,
        "batch": shape.batch,
        "size": list(shape.size) if shape.size else None,
        "size_multiple": SIZE_MULTIPLE if shape.size is None else None,
        "inputs": {name: {"shape": list(s), "dtype": d} for (name, s), d in
                   zip(shape.input_shapes().items(), ("uint8", "bool", "int32"))},
        "outputs": {"scores": {"shape": [shape.batch, detections], "dtype": "float32"},
                    "labels": {"shape": [shape.batch, detections], "dtype": "int32"},
                    "boxes": {"shape": [shape.batch, detections, 4], "dtype": "float32"}},
        # Normalization happens inside the artifact; recorded for reference.
        "preprocess": {"pixel_scale": 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       "eval_scale": config.data.eval_scale, "eval_max_size": config.data.eval_max_size},
        "class_names": {str(k): v for k, v in (class_names or {}).items()},
        "config": config.to_dict(),
        "versions": _versions(format),
    }
    if format == "onnx":
        metadata["onnxruntime"] = {"session_options": dict(ONNXRUNTIME_SESSION_OPTIONS)}
        metadata["formulated_for"] = ONNXRUNTIME
        if quantize is not None:
            metadata["quantization"] = quantization
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=_json_default) + "\n")
    return out_dir


def _json_default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _versions(format: str) -> dict:
    import importlib.metadata as md

    packages = {"stablehlo": ("jax", "jaxlib"), "savedmodel": ("jax", "tensorflow-cpu", "tensorflow"),
                "onnx": ("jax", "jax2onnx", "onnx", "onnxruntime")}[format]
    out = {}
    for package in packages:
        with contextlib.suppress(md.PackageNotFoundError):
            out[package] = md.version(package)
    return out


def _write_stablehlo(fn, shape: ExportShape, artifact: pathlib.Path) -> None:
    exported = jax.export.export(jax.jit(fn))(*shape.abstract_inputs())
    artifact.write_bytes(exported.serialize())


@contextlib.contextmanager
def _stablehlo_tensorflow_reads():
    """jax.export serializes StableHLO for consumers at most 4 weeks older than JAX
    (StableHLO 1.15 with JAX 0.10); TensorFlow's XlaCallModule lags further (TF 2.21 reads
    1.13.7) and cannot deserialize newer encodings, such as the composite_v2 that
    `lax.top_k` (chlo.top_k) becomes: the sigmoid class convention's post-processing and
    Deformable DETR's two-stage proposals. Within this context jax.export targets 12 weeks'
    compatibility instead (1.13.7), which serializes those ops in encodings TF reads.
    jax.export has no public option for it, hence the patch of its version lookup."""
    from jax._src.export import _export

    hlo = _export.hlo
    lookup = hlo.get_version_from_compatibility_requirement
    older = hlo.StablehloCompatibilityRequirement.WEEK_12
    hlo.get_version_from_compatibility_requirement = lambda requirement: lookup(older)
    try:
        yield
    finally:
        hlo.get_version_from_compatibility_requirement = lookup


def _write_savedmodel(fn, shape: ExportShape, artifact: pathlib.Path) -> None:
    with _stablehlo_tensorflow_reads():
        _save_savedmodel(fn, shape, artifact)


def _save_savedmodel(fn, shape: ExportShape, artifact: pathlib.Path) -> None:
    tf = _import_optional("tensorflow", "savedmodel", "tfds")
    from jax.experimental import jax2tf

    tf_fn = jax2tf.convert(fn, polymorphic_shapes=shape.polymorphic_specs(), with_gradient=False)
    signature = [tf.TensorSpec(s, d, name=n) for n, s, d in
                 zip(INPUT_NAMES, shape.input_shapes().values(), (tf.uint8, tf.bool, tf.int32))]

    @tf.function(input_signature=signature, autograph=False)
    def serving_default(image, mask, orig_size):
        return dict(zip(OUTPUT_NAMES, tf_fn(image, mask, orig_size)))

    module = tf.Module()
    module.serving_default = serving_default
    tf.saved_model.save(module, str(artifact), signatures={"serving_default": serving_default})


def _write_onnx(fn, shape: ExportShape, artifact: pathlib.Path) -> None:
    # jax2onnx 0.12 logs a traceback for each of its dm_pix converters that fail to import
    # with this JAX; DETR uses none of them.
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
    jax2onnx = _import_optional("jax2onnx", "onnx", "export")
    # jax2onnx prints its traces of flax modules to stdout.
    with contextlib.redirect_stdout(io.StringIO()), formulated_for(ONNXRUNTIME):
        jax2onnx.to_onnx(fn, shape.abstract_inputs(), model_name="detr", opset=ONNX_OPSET, return_mode="file",
                         output_path=str(artifact), input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES))


def _import_optional(module: str, format: str, extra: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ExportError(f"the {format} format needs {module} ({e}); install it with "
                          f"pip install 'detr-jax[{extra}]'") from e


# ----------------------------------------------------------------------------------------
# Running an export


class ExportedDetector:
    """An exported directory, run in its own runtime: jax.export (stablehlo),
    tf.saved_model (savedmodel) or onnxruntime (onnx).

    `detector(image, mask, orig_size)` -> {"scores", "labels", "boxes"} numpy arrays, with
    the shapes of the module docstring; inputs are checked first (rank, dtype, fixed or
    multiple-of sizes), and a bad one is an ExportError naming the input and the problem.
    `metadata` is the parsed detr_export.json; `config` the model's config.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = pathlib.Path(path).absolute()
        self.metadata = read_metadata(self.path)
        self.format = self.metadata["format"]
        artifact = self.path / self.metadata["artifact"]
        if not artifact.exists():
            raise ExportError(f"{artifact}: missing (the export in {self.path} is incomplete)")
        load = {"stablehlo": _load_stablehlo, "savedmodel": _load_savedmodel, "onnx": _load_onnx}[self.format]
        try:
            self._run = load(artifact, threads, self.metadata)
        except ExportError:
            raise
        except Exception as e:  # a damaged or foreign file: the runtime's own error, named
            raise ExportError(f"{artifact}: unreadable as {self.format} ({type(e).__name__}: {str(e)[:300]})") from e

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The model's config, as exported (a new copy each time)."""
        return config_from_dict(self.metadata["config"], source=str(self.path / METADATA_FILE))

    @property
    def class_names(self) -> dict[int, str]:
        return {int(k): v for k, v in self.metadata["class_names"].items()}

    def check_inputs(self, image, mask, orig_size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The inputs as the artifact wants them, or an ExportError naming what is wrong."""
        given = {"image": np.asarray(image), "mask": np.asarray(mask), "orig_size": np.asarray(orig_size)}
        where = f"{self.path.name} ({self.format})"
        if given["orig_size"].dtype.kind in "iu":  # any integer is fine: sizes are small
            given["orig_size"] = given["orig_size"].astype(np.int32)
        if given["image"].dtype == np.uint8 and self.metadata["inputs"]["image"]["dtype"] == "float32":
            given["image"] = normalize(given["image"])  # a version-1 export takes normalized images
        hints = {"image": " (RGB pixels, 0..255)",
                 "mask": " (True = real pixel)", "orig_size": ""}
        dims: dict[str, int] = {}
        for name, spec in self.metadata["inputs"].items():
            array, expected = given[name], spec["shape"]
            if array.dtype != np.dtype(spec["dtype"]):
                raise ExportError(f"{where}: input {name} has dtype {array.dtype}, expected {spec['dtype']}{hints[name]}")
            if array.ndim != len(expected):
                raise ExportError(f"{where}: input {name} has shape {array.shape}, expected rank {len(expected)} "
                                  f"{_shape_text(expected)}")
            for axis, (size, want) in enumerate(zip(array.shape, expected)):
                if want is not None and size != want:
                    raise ExportError(f"{where}: input {name} has shape {array.shape}, expected {_shape_text(expected)}")
                key = _AXES[name][axis]
                if key and dims.setdefault(key, size) != size:
                    raise ExportError(f"{where}: inputs disagree on the {'batch' if key == 'b' else 'image'} size: "
                                      f"{name} has shape {array.shape}")
        multiple = self.metadata["size_multiple"]
        if multiple and (dims["h"] % multiple or dims["w"] % multiple or not dims["h"] or not dims["w"]):
            raise ExportError(f"{where}: image size {dims['h']}x{dims['w']} is not a multiple of {multiple} "
                              "(pad images bottom/right, with the mask False there)")
        if dims["b"] == 0:
            raise ExportError(f"{where}: empty batch")
        return given["image"], given["mask"], given["orig_size"]

    def __call__(self, image, mask, orig_size) -> dict[str, np.ndarray]:
        outputs = self._run(*self.check_inputs(image, mask, orig_size))
        return {name: np.asarray(value) for name, value in zip(OUTPUT_NAMES, outputs)}


_AXES = {"image": ("b", "h", "w", None), "mask": ("b", "h", "w"), "orig_size": ("b", None)}


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"


def read_metadata(path: str | os.PathLike) -> dict:
    """The detr_export.json of an exported directory."""
    path = pathlib.Path(path).absolute()
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise ExportError(f"{path}: not a detr-jax export (no {METADATA_FILE}; make one with `detr-jax export`)")
    try:
        metadata = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta_file}: unreadable ({e})") from e
    if metadata.get("format") not in FORMATS:
        raise ExportError(f"{meta_file}: unknown format {metadata.get('format')!r}")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{meta_file}: format version {metadata['format_version']} is newer than this detr-jax reads")
    return metadata


def is_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an exported directory."""
    return (pathlib.Path(path) / METADATA_FILE).is_file()


def _load_stablehlo(artifact: pathlib.Path, threads: int | None, metadata: dict):
    exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
    return jax.jit(exported.call)


def _load_savedmodel(artifact: pathlib.Path, threads: int | None, metadata: dict):
    tf = _import_optional("tensorflow", "savedmodel", "tfds")
    if threads:
        with contextlib.suppress(RuntimeError):  # only before TF's first op
            tf.config.threading.set_intra_op_parallelism_threads(threads)
    serve = tf.saved_model.load(str(artifact)).signatures["serving_default"]

    def run(image, mask, orig_size):
        out = serve(image=tf.constant(image), mask=tf.constant(mask), orig_size=tf.constant(orig_size))
        return tuple(out[name].numpy() for name in OUTPUT_NAMES)

    return run


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), or the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def onnxruntime_session_options(recorded: Mapping | None = None, threads: int | None = None):
    """onnxruntime.SessionOptions from `recorded` (an export's "session_options"; default
    ONNXRUNTIME_SESSION_OPTIONS), with `threads` intra-op threads if given, else the
    recorded number, else `available_cores()`."""
    ort = _import_optional("onnxruntime", "onnx", "export")
    settings = {**ONNXRUNTIME_SESSION_OPTIONS, **(recorded or {})}
    options = ort.SessionOptions()
    options.log_severity_level = 3  # converter leftovers (unused initializers) are warnings
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["graph_optimization_level"])
    options.execution_mode = getattr(ort.ExecutionMode, settings["execution_mode"])
    options.intra_op_num_threads = int(threads or settings["intra_op_num_threads"] or available_cores())
    options.inter_op_num_threads = int(settings["inter_op_num_threads"])
    options.enable_cpu_mem_arena = bool(settings["enable_cpu_mem_arena"])
    options.enable_mem_pattern = bool(settings["enable_mem_pattern"])
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings["allow_spinning"] else "0")
    return options


def _load_onnx(artifact: pathlib.Path, threads: int | None, metadata: dict):
    ort = _import_optional("onnxruntime", "onnx", "export")
    # Exports before the options were recorded run with today's.
    options = onnxruntime_session_options(metadata.get("onnxruntime", {}).get("session_options"), threads)
    session = ort.InferenceSession(str(artifact), options, providers=ort.get_available_providers())

    def run(image, mask, orig_size):
        return session.run(list(OUTPUT_NAMES), {"image": image, "mask": mask, "orig_size": orig_size})

    return run
