"""Where DETR-R50 CPU inference time goes, in each runtime's own profiler, by operator class.

One case of bench_vs_torch (same converted weights, same uint8 inputs, freed host memory
retained), each path in a process of its own pinned to the same cores:

  jit       our jitted model (+ post-processing), a jax.profiler trace summed by XLA
            operation (scripts/profile_train_step.py's attribution: conv, dot, ...)
  onnx      our float32 ONNX export in onnxruntime, its profiler (kernel time by op type)
  int8      the int8 export (--quantize int8), the same
  eager     Hugging Face's DetrForObjectDetection, torch.profiler (self CPU time by aten op)

and sorts each operator into a class: convolution (with what the runtime fused into it),
matrix product, layout (transposes, reorders), elementwise/other. Times are milliseconds
per call, summed over the operators of one call; a runtime that runs operators
concurrently (XLA) can sum to more than its wall time.

    python scripts/profile_inference.py --case infer_b1_800x1216 --reps 3 --out bench_results/profile_inference.json

Writes a table to stdout and JSON to --out; both name the CPU.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PATHS = ("jit", "onnx", "int8", "eager")
CLASSES = ("convolution", "matrix product", "layout", "elementwise/other")

ONNX_CLASSES = {"Conv": "convolution", "QLinearConv": "convolution", "MaxPool": "convolution",
                "MatMul": "matrix product", "Gemm": "matrix product", "FusedMatMul": "matrix product",
                "MatMulInteger": "matrix product", "ReorderInput": "layout", "ReorderOutput": "layout",
                "Transpose": "layout"}
TORCH_CLASSES = {"aten::mkldnn_convolution": "convolution", "aten::_convolution": "convolution",
                 "aten::convolution": "convolution", "aten::conv2d": "convolution",
                 "aten::_mkldnn_convolution": "convolution", "aten::max_pool2d_with_indices": "convolution",
                 "aten::max_pool2d": "convolution", "aten::addmm": "matrix product", "aten::mm": "matrix product",
                 "aten::bmm": "matrix product", "aten::baddbmm": "matrix product", "aten::matmul": "matrix product",
                 "aten::linear": "matrix product", "aten::copy_": "layout", "aten::contiguous": "layout",
                 "aten::clone": "layout", "aten::permute": "layout", "aten::transpose": "layout"}


def inputs(case):
    import bench_vs_torch as bench
    import numpy as np

    images, mask, _, _ = bench.inputs(case)
    orig_size = np.full((case["batch"], 2), (case["height"], case["width"]), np.int32)
    return images, mask, orig_size


def our_variables(weights_path: str):
    import torch

    import bench_vs_torch as bench
    from detr_jax.convert import convert_state_dict

    config = bench.r50_config()
    state_dict = {k: v.numpy() for k, v in torch.load(weights_path, weights_only=True).items()}
    variables, _ = convert_state_dict(state_dict, config.model, source=weights_path)
    return config, variables


def profile_jit(case, weights_path: str, reps: int) -> dict:
    import jax

    from detr_jax.evaluation.postprocess import postprocess
    from detr_jax.models import build_model
    from profile_train_step import summarize

    config, variables = our_variables(weights_path)
    model = build_model(config.model)

    def predict(v, image, mask, orig_size):
        out = model.apply(v, image, mask, train=False)
        return postprocess(out["pred_logits"][-1], out["pred_boxes"][-1], orig_size)

    args = [jax.device_put(variables), *(jax.device_put(x) for x in inputs(case))]
    compiled = jax.jit(predict).lower(*args).compile()
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    trace_dir = tempfile.mkdtemp(prefix="detr_jax_profile_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    trace = max(glob.glob(os.path.join(trace_dir, "plugins/profile/*/perfetto_trace.json.gz")), key=os.path.getmtime)
    classes, detail = collections.Counter(), collections.Counter()
    for (region, _, kind), ms in summarize(trace, compiled.as_text(), reps):
        label = {"conv": "convolution", "dot": "matrix product", "copy/transpose": "layout"}.get(kind, "elementwise/other")
        classes[label] += ms
        detail[f"{region} {kind}"] += ms
    return {"call_s": times, "classes_ms": dict(classes), "detail_ms": dict(detail.most_common(12))}


def profile_onnx(case, weights_path: str, reps: int, quantize: str | None) -> dict:
    import onnxruntime as ort

    from detr_jax.serving.export import export_detector, read_metadata, onnxruntime_session_options

    config, variables = our_variables(weights_path)
    image, mask, orig_size = inputs(case)
    with tempfile.TemporaryDirectory() as tmp:
        directory = export_detector(config, variables, os.path.join(tmp, "onnx"), "onnx",
                                    size=(case["height"], case["width"]), quantize=quantize)
        options = onnxruntime_session_options(read_metadata(directory)["onnxruntime"]["session_options"])
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort_profile")
        session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feed = {"image": image, "mask": mask, "orig_size": orig_size}
        for _ in range(2):
            session.run(None, feed)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - start)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-reps:]
    first = runs[0]["ts"]
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / reps
    classes = collections.Counter()
    for op, ms in by_op.items():
        classes[ONNX_CLASSES.get(op, "elementwise/other")] += ms
    return {"call_s": times, "classes_ms": dict(classes), "detail_ms": dict(by_op.most_common(12))}


def profile_eager(case, weights_path: str, reps: int) -> dict:
    import numpy as np
    import torch

    import bench_vs_torch as bench
    from detr_jax.ops.image_statistics import normalize

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = bench.build_hf(aux_loss=True)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    model.eval()
    image, mask, _ = inputs(case)
    pixel_values = torch.from_numpy(np.where(mask[..., None], normalize(image), 0).astype(np.float32))
    pixel_values = pixel_values.permute(0, 3, 1, 2).contiguous()
    pixel_mask = torch.from_numpy(mask.astype(np.int64))
    with torch.inference_mode():
        for _ in range(2):
            model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        times = []
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                start = time.perf_counter()
                model(pixel_values=pixel_values, pixel_mask=pixel_mask)
                times.append(time.perf_counter() - start)
    by_op = collections.Counter()
    for event in prof.key_averages():
        by_op[event.key] += event.self_cpu_time_total / 1e3 / reps
    classes = collections.Counter()
    for op, ms in by_op.items():
        classes[TORCH_CLASSES.get(op, "elementwise/other")] += ms
    return {"call_s": times, "classes_ms": dict(classes), "detail_ms": dict(by_op.most_common(12))}


def child(path: str, case_name: str, weights_path: str, reps: int) -> None:
    """One path, in this process: prints its result as one JSON line."""
    from detr_jax.runtime.host_memory import retain_freed_memory

    retain_freed_memory()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bench_vs_torch as bench

    case = bench.CASES[case_name]
    result = {"jit": lambda: profile_jit(case, weights_path, reps),
              "onnx": lambda: profile_onnx(case, weights_path, reps, None),
              "int8": lambda: profile_onnx(case, weights_path, reps, "int8"),
              "eager": lambda: profile_eager(case, weights_path, reps)}[path]()
    print("RESULT " + json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="infer_b1_800x1216")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--reps", type=int, default=3, help="profiled calls per path (after 2 untimed)")
    parser.add_argument("--out", default="bench_results/profile_inference.json")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.case, args.child[1], args.reps)
        return 0

    import bench_vs_torch as bench
    from detr_jax.runtime.cpu_info import cpu_info, describe

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "hf_detr_r50.pt")
        bench.make_weights(weights)
        for path in args.paths:
            print(f"profiling {path} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--case", args.case, "--reps", str(args.reps),
                                   "--child", path, weights], capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{path} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[path] = json.loads(lines[-1][len("RESULT "):])
    info = cpu_info()
    print(f"CPU: {describe(info)}")
    print(f"{args.case}: ms per call by operator class (each runtime's profiler), median wall time of the "
          f"profiled calls")
    print(f"{'class':<20}" + "".join(f"{p:>10}" for p in results))
    for label in CLASSES:
        print(f"{label:<20}" + "".join(f"{r['classes_ms'].get(label, 0.0):>10.0f}" for r in results.values()))
    print(f"{'sum of operators':<20}" + "".join(f"{sum(r['classes_ms'].values()):>10.0f}" for r in results.values()))
    print(f"{'wall (median)':<20}" + "".join(f"{1e3 * statistics.median(r['call_s']):>10.0f}" for r in results.values()))
    for path, r in results.items():
        print(f"{path}: largest " + ", ".join(f"{k} {v:.0f}" for k, v in list(r["detail_ms"].items())[:8]))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "case": args.case, "reps": args.reps, "cpu": info,
              "load_average": os.getloadavg(), "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
