"""Our DETR-R50 training step (bench_vs_torch's train_b2_512x512) timed alone in one process.

`bench_vs_torch.py` runs the frameworks in worker processes that take turns; this script
times the same step with nothing else alive, counts the minor page faults per step, and can
vary what was suspected of slowing it down: glibc's malloc handing large blocks back to the
kernel (`--host_malloc default`: every step faults its buffers in again), the weights'
values, subnormal arithmetic, idle time between steps (a machine that pages out idle memory).

    python scripts/bench_train_step_solo.py                      # converted HF weights
    python scripts/bench_train_step_solo.py --weights normal     # N(0, 0.02) weights
    python scripts/bench_train_step_solo.py --flush_denormal     # FTZ/DAZ on every thread
    python scripts/bench_train_step_solo.py --idle 2             # sleep 2 s before each step
    python scripts/bench_train_step_solo.py --host_malloc default  # glibc's malloc as it is

Needs the `torch` extra (the weights are HF DETR's random init, converted). Prints one line.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", choices=("hf", "normal"), default="hf")
    parser.add_argument("--flush_denormal", action="store_true",
                        help="set FTZ/DAZ before JAX creates its threads (which inherit it)")
    parser.add_argument("--idle", type=float, default=0.0, help="seconds to sleep before each timed step")
    parser.add_argument("--host_malloc", choices=("retain", "default"), default="retain",
                        help="retain: keep freed host memory, as `detr-jax train` does (detr_jax.runtime.host_memory)")
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.host_malloc == "retain":
        from detr_jax.runtime.host_memory import retain_freed_memory

        retain_freed_memory()
    import torch

    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("this CPU does not support flushing denormals")
    import jax
    import numpy as np

    import bench_vs_torch as bench
    from detr_jax.convert import convert_state_dict
    from detr_jax.models import build_model

    case = bench.CASES["train_b2_512x512"]
    config = bench.r50_config()
    state_dict = {k: v.numpy() for k, v in bench.hf_state_dict().items()}
    variables, _ = convert_state_dict(state_dict, config.model)
    if args.weights == "normal":
        rng = np.random.default_rng(0)
        variables["params"] = jax.tree.map(lambda x: (rng.normal(size=x.shape) * 0.02).astype(np.float32),
                                           variables["params"])
    model = build_model(config.model)
    step, state, batch = bench.jax_train_step(config, model, variables, case)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.reps):
        time.sleep(args.idle)
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.reps
    print(f"train_b2_512x512 alone: weights={args.weights} flush_denormal={args.flush_denormal} idle={args.idle}s "
          f"host_malloc={args.host_malloc} "
          f"first call {first:.1f} s, median {statistics.median(times):.3f} s, times {[round(t, 3) for t in times]}, "
          f"{faults:,.0f} minor page faults per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
