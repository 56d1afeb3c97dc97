"""Train-step time against image size and batch size, with compile count and compile time.

Every (batch, size) pair is a new input shape, so a new XLA compilation: the table shows
what a bucket costs to compile and what it costs per step, which is what choosing
`data.bucket_shapes` trades off. The step is the real training step (forward, loss with
Hungarian matching, backward, AdamW), on the model's initial weights (as `detr-jax train`
starts) and random targets.
Compilations are counted by JAX itself (its backend-compile events), so a shape that
compiles twice, or a step that recompiles, shows in the count.

    python scripts/bench_scaling.py                                  # the tiny config
    python scripts/bench_scaling.py --config detr_r50_coco --sizes 384 512 --batches 1 2

Writes a table to stdout and JSON to --out (default bench_results/bench_scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from detr_jax.config import config_from_args
from detr_jax.runtime.host_memory import retain_freed_memory
from detr_jax.runtime.cpu_info import cpu_info
from detr_jax.runtime.sharding import global_batch, make_mesh
from detr_jax.train.trainer import assemble


def random_batch(batch: int, size: int, num_classes: int, max_boxes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.25, 0.75, size=(batch, max_boxes, 2))
    sizes = rng.uniform(0.1, 0.4, size=(batch, max_boxes, 2))
    return {
        "image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
        "mask": np.ones((batch, size, size), bool),
        "labels": rng.integers(1, num_classes, size=(batch, max_boxes)).astype(np.int32),
        "boxes": np.concatenate([centers, sizes], -1).astype(np.float32),
        "valid": np.arange(max_boxes)[None].repeat(batch, 0) < rng.integers(1, max_boxes + 1, size=(batch, 1)),
    }


def config_train_step(config):
    """(mesh, jitted train step, initial train state) of `config`, built as `detr-jax train` does."""
    mesh = make_mesh()
    run = assemble(config, mesh, 1000)
    return mesh, run.step, run.initial_state(config)


class CompileCounter:
    """Counts XLA backend compilations (JAX's "backend_compile" duration events)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event.endswith("backend_compile_duration"):
            self.count += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="synthetic_tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default="bench_results/bench_scaling.json")
    args = parser.parse_args()

    config = config_from_args(args.config, {})
    if config.train.retain_host_memory:  # as `detr-jax train` does
        retain_freed_memory()
    mesh, step, state = config_train_step(config)
    compiles = CompileCounter()

    rows = []
    for batch_size in args.batches:
        for size in args.sizes:
            batch = global_batch(random_batch(batch_size, size, config.model.num_classes, config.data.max_boxes), mesh)
            before = compiles.count
            start = time.perf_counter()
            compiled = step.lower(state, batch).compile()
            compile_s = time.perf_counter() - start
            step_compiles = compiles.count - before
            state, metrics = compiled(state, batch)  # warm-up
            jax.block_until_ready(metrics)
            before = compiles.count
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics["loss"])
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            recompiles = compiles.count - before
            rows.append(dict(batch=batch_size, size=size, compile_s=compile_s, compilations=step_compiles,
                             recompilations_while_timed=recompiles, step_median_s=median,
                             images_per_s=batch_size / median))
            print(f"batch {batch_size:3d}  {size:4d}x{size:<4d}  {step_compiles} compile(s) {compile_s:6.1f} s  "
                  f"step {median * 1000:8.1f} ms  {batch_size / median:7.1f} img/s"
                  + (f"  ({recompiles} recompilations while timed!)" if recompiles else ""), flush=True)
    report = dict(config=args.config, date=time.strftime("%Y-%m-%d %H:%M"), devices=jax.device_count(),
                  platform=jax.devices()[0].platform, cpu=cpu_info(), cpu_count=os.cpu_count(), jax=jax.__version__,
                  load_average=os.getloadavg(), compilations=sum(r["compilations"] for r in rows),
                  total_compile_s=sum(r["compile_s"] for r in rows), rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{report['compilations']} train-step compilations for {len(rows)} shapes, "
          f"{report['total_compile_s']:.0f} s compiling in total; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
