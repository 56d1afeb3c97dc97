"""What a DETR costs with each backbone: parameters, GFLOPs, compile time, CPU inference time.

Rows are the paper's DETR (hidden 256, 8 heads, 6+6 layers, 100 queries, 91 classes,
float32: `detr_jax.config.base_config()`) with only `model.backbone` and
`model.backbone_args` changed:
  detr_r50             resnet50
  detr_vit_s16         vit_s16, global attention in every block
  detr_vit_b16         vit_b16, global attention in every block
  detr_vit_s16_win14   vit_s16, backbone_args={"window_size": 14} (ViTDet: 14x14 windows,
                       blocks 2, 5, 8, 11 global)
  detr_vit_b16_win14   vit_b16, the same

Columns, for one image (batch 1, `--size`, mask all True, random weights from
`init_variables`): parameters (the "params" collection; frozen BatchNorm statistics are
not counted, as PyTorch's buffers are not), total and the backbone's alone; GFLOPs of the
jitted inference forward `model.apply(variables, images, mask, train=False)` from XLA's
cost analysis of the compiled executable (XLA counts a multiply-add as 2 flops; fvcore's
"GFLOPs" in the DETR paper count it as 1); compile seconds (lower + compile); the
median and min of `--reps` timed calls after one warmup call; XLA's temporary buffers
for the forward (memory_analysis, besides the weights and the input) and the worker's
peak resident set.

Each row runs in its own process (spawned, so each peak RSS is its own), pinned to the
same cores (`--threads`: the first N of this process's cores; XLA's thread pool sees
only those), with freed host memory retained as `detr-jax train` does
(detr_jax.runtime.host_memory). Defaults to JAX_PLATFORMS=cpu.

    python scripts/bench_model_cost.py                         # 800x1216, all rows
    python scripts/bench_model_cost.py --size 160x224 --reps 1  # a quick check
    python scripts/bench_model_cost.py --rows detr_r50 detr_vit_b16_win14 --reps 3

Prints a markdown table and writes JSON (--out, default bench_results/bench_model_cost.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

from detr_jax.runtime.cpu_info import cpu_info

# name -> (label, model.backbone, model.backbone_args)
ROWS = {
    "detr_r50": ("DETR-R50", "resnet50", {}),
    "detr_vit_s16": ("DETR ViT-S/16", "vit_s16", {}),
    "detr_vit_b16": ("DETR ViT-B/16", "vit_b16", {}),
    "detr_vit_s16_win14": ("DETR ViT-S/16 win14", "vit_s16", {"window_size": 14}),
    "detr_vit_b16_win14": ("DETR ViT-B/16 win14", "vit_b16", {"window_size": 14}),
}


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected HxW, e.g. 800x1216") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"--size {text!r}: both sides must be positive")
    return h, w


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine(cores) -> dict:
    import importlib.metadata as md

    out = {"cpu_model": cpu_model(), "cpu": cpu_info(), "cores_used": len(cores), "cpu_count": os.cpu_count(),
           "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("jax", "jaxlib", "flax", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _flops(cost) -> float | None:
    """XLA's cost analysis: a dict, or (older jax) a list with one dict per computation."""
    if cost is None:
        return None
    if isinstance(cost, dict):
        cost = [cost]
    values = [c["flops"] for c in cost if c and "flops" in c]
    return float(sum(values)) if values else None


def _count(tree) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(tree)))


def measure(row: str, size: tuple[int, int], reps: int, cores, retain_host_memory: bool) -> dict:
    """One row, in a worker process of its own."""
    os.sched_setaffinity(0, cores)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if retain_host_memory:
        from detr_jax.runtime.host_memory import retain_freed_memory

        retain_freed_memory()
    import jax
    import numpy as np

    from detr_jax.config import apply_overrides, base_config
    from detr_jax.models import build_model, init_variables

    _, backbone, backbone_args = ROWS[row]
    config = apply_overrides(base_config(), {"model.backbone": backbone, "model.backbone_args": dict(backbone_args)})
    model = build_model(config.model)
    variables = jax.device_put(init_variables(model, jax.random.PRNGKey(0)))
    params = variables["params"]

    h, w = size
    images = jax.device_put(np.random.default_rng(0).normal(size=(1, h, w, 3)).astype(np.float32))
    mask = jax.device_put(np.ones((1, h, w), bool))
    forward = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))

    start = time.perf_counter()
    compiled = forward.lower(variables, images, mask).compile()
    compile_s = time.perf_counter() - start
    flops = _flops(compiled.cost_analysis())
    try:
        mem = compiled.memory_analysis()
        temp_bytes = int(mem.temp_size_in_bytes) if mem is not None else None
    except (AttributeError, NotImplementedError):
        temp_bytes = None

    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, images, mask))
    first_call_s = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, images, mask))
        times.append(time.perf_counter() - start)
    return {
        "row": row, "label": ROWS[row][0], "backbone": backbone, "backbone_args": backbone_args,
        "size": [h, w], "params": _count(params), "backbone_params": _count(params["backbone"]),
        "frozen_bn_values": _count(variables["frozen_bn"]),
        "gflops": None if flops is None else flops / 1e9, "compile_s": compile_s, "first_call_s": first_call_s,
        "times_s": times, "median_s": statistics.median(times), "min_s": min(times),
        "xla_temp_mib": None if temp_bytes is None else temp_bytes / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(results: list[dict], size: tuple[int, int]) -> str:
    h, w = size
    lines = [f"| model | params M | backbone M | GFLOPs {h}x{w} | compile s | median s | min s "
             f"| XLA temp MiB | peak RSS MiB |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:100]} |")
            continue
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} | {r['backbone_params'] / 1e6:.1f} "
                     f"| {_fmt(r['gflops'], '.1f')} | {r['compile_s']:.1f} | {r['median_s']:.3f} "
                     f"| {r['min_s']:.3f} | {_fmt(r['xla_temp_mib'], '.0f')} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=(800, 1216), help="HxW of the image (default 800x1216)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per row, after one warmup call")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--threads", type=int, default=None, help="cores to pin every row's worker to (default: all)")
    parser.add_argument("--host_malloc", choices=("retain", "default"), default="retain",
                        help="retain: keep freed host memory (detr_jax.runtime.host_memory, what `detr-jax train` does)")
    parser.add_argument("--out", default="bench_results/bench_model_cost.json")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")

    cores = sorted(os.sched_getaffinity(0))[: args.threads or None]
    ctx = mp.get_context("spawn")
    results = []
    for row in args.rows:
        print(f"running {row} at {args.size[0]}x{args.size[1]} ...", file=sys.stderr, flush=True)
        with ctx.Pool(1) as pool:
            try:
                res = pool.apply(measure, (row, args.size, args.reps, cores, args.host_malloc == "retain"))
            except Exception as e:  # noqa: BLE001 - a failed row is reported, the others still run
                res = {"row": row, "label": ROWS[row][0], "error": f"{type(e).__name__}: {e}"}
        results.append(res)
        print(format_table([res], args.size), file=sys.stderr, flush=True)

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "size": list(args.size), "batch": 1, "reps": args.reps,
              "host_malloc": args.host_malloc, "machine": machine(cores), "load_average": os.getloadavg(),
              "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(results, args.size))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
