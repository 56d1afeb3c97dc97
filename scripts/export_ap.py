"""AP and speed of a checkpoint's exports against its jit Predictor, on its own eval data.

Exports the checkpoint to ONNX float32 and ONNX int8 (`--quantize int8`, calibrated on
`--calibration` images of the built-in synthetic data, a split of their own) at its
bucket size, predicts the eval split with the jit Predictor and each export
(`Predictor.from_export`, the same resize, padding and post-processing), and reports COCO
box AP / AP50 / AP75 of each, the largest score and box differences against the jit, and
the median time of a batch (in turns, one batch of each in each round).

    python scripts/export_ap.py --checkpoint /path/to/synthetic_tiny_workdir --out bench_results/export_ap.json

Writes a table to stdout and JSON to --out; the JSON names the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

from detr_jax.checkpoints.restore import load_checkpoint
from detr_jax.data import make_source
from detr_jax.data.coco_export import to_coco_dict
from detr_jax.evaluation.coco_metrics import coco_evaluate, to_coco_results
from detr_jax.runtime.cpu_info import cpu_info, describe
from detr_jax.serving.export import export_detector
from detr_jax.serving.predictor import Predictor
from detr_jax.serving.quantize import synthetic_calibration_images


def evaluate(predictor: Predictor, images: list[np.ndarray], image_ids: np.ndarray, ground_truth) -> tuple[dict, list]:
    """COCO metrics of `predictor` on `images`, and its per-image query outputs."""
    queries = predictor.predict_queries(images)
    results = to_coco_results(image_ids, np.stack([q["scores"] for q in queries]),
                              np.stack([q["labels"] for q in queries]), np.stack([q["boxes"] for q in queries]))
    return coco_evaluate(ground_truth, results, image_ids=image_ids).metrics, queries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or checkpoint")
    parser.add_argument("--batch", type=int, default=8, help="images per call (every path)")
    parser.add_argument("--calibration", type=int, default=8, help="synthetic calibration images for int8")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (one batch of each path per round)")
    parser.add_argument("--out", default="bench_results/export_ap.json")
    args = parser.parse_args()

    variables, config = load_checkpoint(args.checkpoint)
    buckets = tuple(tuple(b) for b in config.data.bucket_shapes)
    if len(buckets) != 1:
        print(f"{args.checkpoint}: needs one bucket shape (an ONNX export has one size), has {buckets}", file=sys.stderr)
        return 2
    size = buckets[0]
    source = make_source(config.data, "eval")
    images = [source[i].image for i in range(len(source))]
    image_ids = np.array([source.annotations(i).image_id for i in range(len(source))])
    ground_truth = to_coco_dict(source)

    paths = {"jit": Predictor(config, variables, batch_size=args.batch)}
    with tempfile.TemporaryDirectory() as tmp:
        export_s = {}
        for name, quantize in (("onnx_float32", None), ("onnx_int8", "int8")):
            start = time.perf_counter()
            calibration = synthetic_calibration_images(config, args.calibration) if quantize else None
            directory = export_detector(config, variables, pathlib.Path(tmp) / name, "onnx", batch="dynamic",
                                        size=size, quantize=quantize, calibration_images=calibration)
            export_s[name] = time.perf_counter() - start
            paths[name] = Predictor.from_export(directory, batch_size=args.batch)

        report = {"date": time.strftime("%Y-%m-%d %H:%M"), "checkpoint": str(args.checkpoint), "cpu": cpu_info(),
                  "size": list(size), "batch": args.batch, "eval_images": len(images), "export_s": export_s,
                  "paths": {}}
        outputs = {}
        for name, predictor in paths.items():
            metrics, outputs[name] = evaluate(predictor, images, image_ids, ground_truth)
            report["paths"][name] = {k: metrics[k] for k in ("AP", "AP50", "AP75")}
        for name in paths:
            report["paths"][name]["max_abs_diff_vs_jit"] = {
                key: float(max(np.abs(a[key] - b[key]).max() for a, b in zip(outputs[name], outputs["jit"])))
                for key in ("scores", "boxes")}
        batch = images[: args.batch]
        times = {name: [] for name in paths}
        for _ in range(args.reps):  # in turns; each timed call after an untimed one
            for name, predictor in paths.items():
                predictor.predict_queries(batch)
                start = time.perf_counter()
                predictor.predict_queries(batch)
                times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            report["paths"][name].update(median_s=statistics.median(ts), min_s=min(ts), times_s=ts)

    print(f"CPU: {describe(report['cpu'])}")
    print(f"{args.checkpoint}: {len(images)} eval images at {size[0]}x{size[1]}, batches of {args.batch}")
    print(f"{'path':<13} {'AP':>6} {'AP50':>6} {'AP75':>6} {'max |score diff|':>17} {'max |box diff| px':>18} "
          f"{'median s':>9} {'min s':>7}")
    for name, row in report["paths"].items():
        diff = row["max_abs_diff_vs_jit"]
        print(f"{name:<13} {row['AP']:>6.3f} {row['AP50']:>6.3f} {row['AP75']:>6.3f} {diff['scores']:>17.2e} "
              f"{diff['boxes']:>18.2e} {row['median_s']:>9.3f} {row['min_s']:>7.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
