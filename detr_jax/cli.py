"""The `detr-jax` command: train, eval, predict, convert.

Config overrides use ml_collections' flag syntax: `--config.model.num_queries=20`.
Values are parsed as Python literals when the key's current value is not a string
(`--config.data.train_scales="(96, 128)"`, `--config.model.pre_norm=true`).
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys

from detr_jax.config import ConfigError, load_config

DEFAULT_CONFIG = "synthetic_tiny"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def resolve_config_path(name_or_path: str) -> pathlib.Path:
    """A config file path, or the name of one in the repository's `configs/` folder."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (REPO_ROOT / "configs" / f"{path.stem}.py", pathlib.Path("configs") / f"{path.stem}.py"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name_or_path}: no such config file (nor configs/{path.stem}.py)")


def parse_value(text: str, current):
    """Parses an override string into the type of the value it replaces."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"cannot parse {text!r} as a Python literal") from e
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates `--config.a.b=value` (or `--config.a.b value`) from the other arguments."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg}: missing value")
                value = argv[i + 1]
                i += 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def apply_overrides(config, raw_overrides: dict[str, str], source: str):
    """Applies `--config.KEY=VALUE` strings, each parsed to the type of the value it replaces."""
    from detr_jax.config import set_by_path, validate

    if not raw_overrides:
        return config
    config.unlock()
    config.lock()
    for key, text in raw_overrides.items():
        node = config
        try:
            for part in key.split("."):
                node = node[part]
        except (KeyError, AttributeError, TypeError):
            node = None  # unknown: set_by_path names the key
        try:
            value = parse_value(text, node) if node is not None else text
        except ConfigError as e:
            raise ConfigError(f"--config.{key}: {e}") from e
        set_by_path(config, key, value, source=source)
    validate(config)
    return config


def config_from_args(config_arg: str, raw_overrides: dict[str, str]):
    """Loads a config file (path or name in configs/) and applies string overrides."""
    path = resolve_config_path(config_arg)
    return apply_overrides(load_config(path), raw_overrides, str(path))


def setup_logging(verbose: bool = False) -> None:
    """INFO for this package, WARNING for the libraries (orbax and absl are chatty)."""
    import logging

    from absl import logging as absl_logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("detr_jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)


def default_workdir(config_arg: str) -> str:
    return str(pathlib.Path("workdirs") / pathlib.Path(config_arg).stem)


def run_train(args, overrides) -> int:
    from detr_jax.train import TrainingError, distributed_init, train

    distributed_init(args.coordinator, args.num_processes, args.process_id, force=args.distributed)
    config = config_from_args(args.config, overrides)
    workdir = args.workdir or default_workdir(args.config)
    from detr_jax.evaluate import make_eval_fn

    eval_fn = make_eval_fn(config, workdir) if config.train.eval_every_epochs > 0 else None
    try:
        metrics = train(config, workdir, eval_fn=eval_fn, show_progress=not args.no_progress)
    except TrainingError as e:
        print(f"detr-jax train: {e}", file=sys.stderr)
        return 1
    import jax

    if jax.process_index() == 0:
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "eval_AP", "eval_AP50") if k in metrics)
        print(f"done: {summary}; metrics, checkpoints and loss_curve.png in {workdir}")
    return 0


def _checkpoint_config(args, overrides):
    """--config (with overrides), or None to use the checkpoint's own config (+ overrides)."""
    if args.config:
        return config_from_args(args.config, overrides)
    if not overrides:
        return None
    from detr_jax.inference import load_checkpoint

    _, config = load_checkpoint(args.checkpoint)
    return apply_overrides(config, overrides, str(args.checkpoint))


def run_eval(args, overrides) -> int:
    from detr_jax.evaluate import eval_main

    config = _checkpoint_config(args, overrides)
    out = args.out or str(pathlib.Path(args.checkpoint) / "eval")
    eval_main(config, args.checkpoint, out, max_batches=args.max_batches, dtype=args.dtype,
              save_detections=args.save_detections, progress=not args.no_progress)
    return 0


def run_predict(args, overrides) -> int:
    from detr_jax.inference import predict_main

    config = _checkpoint_config(args, overrides)
    return predict_main(args.checkpoint, args.inputs, args.out, config=config,
                        score_threshold=args.score_threshold, top_k=args.top_k, dtype=args.dtype,
                        batch_size=args.batch_size, draw=not args.no_draw, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-jax", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train", help="train (default: configs/synthetic_tiny.py); re-run on the same workdir to resume",
        epilog="Override any config key with --config.KEY=VALUE, e.g. --config.train.batch_size=16.")
    train.add_argument("--config", default=DEFAULT_CONFIG, help="config file or name in configs/")
    train.add_argument("--workdir", default=None, help="output directory (default: workdirs/<config name>)")
    train.add_argument("--distributed", action="store_true",
                       help="multi-process: jax.distributed.initialize() with auto-detection (TPU pods)")
    train.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
    train.add_argument("--num_processes", type=int, default=None, help="multi-process: number of processes")
    train.add_argument("--process_id", type=int, default=None, help="multi-process: this process's index")
    train.add_argument("--no_progress", action="store_true", help="no progress bar")
    evaluate = sub.add_parser(
        "eval", help="COCO box AP of a checkpoint (a training workdir or a converted checkpoint)")
    evaluate.add_argument("--checkpoint", required=True,
                          help="training workdir (newest checkpoint), a step folder, or a converted checkpoint")
    evaluate.add_argument("--config", default=None,
                          help="config file or name (default: the training run's own config)")
    evaluate.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval)")
    evaluate.add_argument("--max_batches", type=int, default=None, help="evaluate only this many batches")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype")
    evaluate.add_argument("--save_detections", action="store_true", help="also write COCO-format detections")
    evaluate.add_argument("--no_progress", action="store_true", help="no progress bar")

    predict = sub.add_parser("predict", help="detect objects in images; JSON and drawn PNG per image")
    predict.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    predict.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--config", default=None, help="config (default: the checkpoint's)")
    predict.add_argument("--score_threshold", type=float, default=0.5, help="keep detections scoring at least this")
    predict.add_argument("--top_k", type=int, default=100, help="keep at most this many detections per image")
    predict.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype")
    predict.add_argument("--batch_size", type=int, default=None, help="images per compiled batch")
    predict.add_argument("--no_draw", action="store_true", help="JSON only, no PNGs")
    predict.add_argument("--no_progress", action="store_true", help="no progress bar")

    convert = sub.add_parser("convert", help="convert a PyTorch DETR/ResNet checkpoint to Flax")
    convert.add_argument("src", help="PyTorch state dict (.pth/.pt/.bin) or .safetensors")
    convert.add_argument("dst", help="output checkpoint directory")
    convert.add_argument("--config", default=None,
                         help="config whose model the checkpoint must match (default: inferred)")
    convert.add_argument("--reinit_class_head", action="store_true",
                         help="re-initialize the class head when num_classes differs")
    return parser


def _typed_free_overrides(raw: dict[str, str]) -> dict:
    """Overrides without a config to type them against: Python literals, else strings."""
    out = {}
    for key, text in raw.items():
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a file, a checkpoint, a dataset), not a bug."""
    from detr_jax.checkpoint import CheckpointError as TrainCheckpointError
    from detr_jax.checkpoint_io import CheckpointError
    from detr_jax.data.records import DataError

    from detr_jax.convert import ConversionError

    return (CheckpointError, TrainCheckpointError, DataError, ConversionError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = ""
    try:
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        command = args.command or ""
        setup_logging(args.verbose)
        if args.command == "train":
            return run_train(args, overrides)
        if args.command == "eval":
            return run_eval(args, overrides)
        if args.command == "predict":
            return run_predict(args, overrides)
        if args.command == "convert":
            from detr_jax.convert import convert_main

            config = config_from_args(args.config, overrides) if args.config else None
            convert_main(args.src, args.dst, config=config, reinit_class_head=args.reinit_class_head,
                         overrides=None if args.config else _typed_free_overrides(overrides))
            return 0
        build_parser().print_help()
        return 2
    except ConfigError as e:
        print(f"detr-jax: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        if not isinstance(e, _user_errors()):
            raise  # a bug: keep the traceback
        # Bad input (a file, a checkpoint, a dataset): the message names it.
        print(f"detr-jax {command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
