"""The `detr-jax` command: train, eval, predict, convert, analyze, export.

Config overrides use ml_collections' flag syntax: `--config.model.num_queries=20`.
Values are parsed as Python literals when the key's current value is not a string
(`--config.data.train_scales="(96, 128)"`, `--config.model.pre_norm=true`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from absl import logging as absl_logging

from detr_jax.runtime import compilation_cache
from detr_jax.checkpoints.checkpointer import CheckpointError
from detr_jax.cli import analyze as analyze_command
from detr_jax.cli import convert as convert_command
from detr_jax.cli import eval as eval_command
from detr_jax.cli import export as export_command
from detr_jax.cli import predict as predict_command
from detr_jax.cli import train as train_command
from detr_jax.config import ConfigError
from detr_jax.convert import ConversionError
from detr_jax.data.records import DataError
from detr_jax.serving.export import ExportError
from detr_jax.runtime.workdir_lock import WorkdirInUse

log = logging.getLogger(__name__)

COMMANDS = {"train": train_command, "eval": eval_command, "predict": predict_command, "convert": convert_command,
            "analyze": analyze_command, "export": export_command}

# Exceptions that mean bad input (a file, a checkpoint, a dataset, a workdir in use), not a bug.
USER_ERRORS = (CheckpointError, DataError, ConversionError, ExportError, FileNotFoundError, WorkdirInUse)


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


def setup_logging(verbose: bool = False) -> None:
    """INFO for this package, WARNING for the libraries (orbax and absl are chatty)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("detr_jax").setLevel(logging.DEBUG if verbose else logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detr-jax", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--compilation_cache", default=None, metavar="DIR|off",
                        help=f"JAX's persistent compilation cache (default: ${compilation_cache.ENV_VAR}, else "
                             f"{compilation_cache.default_dir()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = ""
    try:
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        command = args.command or ""
        setup_logging(args.verbose)
        if args.command in COMMANDS:
            return _run_with_cache(COMMANDS[args.command], args, overrides)
        build_parser().print_help()
        return 2
    except ConfigError as e:
        print(f"detr-jax: config error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:  # bad input (a file, a checkpoint, a dataset): the message names it
        print(f"detr-jax {command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops gracefully on its own)
        print(f"detr-jax {command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _run_with_cache(command, args, overrides: dict[str, str]) -> int:
    """Runs a command with the persistent compilation cache on (unless "off"), and says
    how many programs it read from the cache and how many it compiled."""
    directory = compilation_cache.configure(args.compilation_cache)
    if directory is None:
        return command.run(args, overrides)
    counter = compilation_cache.CacheCounter()
    try:
        return command.run(args, overrides)
    finally:
        counter.close()
        log.info("compilation cache %s: %d program(s) read, %d compiled", directory, counter.hits, counter.misses)


if __name__ == "__main__":
    sys.exit(main())
