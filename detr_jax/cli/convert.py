"""`detr-jax convert`: a PyTorch DETR/ResNet/ViT checkpoint -> a params-only checkpoint folder."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from detr_jax.checkpoints.checkpointer import save_variables
from detr_jax.config import config_from_args
from detr_jax.convert import convert_file


def add_parser(sub) -> None:
    parser = sub.add_parser("convert", help="convert a PyTorch DETR/ResNet/ViT checkpoint to Flax")
    parser.add_argument("src", help="PyTorch state dict (.pth/.pt/.bin), .safetensors, or a Hugging Face model folder")
    parser.add_argument("dst", help="output checkpoint directory")
    parser.add_argument("--config", default=None,
                        help="config whose model the checkpoint must match (default: inferred)")
    parser.add_argument("--reinit_class_head", action="store_true",
                        help="re-initialize the class head when num_classes differs")


def run(args, overrides: dict[str, str]) -> int:
    if args.config:
        convert_main(args.src, args.dst, config=config_from_args(args.config, overrides),
                     reinit_class_head=args.reinit_class_head)
    else:  # the overrides apply to the config inferred from the weights
        convert_main(args.src, args.dst, reinit_class_head=args.reinit_class_head, overrides=overrides)
    return 0


def convert_main(
    src: str | pathlib.Path,
    dst: str | pathlib.Path,
    config: ml_collections.ConfigDict | str | pathlib.Path | None = None,
    reinit_class_head: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """`detr-jax convert SRC DST [--config FILE] [--reinit_class_head]`.

    Converts the PyTorch checkpoint SRC (`detr_jax.convert.convert_file`: the arguments are
    its) and writes a params-only checkpoint to the new directory DST
    (`detr_jax.checkpoints.checkpointer.save_variables`). Prints a summary.

    Returns:
      The metadata written.
    Raises:
      ConversionError (every problem listed), ConfigError, CheckpointError.
    """
    variables, metadata = convert_file(src, config, reinit_class_head=reinit_class_head, overrides=overrides)
    out = save_variables(variables, dst, metadata)
    model = metadata["model"]
    count = sum(np.size(x) for x in jax.tree.leaves(variables))
    print(f"converted {metadata['layout']} checkpoint {metadata['source']} ({count:,} values, {metadata['contents']})")
    print(f"model: {', '.join(f'{k}={v}' for k, v in model.items())}")
    for note in metadata["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return metadata
