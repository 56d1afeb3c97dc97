"""XLA:CPU options for DETR-R50 inference: each variant compiled once, all timed in turns.

The jit path's inference program (the model and its post-processing, as the Predictor
compiles it) under XLA:CPU compiler options (per program: `lower(...).compile(
compiler_options=...)`), under another float32 matmul precision (`jax.default_matmul_precision`,
which changes the traced program) and in the formulation of the ONNX export (1x1
convolutions as convolutions: `detr_jax.ops.formulation`). One call of each variant per
round, each timed call after an untimed one; the median and min over rounds, the ratio of
medians to the default's, and each variant's largest score and box difference from the
default's outputs (0 = bitwise the same).

    python scripts/bench_jit_options.py --size 800x1216 --reps 6
    python scripts/bench_jit_options.py --variants default ynn_conv --size 640x640 --batch 4

Writes a table to stdout and JSON to --out (default bench_results/bench_jit_options.json);
both name the CPU. Process-wide settings (the thread pool) are not per program: run the
script under them (e.g. `taskset`) to compare those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from detr_jax.config import base_config
from detr_jax.evaluation.postprocess import postprocess
from detr_jax.models import build_model, init_variables
from detr_jax.ops.formulation import ONNXRUNTIME, formulated_for
from detr_jax.runtime.cpu_info import cpu_info, describe
from detr_jax.runtime.host_memory import retain_freed_memory


def ynn(*kinds: str) -> dict:
    return {"xla_cpu_experimental_ynn_fusion_type": ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in kinds)}


# name -> (compiler options, trace context)
VARIANTS = {
    "default": ({}, None),
    "ynn_train_step_set": (ynn("INDIVIDUAL_CONVOLUTION", "INDIVIDUAL_DOT", "ELTWISE", "REDUCE"), None),
    "ynn_conv": (ynn("INDIVIDUAL_CONVOLUTION"), None),
    "ynn_dot": (ynn("INDIVIDUAL_DOT"), None),
    "ynn_conv_dot": (ynn("INDIVIDUAL_CONVOLUTION", "INDIVIDUAL_DOT"), None),
    "xnn_graph_greedy": ({"xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"}, None),
    "onednn_conv": ({"xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}, None),
    "sched_concurrency": ({"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"}, None),
    "sched_memory": ({"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}, None),
    "vector_width_512": ({"xla_cpu_prefer_vector_width": 512}, None),
    "fast_math": ({"xla_cpu_enable_fast_math": True}, None),
    "matmul_precision_bf16": ({}, "bfloat16"),
    "pointwise_as_conv": ({}, "onnxruntime"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--size", default="800x1216", help="HxW")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="bench_results/bench_jit_options.json")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    retain_freed_memory()  # as the benchmark's workers and `detr-jax train` do

    config = base_config()
    config.model.num_classes = 91
    model = build_model(config.model)
    variables = jax.device_put(init_variables(model, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    b = args.batch
    image = rng.integers(0, 256, (b, height, width, 3), dtype=np.uint8)
    mask = np.ones((b, height, width), bool)
    if b > 1:
        mask[1:, :, (3 * width) // 4:] = False
    orig_size = np.full((b, 2), (height, width), np.int32)
    inputs = [jax.device_put(x) for x in (image, mask, orig_size)]

    def make_predict():
        # A new function for each variant: jit's trace cache is keyed on the function, not
        # on the formulation context, so a reused one would keep the first variant's trace.
        def predict(v, image, mask, orig_size):
            out = model.apply(v, image, mask, train=False)
            return postprocess(out["pred_logits"][-1], out["pred_boxes"][-1], orig_size)

        return predict

    compiled, compile_s = {}, {}
    for name in args.variants:
        options, context = VARIANTS[name]
        if context == "onnxruntime":
            trace = formulated_for(ONNXRUNTIME)
        elif context:
            trace = jax.default_matmul_precision(context)
        else:
            trace = contextlib.nullcontext()
        start = time.perf_counter()
        with trace:
            lowered = jax.jit(make_predict()).lower(variables, *inputs)
        compiled[name] = lowered.compile(compiler_options=options or None)
        compile_s[name] = time.perf_counter() - start
        print(f"compiled {name} in {compile_s[name]:.1f} s", file=sys.stderr, flush=True)

    outputs = {name: jax.tree.map(np.asarray, fn(variables, *inputs)) for name, fn in compiled.items()}
    reference = outputs.get("default", next(iter(outputs.values())))
    times = {name: [] for name in compiled}
    for _ in range(args.reps):
        for name, fn in compiled.items():
            jax.block_until_ready(fn(variables, *inputs))
            start = time.perf_counter()
            jax.block_until_ready(fn(variables, *inputs))
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times[args.variants[0]])
    rows = {}
    for name in compiled:
        ts = times[name]
        rows[name] = {"options": VARIANTS[name][0], "trace": VARIANTS[name][1], "median_s": statistics.median(ts),
                      "min_s": min(ts), "times_s": ts, "ratio_to_first": statistics.median(ts) / base,
                      "compile_s": compile_s[name],
                      "max_abs_diff": {k: float(np.abs(outputs[name][k] - reference[k]).max())
                                       for k in ("scores", "boxes")}}
    info = cpu_info()
    print(f"CPU: {describe(info)}")
    print(f"DETR-R50 inference {b}x{height}x{width}, {args.reps} rounds; ratio = median / {args.variants[0]}'s")
    print(f"{'variant':<24} {'median s':>9} {'min s':>7} {'ratio':>6} {'compile s':>9} {'max |score diff|':>17} "
          f"{'max |box diff|':>15}")
    for name, row in rows.items():
        diff = row["max_abs_diff"]
        print(f"{name:<24} {row['median_s']:>9.3f} {row['min_s']:>7.3f} {row['ratio_to_first']:>6.3f} "
              f"{row['compile_s']:>9.1f} {diff['scores']:>17.2e} {diff['boxes']:>15.2e}")
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": info, "jax": jax.__version__, "batch": b,
              "size": [height, width], "reps": args.reps, "load_average": os.getloadavg(), "variants": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
