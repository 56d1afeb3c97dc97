"""How many programs DETR-R50 evaluation compiles at COCO's image sizes, and for how long,
at a first start and at a second one that reads JAX's persistent compilation cache.

Shapes: the eval resize (shorter side 800, longer at most 1333) and the default buckets
(sides every 128 px up to 1344) put each image in one bucket.
  --annotations FILE  the image sizes of a COCO annotation file (instances_val2017.json);
  otherwise           every COCO-like size: longer side 640 (as nearly all COCO images),
                      shorter side each integer from --min-short-side to 640, both
                      orientations.
Two counts: `single`, the buckets of single images: what the Predictor compiles (it
batches images of one bucket together); `mixed`, the buckets a batch of several images can
need (the bucket of the largest height and the largest width in it; pairs of sizes give
every such pair of maxima): what the Evaluator, which batches images in dataset order,
can compile.

Each shape's predict function (model + post-processing, `postprocess.make_predict_fn`)
is compiled ahead of time in a fresh process: first with an empty persistent cache
(compiled and written), then in another process with the same cache (read). R50 with
random weights (compile time does not depend on them). Prints a table and writes JSON.

    python scripts/bench_compile.py --which single --batch 2 --out bench_results/bench_compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from detr_jax.runtime.cpu_info import cpu_info

def coco_like_sizes(min_short: int) -> list[tuple[int, int]]:
    """(h, w) of every COCO-like image: longer side 640, either orientation."""
    sizes = [(short, 640) for short in range(min_short, 641)]
    return sizes + [(w, h) for h, w in sizes]


def annotation_sizes(path: str) -> list[tuple[int, int]]:
    with open(path, encoding="utf-8") as f:
        return [(int(im["height"]), int(im["width"])) for im in json.load(f)["images"]]


def bucket_shapes(sizes: list[tuple[int, int]], data) -> dict[str, list[tuple[int, int]]]:
    """{"single": buckets of single images, "mixed": buckets of any batch}, smallest first."""
    from detr_jax.data import batching
    from detr_jax.data.pipeline import buckets_for
    from detr_jax.data.transforms import resized_size

    buckets = buckets_for(data)
    resized = {resized_size(h, w, data.eval_scale, data.eval_max_size) for h, w in sizes}

    def bucket(h, w):
        return batching.choose_bucket(buckets, h, w, data.bucket_step)[0]

    single = {bucket(h, w) for h, w in resized}
    mixed = {bucket(max(a[0], b[0]), max(a[1], b[1])) for a in resized for b in resized}
    order = sorted(single | mixed, key=lambda s: (s[0] * s[1], s))
    return {"single": [s for s in order if s in single], "mixed": [s for s in order if s in mixed]}


def compile_shapes(shapes: list[tuple[int, int]], batch: int, cache_dir: str) -> list[dict]:
    """In this process: each shape's predict function compiled ahead of time (seconds)."""
    from detr_jax.runtime import compilation_cache

    compilation_cache.configure(cache_dir)
    import jax
    import jax.numpy as jnp

    from detr_jax.config import base_config
    from detr_jax.models import build_model, variable_shapes
    from detr_jax.evaluation.postprocess import make_predict_fn
    from detr_jax.runtime.sharding import make_mesh

    config = base_config()
    model = build_model(config.model)
    mesh = make_mesh(jax.devices()[:1])
    predict = make_predict_fn(model, mesh)
    variables = variable_shapes(model)
    counter = compilation_cache.CacheCounter()
    rows = []
    for h, w in shapes:
        specs = (jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8), jax.ShapeDtypeStruct((batch, h, w), jnp.bool_),
                 jax.ShapeDtypeStruct((batch, 2), jnp.int32))
        hits = counter.hits
        start = time.perf_counter()
        lowered = predict.lower(variables, *specs)  # tracing: never cached
        traced = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
        rows.append({"shape": [h, w], "seconds": round(done - start, 3), "trace_seconds": round(traced - start, 3),
                     "compile_seconds": round(done - traced, 3), "from_cache": counter.hits > hits})
    return rows


def run_child(shapes, batch: int, cache_dir: str) -> list[dict]:
    """compile_shapes in a fresh process (so nothing is cached in memory)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--child", json.dumps({"shapes": shapes, "batch": batch,
                        "cache": cache_dir, "out": out.name})], check=True)
        return json.load(open(out.name, encoding="utf-8"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", help="a COCO annotation file whose image sizes to use")
    parser.add_argument("--min-short-side", type=int, default=240)
    parser.add_argument("--which", choices=("single", "mixed"), default="single", help="the shapes to compile")
    parser.add_argument("--batch", type=int, default=2, help="images per compiled batch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench_results/bench_compile.json")
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        rows = compile_shapes([tuple(s) for s in job["shapes"]], job["batch"], job["cache"])
        with open(job["out"], "w", encoding="utf-8") as f:
            json.dump(rows, f)
        return

    from detr_jax.config import base_config

    data = base_config().data
    sizes = annotation_sizes(args.annotations) if args.annotations else coco_like_sizes(args.min_short_side)
    shapes = bucket_shapes(sizes, data)
    print(f"{len(sizes)} image sizes -> {len(shapes['single'])} single-image buckets, "
          f"{len(shapes['mixed'])} buckets a batch can need")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as cache:
        first = run_child(shapes[args.which], args.batch, cache)
        second = run_child(shapes[args.which], args.batch, cache)
    print(f"\n{'':>11} {'first start (s)':>23} {'second start (s)':>23}")
    print(f"{'bucket':>11} {'trace':>7} {'compile':>7} {'total':>7} {'trace':>7} {'read':>7} {'total':>7} {'cached':>6}")
    for a, b in zip(first, second):
        print(f"{a['shape'][0]:>5}x{a['shape'][1]:<5} {a['trace_seconds']:>7.2f} {a['compile_seconds']:>7.2f} "
              f"{a['seconds']:>7.2f} {b['trace_seconds']:>7.2f} {b['compile_seconds']:>7.2f} {b['seconds']:>7.2f} "
              f"{str(b['from_cache']):>6}")
    totals = [round(sum(r["seconds"] for r in rows), 2) for rows in (first, second)]
    print(f"{'total':>11} {'':>15} {totals[0]:>7.2f} {'':>15} {totals[1]:>7.2f}")
    result = {
        "benchmark": "DETR-R50 eval predict function: compiled shapes and compile seconds, first and second start",
        "sizes": args.annotations or f"COCO-like: longer side 640, shorter {args.min_short_side}..640",
        "batch": args.batch, "compiled": args.which, "buckets": shapes,
        "first_start": first, "second_start": second, "total_seconds": totals,
        "cpu": cpu_info(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"1-min load average before/after: {result['load_average_1min']}; wrote {args.out}")


if __name__ == "__main__":
    main()
