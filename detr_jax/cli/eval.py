"""`detr-jax eval`: COCO box AP of a checkpoint; prints the tables, writes JSON and pictures."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from detr_jax.cli.common import DTYPE_CHOICES, checkpoint_command_config, positive_int
from detr_jax.evaluation.coco_metrics import format_per_class_ap, to_coco_results
from detr_jax.evaluation.evaluator import Evaluator, save_eval_samples
from detr_jax.models import build_model
from detr_jax.checkpoints.restore import load_checkpoint


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "eval", help="COCO box AP of a checkpoint (a training workdir or a converted checkpoint)")
    parser.add_argument("--checkpoint", required=True,
                        help="training workdir (newest checkpoint), a step folder, or a converted checkpoint")
    parser.add_argument("--config", default=None,
                        help="config file or name (default: the training run's own config)")
    parser.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval)")
    parser.add_argument("--max_batches", type=positive_int, default=None, help="evaluate only this many batches")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="compute dtype")
    parser.add_argument("--save_detections", action="store_true", help="also write COCO-format detections")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def run(args, overrides: dict[str, str]) -> int:
    config, overrides = checkpoint_command_config(args, overrides)
    out = args.out or str(pathlib.Path(args.checkpoint) / "eval")
    eval_main(config, args.checkpoint, out, overrides=overrides, max_batches=args.max_batches,
              dtype=args.dtype, save_detections=args.save_detections, progress=not args.no_progress)
    return 0


def eval_main(
    config: ml_collections.ConfigDict | None,
    checkpoint: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
    dtype: str | None = None,
    num_visualized: int | None = None,
    save_detections: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """COCO evaluation of a checkpoint on `config`'s eval split.

    Prints the 12-number table and the per-class AP (with a mask head and data.masks also
    PQ/SQ/RQ for all, things and stuff, and mask AP); writes to `out_dir` (process 0):
      eval_metrics.json   {"metrics", "per_class_ap", "num_images", "checkpoint", "dataset", ...}
      eval_samples.png    the first `num_visualized` (default config.eval.num_visualized)
                          images with their detections (score >= 0.5), or their
                          panoptic segments
      detections_coco.json  every query of every image in the COCO results format
                          (only with save_detections)

    Args:
      config: the full config; its `model` section must match the checkpoint. None: the
        checkpoint's own.
      checkpoint: a training workdir or step, or a params checkpoint (`restore.load_checkpoint`).
      overrides: applied to the checkpoint's own config (only with `config` None).
      max_batches: evaluate only the first batches (per host), e.g. for a quick check.
      dtype: compute dtype override ("float32", "bfloat16").

    Returns the metrics dict (METRIC_NAMES, and SEGMENTATION_METRIC_NAMES with masks).
    """
    variables, config = load_checkpoint(checkpoint, config, overrides)
    evaluator = Evaluator(build_model(config.model, dtype), config)
    result = evaluator(variables, max_batches=max_batches, progress=progress)
    if jax.process_index() == 0:
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"COCO evaluation of {checkpoint} on {result.num_images} images ({config.data.dataset}):")
        print(result.summary)
        print("per-class AP@[.50:.95]:")
        print(format_per_class_ap(result.per_class_ap, result.category_names))
        report = result.to_json()
        report.update(checkpoint=str(checkpoint), dataset=config.data.dataset, max_batches=max_batches,
                      dtype=dtype or config.model.dtype, summary=result.summary.splitlines())
        (out_dir / "eval_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        written = [out_dir / "eval_metrics.json"]
        if save_detections:
            dets = result.detections
            path = out_dir / "detections_coco.json"
            path.write_text(json.dumps(to_coco_results(dets["image_id"], dets["scores"], dets["labels"], dets["boxes"])))
            written.append(path)
        num = config.eval.num_visualized if num_visualized is None else num_visualized
        grid = save_eval_samples(result, evaluator.source, out_dir, num=num)
        if grid is not None:
            written.append(grid)
        print("wrote " + ", ".join(str(p) for p in written))
    return result.metrics
