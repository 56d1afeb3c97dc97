"""Times the Hungarian matching step against plain scipy on the same cost matrices.

For each batch size: 6 decoder layers, 100 queries, up to 50 targets per image (random
valid counts). Three timings per step, median over --reps after warm-up:
  scipy:    a NumPy loop of scipy.optimize.linear_sum_assignment over the (layer, image)
            cost matrices, restricted to the valid targets, on host (the floor);
  assign:   the jitted `detr_jax.matcher.assign` (the one pure_callback) on the same
            cost matrices, already on device; overhead = median over repetitions of
            (assign - scipy), the three being timed in turn within each repetition;
  matching: the jitted `HungarianMatcher` (cost on device + the callback) from predictions.

  python scripts/bench_matcher.py [--batch-sizes 2 8 32 128] [--reps 50] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy
import scipy.optimize

from detr_jax.matcher import HungarianMatcher, assign, matching_cost

LAYERS, QUERIES, MAX_TARGETS, NUM_CLASSES = 6, 100, 50, 91


def make_inputs(rng, batch):
    logits = rng.normal(size=(LAYERS, batch, QUERIES, NUM_CLASSES + 1)).astype(np.float32)
    pred_boxes = rng.uniform(0.05, 0.95, size=(LAYERS, batch, QUERIES, 4)).astype(np.float32)
    pred_boxes[..., 2:] *= 0.3
    labels = rng.integers(0, NUM_CLASSES, size=(batch, MAX_TARGETS)).astype(np.int32)
    boxes = rng.uniform(0.05, 0.95, size=(batch, MAX_TARGETS, 4)).astype(np.float32)
    boxes[..., 2:] *= 0.3
    counts = rng.integers(0, MAX_TARGETS + 1, size=batch)
    valid = np.arange(MAX_TARGETS)[None, :] < counts[:, None]
    return [jnp.asarray(x) for x in (logits, pred_boxes, labels, boxes, valid)]


def scipy_loop(cost: np.ndarray, valid: np.ndarray):
    """The floor: one linear_sum_assignment per (layer, image) on its valid columns."""
    results = []
    for l in range(cost.shape[0]):
        for b in range(cost.shape[1]):
            columns = np.flatnonzero(valid[b])
            if columns.size:
                results.append(scipy.optimize.linear_sum_assignment(cost[l, b][:, columns]))
    return results


def interleaved_medians(fns: dict, reps: int, warmup: int = 3) -> dict:
    """Median wall time (ms) of each function, timed in turn within every repetition so
    that background load affects them alike; also the median per-repetition difference
    of each function from the first one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    first = next(iter(fns))
    medians = {f"{name}_ms": statistics.median(t) for name, t in times.items()}
    for name in list(fns)[1:]:
        diffs = [a - b for a, b in zip(times[name], times[first])]
        medians[f"{name}_minus_{first}_ms"] = statistics.median(diffs)
    return medians


def bench(batch, reps, rng):
    logits, pred_boxes, labels, boxes, valid = make_inputs(rng, batch)
    cost = jax.jit(matching_cost)(logits, pred_boxes, labels, boxes)
    valid_lbm = jnp.broadcast_to(valid, (LAYERS,) + valid.shape)
    cost_host, valid_host = np.asarray(cost), np.asarray(valid)

    assign_jit = jax.jit(assign)
    matcher_jit = jax.jit(HungarianMatcher())
    timings = interleaved_medians(
        {
            "scipy": lambda: scipy_loop(cost_host, valid_host),
            "assign": lambda: jax.block_until_ready(assign_jit(cost, valid_lbm)),
            "matching": lambda: jax.block_until_ready(
                matcher_jit(logits, pred_boxes, labels, boxes, valid)
            ),
        },
        reps,
    )
    return {
        "batch": batch,
        "problems": LAYERS * batch,
        "mean_targets": float(valid_host.sum(1).mean()),
        **timings,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 32, 128])
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_results/bench_matcher.json")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = [bench(batch, args.reps, rng) for batch in args.batch_sizes]

    header = (
        f"{'batch':>5} {'problems':>8} {'targets':>7} {'scipy ms':>9} {'assign ms':>9} "
        f"{'overhead ms':>11} {'matching ms':>11}"
    )
    print(
        f"{LAYERS} layers x {QUERIES} queries, up to {MAX_TARGETS} targets; median of "
        f"{args.reps}; {jax.devices()[0].platform}, {jax.device_count()} device(s)"
    )
    print(header)
    for r in rows:
        r["overhead_ms"] = r.pop("assign_minus_scipy_ms")  # median of per-rep differences
        print(
            f"{r['batch']:>5} {r['problems']:>8} {r['mean_targets']:>7.1f} {r['scipy_ms']:>9.2f} "
            f"{r['assign_ms']:>9.2f} {r['overhead_ms']:>11.2f} {r['matching_ms']:>11.2f}"
        )

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "layers": LAYERS,
        "queries": QUERIES,
        "max_targets": MAX_TARGETS,
        "num_classes": NUM_CLASSES,
        "reps": args.reps,
        "seed": args.seed,
        "jax": jax.__version__,
        "scipy": scipy.__version__,
        "platform": jax.devices()[0].platform,
        "device_count": jax.device_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
