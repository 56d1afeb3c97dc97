"""Where the memory of the DETR-R50 training step goes: XLA's accounting against the process.

For each `--sizes` (batch `--batch`), the train step as `detr_jax.train.trainer.assemble` builds it
(DETR-R50, the default config: official parameter rules, AdamW, Hungarian matching on host):

  ours      XLA's `compiled.memory_analysis()` of the step: arguments (train state + batch),
            outputs, alias (outputs written into donated arguments), temporaries (every
            intermediate of forward, backward and update, packed by XLA's heap simulator),
            generated code; and the worker's resident set: after imports ("base"), with the
            state and batch built ("state"), its peak through compiling the step ("compile"),
            after the compiler's freed memory is given back as the training loop does
            (`detr_jax.train.trainer.compile_step`: "released"), its peak through `--steps` steps,
            measured from a reset of the kernel's high-water mark ("steps"), the whole
            process's peak ("peak"), and the median step time.
  hf-torch  Hugging Face transformers' DetrForObjectDetection (R50, native ResNet, random
            weights, official DETR's trained layers and AdamW groups), the same inputs and
            steps, run by scripts/bench_vs_torch.py's worker: its whole-process peak.

Then at `--sharded_size`, the step over `--devices` simulated CPU devices (global batch
`--devices` x `--sharded_batch_per_device`), compiled only, with train.param_sharding
"replicated" and "fsdp" (a row per `--fsdp_min_mib`): XLA's per-device sizes.

Each row runs in a fresh spawned process (its own peak), pinned to the same cores, keeping
freed host memory as `detr-jax train` does (`--host_malloc default`: glibc's own).

    python scripts/bench_memory.py                          # 2x384x384 and 2x512x512
    python scripts/bench_memory.py --sizes 512x512 --batch 4 --steps 2 --no_peer

Prints a table (MiB) and writes JSON (--out, default bench_results/bench_memory.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import bench_vs_torch
from bench_model_cost import machine, parse_size

MIB = 2**20
PEER_CASE = "bench_memory"  # the name this script's case has in the peer worker's bench_vs_torch.CASES
MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def status_mib(field: str) -> float:
    """A size from /proc/self/status ("VmRSS": resident now, "VmHWM": its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Restarts the kernel's resident high-water mark (VmHWM) from the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_mib(compiled) -> dict:
    """XLA's memory_analysis of a compiled executable, per device, in MiB."""
    stats = compiled.memory_analysis()
    return {name: getattr(stats, f"{name}_size_in_bytes") / MIB for name in MEMORY_FIELDS}


def case_of(size: tuple[int, int], batch: int) -> dict:
    """A training case in bench_vs_torch's terms (its `inputs` and workers take it)."""
    return dict(kind="train", batch=batch, height=size[0], width=size[1], train_backbone=True)


# ----------------------------------------------------------------------------- workers


def ours(size: tuple[int, int], batch: int, steps: int, cores, retain_host_memory: bool) -> dict:
    """Our step on one device: memory_analysis, resident set by phase, step time."""
    bench_vs_torch._setup_worker(cores, retain_host_memory)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from detr_jax.models import build_model, init_variables
    from detr_jax.train.trainer import compile_step

    base = status_mib("VmRSS")
    config = bench_vs_torch.r50_config()
    model = build_model(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0))
    step, state, inputs = bench_vs_torch.jax_train_step(config, model, variables, case_of(size, batch))
    del variables  # the state holds the parameters
    with_state = status_mib("VmRSS")
    compiled = compile_step(step, state, inputs)  # as the training loop does
    compile_peak, released = status_mib("VmHWM"), status_mib("VmRSS")
    reset_peak()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, inputs)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return {"who": "ours", "devices": 1, "param_sharding": config.train.param_sharding, "xla": memory_mib(compiled),
            "rss": {"base": base, "state": with_state, "compile": compile_peak, "released": released,
                    "steps": status_mib("VmHWM"), "peak": bench_vs_torch.peak_rss_mib()},
            "step_s": statistics.median(times), "times_s": times}


def ours_sharded(size: tuple[int, int], batch: int, devices: int, param_sharding: str, fsdp_min_mib: float,
                 cores) -> dict:
    """Our step over `devices` simulated CPU devices, compiled only: per-device memory_analysis."""
    os.sched_setaffinity(0, cores)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import numpy as np

    from detr_jax.runtime import sharding
    from detr_jax.train.trainer import assemble

    config = bench_vs_torch.r50_config()
    config.train.param_sharding, config.train.fsdp_min_mib = param_sharding, fsdp_min_mib
    mesh = sharding.make_mesh()
    run = assemble(config, mesh, 1000)
    images, mask, labels, boxes = bench_vs_torch.inputs(case_of(size, batch))
    inputs = sharding.global_batch({"image": images, "mask": mask, "labels": labels, "boxes": boxes,
                                    "valid": np.ones(labels.shape, bool)}, mesh)
    compiled = run.step.lower(run.abstract_state, inputs).compile()
    label = f"{param_sharding} >= {fsdp_min_mib:g} MiB" if param_sharding == "fsdp" else param_sharding
    return {"who": "ours", "devices": devices, "param_sharding": label, "xla": memory_mib(compiled)}


def peer(conn, size: tuple[int, int], batch: int, weights: str, cores, retain_host_memory: bool) -> None:
    """bench_vs_torch's PyTorch worker on this script's case (registered in this process)."""
    bench_vs_torch.CASES[PEER_CASE] = case_of(size, batch)
    bench_vs_torch.torch_worker(conn, PEER_CASE, weights, cores, "cpu", retain_host_memory, False)


def run_peer(size, batch: int, steps: int, weights: str, cores, retain_host_memory: bool) -> dict:
    """Drives `peer` as bench_vs_torch does: a first call, `steps` timed calls, its peak."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=peer, args=(child, size, batch, weights, cores, retain_host_memory), daemon=True)
    process.start()
    try:
        kind, value = parent.recv()
        times = []
        for _ in range(steps if kind != "error" else 0):
            parent.send("run")
            kind, value = parent.recv()
            if kind == "error":
                break
            times.append(value)
        if kind == "error":
            return {"who": "hf-torch", "error": value}
        parent.send("stop")
        _, peak = parent.recv()
    finally:
        process.join()
    return {"who": "hf-torch", "devices": 1, "rss": {"peak": peak}, "step_s": statistics.median(times),
            "times_s": times}


def in_fresh_process(fn, *args) -> dict:
    """`fn(*args)` in a spawned process of its own; a failure becomes {"error": ...}."""
    with mp.get_context("spawn").Pool(1) as pool:
        try:
            return pool.apply(fn, args)
        except Exception as e:  # noqa: BLE001 -- a failed row is reported, the others still run
            return {"who": "ours", "error": f"{type(e).__name__}: {str(e)[:300]}"}


# ----------------------------------------------------------------------------- report


def _fmt(value) -> str:
    return "" if value is None else f"{value:.0f}"


def format_table(rows: list[dict]) -> str:
    head = ("| case | who | devices | params | XLA argument | output | alias | temp | code "
            "| RSS base | state | compile peak | released | steps peak | process peak | step s |")
    lines = [head, "|---|---|--:|---|" + "--:|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['who']} | failed: {r['error'][:120]} |")
            continue
        xla, rss = r.get("xla", {}), r.get("rss", {})
        step = f"{r['step_s']:.2f}" if "step_s" in r else ""
        lines.append(f"| {r['case']} | {r['who']} | {r['devices']} | {r.get('param_sharding', '')} | "
                     + " | ".join(_fmt(xla.get(k)) for k in MEMORY_FIELDS) + " | "
                     + " | ".join(_fmt(rss.get(k)) for k in ("base", "state", "compile", "released", "steps", "peak"))
                     + f" | {step} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(384, 384), (512, 512)],
                        help="HxW of the training images (default 384x384 512x512)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="steps run after the compile (default 3)")
    parser.add_argument("--devices", type=int, default=8, help="simulated devices of the sharded rows (0: none)")
    parser.add_argument("--sharded_size", type=parse_size, default=(512, 512), help="HxW of the sharded rows")
    parser.add_argument("--sharded_batch_per_device", type=int, default=1)
    parser.add_argument("--fsdp_min_mib", type=float, nargs="+", default=[4.0, 0.0],
                        help="train.fsdp_min_mib of the fsdp rows, one row each (default: 4, the config's, "
                             "and 0, every array split)")
    parser.add_argument("--no_peer", action="store_true", help="skip Hugging Face's PyTorch DETR")
    parser.add_argument("--threads", type=int, default=None, help="cores to pin every worker to (default: all)")
    parser.add_argument("--host_malloc", choices=("retain", "default"), default="retain",
                        help="retain: keep freed host memory (detr_jax.runtime.host_memory, what `detr-jax train` does)")
    parser.add_argument("--out", default="bench_results/bench_memory.json")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")

    cores = sorted(os.sched_getaffinity(0))[: args.threads or None]
    retain = args.host_malloc == "retain"
    load_before = os.getloadavg()
    rows = []

    def add(row: dict, case: str) -> None:
        rows.append({"case": case, **row})
        print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "hf_detr_r50.pt")
        if not args.no_peer:
            bench_vs_torch.make_weights(weights)
        for size in args.sizes:
            case = f"train {args.batch}x{size[0]}x{size[1]}"
            print(f"running {case} ...", file=sys.stderr, flush=True)
            add(in_fresh_process(ours, size, args.batch, args.steps, cores, retain), case)
            if not args.no_peer:
                add(run_peer(size, args.batch, args.steps, weights, cores, retain), case)
    if args.devices:
        batch = args.devices * args.sharded_batch_per_device
        h, w = args.sharded_size
        for mode, min_mib in [("replicated", 0.0)] + [("fsdp", m) for m in args.fsdp_min_mib]:
            add(in_fresh_process(ours_sharded, args.sharded_size, batch, args.devices, mode, min_mib, cores),
                f"train {batch}x{h}x{w} compiled only")

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "batch": args.batch, "steps": args.steps,
              "host_malloc": args.host_malloc, "machine": {**bench_vs_torch.versions(), **machine(cores)},
              "load_average": {"before": load_before, "after": os.getloadavg()}, "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
