"""`detr-jax export`: a checkpoint -> a servable StableHLO, TF SavedModel or ONNX model
(`detr_jax.serving.export.export_detector`)."""

from __future__ import annotations

from detr_jax.cli.common import DTYPE_CHOICES, checkpoint_command_config
from detr_jax.serving.export import FORMATS, ExportError, export_detector, parse_batch, parse_size, read_metadata
from detr_jax.serving.predictor import category_names_for, find_images, load_image
from detr_jax.serving.quantize import QUANTIZATIONS
from detr_jax.checkpoints.restore import load_checkpoint


def add_parser(sub) -> None:
    parser = sub.add_parser("export", help="export a checkpoint for serving: StableHLO, TF SavedModel or ONNX")
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--config", default=None, help="config (default: the checkpoint's)")
    parser.add_argument("--batch", default="dynamic", help="images per call: N, or 'dynamic' (default)")
    parser.add_argument("--size", default="dynamic",
                        help="padded image size HxW, or 'dynamic' (multiples of 32; stablehlo and savedmodel)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="compute dtype")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help="onnx only: int8 convolutions (onnxruntime's static quantization), calibrated on "
                             "--calibration_images")
    parser.add_argument("--calibration_images", nargs="+", default=None, metavar="IMAGE_OR_FOLDER",
                        help="images to calibrate --quantize on (default: a few of the built-in synthetic data)")


def run(args, overrides: dict[str, str]) -> int:
    batch, size = parse_batch(args.batch), parse_size(args.size)  # bad values fail before loading anything
    if args.calibration_images and not args.quantize:
        raise ExportError("--calibration_images calibrate --quantize int8; without it nothing is calibrated")
    calibration = calibration_images(args.calibration_images) if args.calibration_images else None
    config, overrides = checkpoint_command_config(args, overrides)
    variables, config = load_checkpoint(args.checkpoint, config, overrides)
    out = export_detector(config, variables, args.out, args.format, batch=batch, size=size, dtype=args.dtype,
                          class_names=category_names_for(config), quantize=args.quantize,
                          calibration_images=calibration)
    meta = read_metadata(out)
    shapes = ", ".join(f"{name} [{', '.join('?' if d is None else str(d) for d in spec['shape'])}] {spec['dtype']}"
                       for name, spec in meta["inputs"].items())
    kind = meta["dtype"] + (f", {meta['quantization']['type']} convolutions" if "quantization" in meta else "")
    print(f"exported {args.format} ({kind}) to {out / meta['artifact']}: inputs {shapes}")
    return 0


def calibration_images(inputs: list[str]) -> list:
    """The images of `inputs` (files and folders), decoded; an ExportError names a missing
    path or an unreadable file."""
    files, problems, _ = find_images(inputs)
    if problems:
        raise ExportError("calibration images: " + "; ".join(f"{path}: {why}" for path, why in problems))
    if not files:
        raise ExportError(f"calibration images: no image files in {', '.join(inputs)}")
    return [load_image(path) for path in files]
