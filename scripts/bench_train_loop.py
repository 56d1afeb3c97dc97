"""The training loop's step time with the steps queued ahead or run one at a time.

Runs the real input pipeline and train step of a config (default `synthetic_tiny`), as
`detr-jax train` does, in rounds that alternate two ways of driving it:
  ahead       dispatch the next step before the current one finishes (JAX's asynchronous
              dispatch; what the loop does on accelerators)
  wait        block until each step has finished (what the loop does on CPU, see
              detr_jax.train.trainer.dispatch_ahead)
and prints the time per step, the minor page faults and the kernel (system) CPU time per
step of each, plus the input pipeline alone. Freed host memory is retained as in
`detr-jax train`. Prints a table and writes JSON.

    python scripts/bench_train_loop.py --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def measure(run_steps, steps: int) -> dict:
    """Runs `run_steps(steps)`; returns ms, page faults and system CPU ms per step."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run_steps(steps)
    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {"ms_per_step": elapsed / steps * 1e3,
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "system_ms_per_step": (after.ru_stime - before.ru_stime) / steps * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic_tiny")
    parser.add_argument("--steps", type=int, default=40, help="steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench_results/bench_train_loop.json")
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from detr_jax.config import config_from_args
    from detr_jax.runtime.cpu_info import cpu_info
    from detr_jax.runtime.host_memory import retain_freed_memory

    config = config_from_args(args.config, {})
    if config.train.retain_host_memory:
        retain_freed_memory()
    import jax
    from bench_scaling import config_train_step

    from detr_jax.data.pipeline import make_train_iterator
    from detr_jax.runtime.sharding import global_batch

    mesh, step, state = config_train_step(config)
    holder = {"state": state}
    data = make_train_iterator(config.data, config.train.batch_size, config.seed)

    def run(wait: bool):
        def run_steps(n):
            outputs = []
            for _ in range(n):
                holder["state"], metrics = step(holder["state"], global_batch(next(data), mesh))
                if wait:
                    jax.block_until_ready(metrics)
                outputs.append(metrics)
            jax.block_until_ready(outputs)
        return run_steps

    def input_only(n):
        for _ in range(n):
            next(data)

    modes = {"ahead": run(False), "wait": run(True), "input pipeline alone": input_only}
    run(True)(3)  # compile and warm up
    results = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            results[name].append(measure(fn, args.steps))
    summary = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
    print(f"{args.config}, batch {config.train.batch_size}, {jax.device_count()} device(s), "
          f"medians of {args.rounds} rounds of {args.steps} steps")
    print(f"{'mode':<22} {'ms/step':>8} {'page faults/step':>17} {'system ms/step':>15}")
    for name, s in summary.items():
        print(f"{name:<22} {s['ms_per_step']:>8.1f} {s['faults_per_step']:>17,.0f} {s['system_ms_per_step']:>15.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": args.config, "date": time.strftime("%Y-%m-%d %H:%M"), "jax": jax.__version__,
                   "cpu": cpu_info(), "cpu_count": os.cpu_count(), "steps": args.steps, "rounds": args.rounds,
                   "summary": summary, "rounds_detail": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
