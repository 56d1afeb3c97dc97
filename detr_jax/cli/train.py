"""`detr-jax train`: train a config into a workdir (resuming from its newest checkpoint)."""

from __future__ import annotations

import pathlib
import sys

import jax

from detr_jax.config import config_from_args
from detr_jax.data import make_source
from detr_jax.evaluation.evaluator import make_eval_fn
from detr_jax.runtime.metrics_writer import METRICS_FILE, latest_values
from detr_jax.train.trainer import TrainingError, TrainingInterrupted, distributed_init, resolve_num_classes, train

DEFAULT_CONFIG = "synthetic_tiny"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "train", help="train (default: configs/synthetic_tiny.py); re-run on the same workdir to resume",
        epilog="Override any config key with --config.KEY=VALUE, e.g. --config.train.batch_size=16.")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file or name in configs/")
    parser.add_argument("--workdir", default=None, help="output directory (default: workdirs/<config name>)")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-process: jax.distributed.initialize() with auto-detection (TPU pods)")
    parser.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
    parser.add_argument("--num_processes", type=int, default=None, help="multi-process: number of processes")
    parser.add_argument("--process_id", type=int, default=None, help="multi-process: this process's index")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def default_workdir(config_arg: str) -> str:
    return str(pathlib.Path("workdirs") / pathlib.Path(config_arg).stem)


def run(args, overrides: dict[str, str]) -> int:
    distributed_init(args.coordinator, args.num_processes, args.process_id, force=args.distributed)
    config = config_from_args(args.config, overrides)
    workdir = args.workdir or default_workdir(args.config)
    source = make_source(config.data, "train")
    resolve_num_classes(config, source)  # the evaluator's model needs the number
    # Built before training starts: it checks the evaluation images (cheaply) at once.
    eval_fn = make_eval_fn(config, workdir) if config.train.eval_every_epochs > 0 else None
    try:
        metrics = train(config, workdir, eval_fn=eval_fn, show_progress=not args.no_progress, source=source)
    except TrainingInterrupted as e:
        print(f"detr-jax train: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingError as e:
        print(f"detr-jax train: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        if not metrics:  # the run was finished already: its numbers are those it logged last
            metrics = latest_values(pathlib.Path(workdir) / METRICS_FILE)
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("loss", "eval_AP", "eval_AP50", "eval_PQ") if k in metrics)
        print(f"done{': ' + summary if summary else ''}; metrics, checkpoints and loss_curve.png in {workdir}")
    return 0
