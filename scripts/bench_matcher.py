"""Times the Hungarian matching: scipy on host (the default) against the exact solver on
device, alone and as a share of the whole training step.

Matching alone, for each batch size, at the shapes of --shapes (SHAPES): "detr" (the
default) 6 decoder layers x 100 queries, DETR's softmax class cost; "dino" DINO-R50's 900
queries x (6 decoder layers + the `enc` branch's selected proposals: 7 problems per image),
the sigmoid focal class cost and DINO's cost weights 2 / 5 / 2 (its `dn` branch is matched
by construction: no solver); up to 50 targets per image (random valid counts, COCO's
range), 91 classes, random predictions. Median over --reps after warm-up, the
functions timed in turn within each repetition (`interleaved_medians`):
  scipy:    a NumPy loop of scipy.optimize.linear_sum_assignment over the (layer, image)
            cost matrices, restricted to the valid targets, on host (the floor);
  assign:   the jitted `detr_jax.criterion.matcher.assign` (the one pure_callback) on the same
            cost matrices, already on device; overhead = median over repetitions of
            (assign - scipy);
  matching: the jitted `HungarianMatcher` (cost on device + the callback) from predictions;
  device:   the jitted `HungarianMatcher(solver=assign_on_device)` (cost + optax's exact
            Hungarian solver, all inside the program) on the same predictions.
Both matchers are exact, so their total matched cost per (layer, image) must agree (ties
may give other assignments): the largest |difference| is printed.

In the training step, for each batch size: the default config's (`detr-jax train`'s,
--config) jitted train step from `detr_jax.train.trainer.assemble`, once with
loss.matcher="hungarian" and once with "hungarian_device", on one fixed batch from the
config's own input pipeline (`make_train_iterator`, `sharding.global_batch`), the two timed
in turn from the model's initial weights; and the criterion's own matcher (per device, as
in the step, with the step's compiler options) jitted alone on the model's predictions for
that batch. share = that matching time / the step time; the step-time difference
(device - host) is printed too, with each step's minor page faults, as the matcher changes
more than the matching: on CPU a program with a host callback runs synchronously in the
calling thread, one without runs on a worker thread, whose malloc arena
`detr_jax.runtime.host_memory.retain_freed_memory` does not reach (MALLOC_ARENA_MAX=1 does).
--xla-defaults compiles the steps without the train step's CPU compiler options
(`detr_jax.train.trainer.CPU_TRAIN_COMPILER_OPTIONS`). --step-reps 0 skips the train step.

  python scripts/bench_matcher.py [--batch-sizes 8 32 128] [--reps 50] [--step-reps N]
                                  [--config synthetic_tiny] [--xla-defaults] [--out PATH]
  python scripts/bench_matcher.py --shapes dino --batch-sizes 2 8 --reps 5 --step-reps 0

Prints one table and writes JSON to --out (default bench_results/bench_matcher.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy
import scipy.optimize

from detr_jax.runtime import sharding
from detr_jax.runtime.cpu_info import cpu_info
from detr_jax.train import trainer as train
from detr_jax.config import config_from_args
from detr_jax.data.pipeline import make_source, make_train_iterator, steps_per_epoch
from detr_jax.runtime.host_memory import retain_freed_memory
from detr_jax.criterion.class_convention import SigmoidFocal, SoftmaxNoObject
from detr_jax.criterion.matcher import HungarianMatcher, assign, assign_on_device, matching_cost

MAX_TARGETS, NUM_CLASSES = 50, 91
# The matching problems per image (decoder layers, plus DINO's enc branch), the queries, the
# class convention and the cost weights of each model.
SHAPES = {
    "detr": dict(layers=6, queries=100, classes=SoftmaxNoObject(), costs={}),
    "dino": dict(layers=7, queries=900, classes=SigmoidFocal(), costs=dict(cost_class=2.0)),
}
MATCHER_NAMES = {"host": "hungarian", "device": "hungarian_device"}


def make_inputs(rng, batch, shapes):
    layers, queries, classes = shapes["layers"], shapes["queries"], shapes["classes"]
    logits = rng.normal(size=(layers, batch, queries, classes.num_logits(NUM_CLASSES))).astype(np.float32)
    pred_boxes = rng.uniform(0.05, 0.95, size=(layers, batch, queries, 4)).astype(np.float32)
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


def matched_cost(cost: np.ndarray, target_to_query: np.ndarray) -> np.ndarray:
    """[L, B] total cost of a matching (target_to_query [L, B, M], -1 = unmatched)."""
    matched = target_to_query >= 0
    picked = np.take_along_axis(cost, np.maximum(target_to_query, 0)[..., None, :], axis=-2)[..., 0, :]
    return np.where(matched, picked, 0.0).sum(-1)


def compare(cost, valid, host, device) -> dict:
    """How far the device matching is from the host one (both exact: equal total costs)."""
    cost = np.asarray(cost, np.float64)
    host_t2q, device_t2q = np.asarray(host.target_to_query), np.asarray(device.target_to_query)
    valid = np.broadcast_to(np.asarray(valid, bool), host_t2q.shape)
    return {
        "max_abs_cost_diff": float(np.abs(matched_cost(cost, host_t2q) - matched_cost(cost, device_t2q)).max()),
        "problems_assigned_differently": int((host_t2q != device_t2q).any(-1).sum()),
        "unmatched_valid_host": int((valid & (host_t2q < 0)).sum()),
        "unmatched_valid_device": int((valid & (device_t2q < 0)).sum()),
    }


def bench_matching(batch, reps, rng, shapes) -> dict:
    """The matching alone at the `shapes` (a SHAPES entry) of a model."""
    logits, pred_boxes, labels, boxes, valid = make_inputs(rng, batch, shapes)
    settings = dict(classes=shapes["classes"], **shapes["costs"])
    cost = jax.jit(functools.partial(matching_cost, **settings))(logits, pred_boxes, labels, boxes)
    valid_lbm = jnp.broadcast_to(valid, (shapes["layers"],) + valid.shape)
    cost_host, valid_host = np.asarray(cost), np.asarray(valid)

    assign_jit = jax.jit(assign)
    matcher_jit = jax.jit(HungarianMatcher(**settings))
    device_jit = jax.jit(HungarianMatcher(solver=assign_on_device, **settings))
    inputs = (logits, pred_boxes, labels, boxes, valid)
    timings = interleaved_medians(
        {
            "scipy": lambda: scipy_loop(cost_host, valid_host),
            "assign": lambda: jax.block_until_ready(assign_jit(cost, valid_lbm)),
            "matching": lambda: jax.block_until_ready(matcher_jit(*inputs)),
            "device": lambda: jax.block_until_ready(device_jit(*inputs)),
        },
        reps,
    )
    timings["overhead_ms"] = timings.pop("assign_minus_scipy_ms")
    timings.pop("matching_minus_scipy_ms")
    timings.pop("device_minus_scipy_ms")
    return {
        "problems": shapes["layers"] * batch,
        "mean_targets": float(valid_host.sum(1).mean()),
        **timings,
        **compare(cost_host, valid_lbm, matcher_jit(*inputs), device_jit(*inputs)),
    }


def bench_step(config_arg, batch, reps) -> dict:
    """The config's train step with either matcher, and the criterion's matching alone."""
    mesh = sharding.make_mesh()
    configs = {kind: config_from_args(config_arg, {"train.batch_size": batch, "loss.matcher": name})
               for kind, name in MATCHER_NAMES.items()}
    config = configs["host"]
    source = make_source(config.data, "train")
    for c in configs.values():
        train.resolve_num_classes(c, source)
    iterator = make_train_iterator(config.data, batch, config.seed, source=source)
    batch_arrays = sharding.global_batch(next(iterator), mesh)
    updates = max(1, steps_per_epoch(len(source), batch) // config.train.grad_accum_steps)
    runs = {kind: train.assemble(c, mesh, updates) for kind, c in configs.items()}
    states = {kind: runs[kind].initial_state(c) for kind, c in configs.items()}

    # What the step's criterion matches: the supervised layers of the model's predictions.
    run = runs["host"]
    outputs = jax.jit(lambda variables, image, mask: run.model.apply(variables, image, mask, train=False))(
        states["host"].variables, batch_arrays["image"], batch_arrays["mask"])
    supervised = run.criterion.supervised_layers(outputs)
    match_args = (supervised["pred_logits"], supervised["pred_boxes"], batch_arrays["labels"].astype(jnp.int32),
                  batch_arrays["boxes"], batch_arrays["valid"].astype(bool))
    options = train.train_compiler_options(mesh)
    matchers = {kind: jax.jit(r.criterion.matcher, compiler_options=options) for kind, r in runs.items()}
    loss = config.loss
    matcher = HungarianMatcher.from_config(loss)
    cost = matching_cost(*match_args[:4], cost_class=matcher.cost_class, cost_bbox=matcher.cost_bbox,
                         cost_giou=matcher.cost_giou)
    check = compare(cost, match_args[4], matchers["host"](*match_args), matchers["device"](*match_args))

    first_step_s = {}
    for kind, r in runs.items():  # compile + first step, outside the timing
        start = time.perf_counter()
        states[kind], metrics = r.step(states[kind], batch_arrays)
        jax.block_until_ready(metrics)
        first_step_s[kind] = time.perf_counter() - start

    faults = {kind: [0, 0] for kind in runs}  # minor page faults, steps

    def step(kind):
        def fn():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            states[kind], metrics = runs[kind].step(states[kind], batch_arrays)
            # The whole output: a step without a host callback runs asynchronously, and its
            # update would otherwise overlap whatever is timed next.
            jax.block_until_ready((states[kind], metrics))
            faults[kind][0] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            faults[kind][1] += 1
        return fn

    # Apart: a step's tail (freeing its buffers) can still run beside what is timed next.
    timings = interleaved_medians(
        {kind: lambda m=matcher: jax.block_until_ready(m(*match_args)) for kind, matcher in matchers.items()},
        reps,
    )
    timings = {"match_host_ms": timings["host_ms"], "match_device_ms": timings["device_ms"]}
    timings.update(interleaved_medians({"step_host": step("host"), "step_device": step("device")}, reps, warmup=1))
    return {
        "step_shapes": dict(zip(("layers", "batch", "queries", "logits"), supervised["pred_logits"].shape),
                            max_targets=int(match_args[2].shape[-1]),
                            mean_targets=float(np.asarray(match_args[4]).sum(-1).mean()),
                            image=list(batch_arrays["image"].shape[1:]),
                            image_dtype=str(batch_arrays["image"].dtype)),
        "first_step_s": first_step_s,
        **timings,
        "minor_faults_per_step": {kind: f / n for kind, (f, n) in faults.items()},
        "share_host": timings["match_host_ms"] / timings["step_host_ms"],
        "share_device": timings["match_device_ms"] / timings["step_device_ms"],
        "step_check": check,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", choices=list(SHAPES), default="detr",
                        help="the matching alone at DETR-R50's or DINO-R50's shapes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--reps", type=int, default=50, help="timed repetitions of the matching alone (median)")
    parser.add_argument("--step-reps", type=int, default=None,
                        help="timed repetitions of the train steps (default: --reps; 0: no train step)")
    parser.add_argument("--config", default="synthetic_tiny",
                        help="the train step's config (detr-jax train's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--xla-defaults", action="store_true",
                        help="compile the train steps without the CPU train compiler options")
    parser.add_argument("--out", default="bench_results/bench_matcher.json")
    args = parser.parse_args()
    if args.xla_defaults:  # make_train_step (and the matching alone) then get XLA's defaults
        train.train_compiler_options = lambda mesh: None
    step_reps = args.reps if args.step_reps is None else args.step_reps
    shapes = SHAPES[args.shapes]

    load_before = os.getloadavg()
    # As `detr-jax train` does.
    retained = config_from_args(args.config).train.retain_host_memory and retain_freed_memory()
    rng = np.random.default_rng(args.seed)
    rows = []
    for batch in args.batch_sizes:
        row = {"batch": batch, "loadavg_1m": os.getloadavg()[0]}
        row.update(bench_matching(batch, args.reps, rng, shapes))
        if step_reps:
            row["step"] = bench_step(args.config, batch, step_reps)
            faults = row["step"]["minor_faults_per_step"]
            print(f"batch {batch}: minor page faults per step {faults['host']:.0f} (host matcher), "
                  f"{faults['device']:.0f} (device matcher)", flush=True)
        rows.append(row)
    load_after = os.getloadavg()

    header = (f"\nmatching alone ({args.shapes}): {shapes['layers']} problems per image x {shapes['queries']} "
              f"queries, up to {MAX_TARGETS} targets, median of {args.reps}")
    if step_reps:
        step_shapes = rows[0]["step"]["step_shapes"]
        header += (f"; train step: {args.config} ({step_shapes['layers']} layers x {step_shapes['queries']} queries, "
                   f"up to {step_shapes['max_targets']} targets, {step_shapes['image'][0]}x{step_shapes['image'][1]} "
                   f"images), median of {step_reps}{', XLA defaults' if args.xla_defaults else ''}")
    print(f"{header}; {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    step_header = (f" | {'train step (ms)':^23} | {'matching in step':^33}", f" | {'host':>7} {'device':>7} "
                   f"{'dev-host':>7} | {'host ms':>7} {'share':>6} {'dev ms':>7} {'share':>6} {'|diff|':>6}")
    print(f"{'':>5} | {'matching alone (ms)':^37}{step_header[0] if step_reps else ''}\n"
          f"{'batch':>5} | {'scipy':>6} {'host':>7} {'device':>7} {'dev/host':>8} {'|diff|':>6}"
          f"{step_header[1] if step_reps else ''}")
    for r in rows:
        line = (f"{r['batch']:>5} | {r['scipy_ms']:>6.1f} {r['matching_ms']:>7.1f} {r['device_ms']:>7.1f} "
                f"{r['device_ms'] / r['matching_ms']:>8.1f} {r['max_abs_cost_diff']:>6.0e}")
        if step_reps:
            s = r["step"]
            line += (f" | {s['step_host_ms']:>7.1f} {s['step_device_ms']:>7.1f} "
                     f"{s['step_device_minus_step_host_ms']:>7.1f} | {s['match_host_ms']:>7.2f} "
                     f"{s['share_host']:>6.1%} {s['match_device_ms']:>7.2f} {s['share_device']:>6.1%} "
                     f"{s['step_check']['max_abs_cost_diff']:>6.0e}")
        print(line)
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "shapes": args.shapes,
        "layers": shapes["layers"],
        "queries": shapes["queries"],
        "max_targets": MAX_TARGETS,
        "num_classes": NUM_CLASSES,
        "config": args.config,
        "reps": args.reps,
        "step_reps": step_reps,
        "step_compiler_options": train.train_compiler_options(sharding.make_mesh()),
        "seed": args.seed,
        "jax": jax.__version__,
        "scipy": scipy.__version__,
        "platform": jax.devices()[0].platform,
        "device_count": jax.device_count(),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "retain_freed_memory": retained,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
