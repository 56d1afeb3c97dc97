"""Where Deformable DETR-R50's time goes, ours and Hugging Face's, by operator class.

Runs one case of scripts/bench_deformable_vs_torch.py (the same weights and inputs) on one
side and profiles `--steps` calls after `--warmup` untraced ones:

  --side jax    a jax.profiler trace; every XLA op's duration summed by (region, pass, kind)
                as scripts/profile_train_step.py does (its parse_hlo / classify), with one
                more region: "deformable sampling", the ops of the deformable attention's
                sampling (`ms_deform_attn_sample`: its per-level scan, gathers, weights)
                (the operator's cases: the operator alone)
  --side torch  torch.profiler's self CPU time per aten operator (grid_sample, convolution,
                addmm, ...), largest first

Durations are per call; XLA runs independent ops concurrently, so its sum can exceed the
call's time.

    python scripts/profile_deformable.py --case infer_b1_800x1216 --side jax
    python scripts/profile_deformable.py --case train_b2_512x512 --side torch --steps 1
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_deformable_vs_torch as bench  # noqa: E402
from profile_train_step import SKIPPED_EVENTS, classify, parse_hlo  # noqa: E402

SAMPLING_NAMES = ("ms_deform_attn_sample", "sample_level")


def jax_profile(case: dict, weights: str, steps: int, warmup: int, trace_dir: str) -> list:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from detr_jax.runtime.host_memory import retain_freed_memory

    retain_freed_memory()
    import jax
    import torch

    from detr_jax.convert import convert_state_dict
    from detr_jax.models import build_model

    if case["kind"] == "op":
        fn, args = bench.jax_op(case)
        args = list(args)
    else:
        config = bench.our_config(False)
        variables, _ = convert_state_dict({k: v.numpy() for k, v in torch.load(weights, weights_only=True).items()},
                                          config.model)
        model = build_model(config.model)
        if case["kind"] == "infer":
            images, mask, _, _ = bench.inputs(case)
            fn = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))
            args = [jax.device_put(variables), jax.device_put(images), jax.device_put(mask)]
        else:
            fn, state, batch = bench.jax_train_step(config, model, variables, case)
            args = [state, batch]

    def call():
        if case["kind"] != "train":
            return jax.block_until_ready(fn(*args))
        args[0], metrics = fn(*args)
        return jax.block_until_ready(metrics)
    for _ in range(warmup):
        call()
    hlo_text = fn.lower(*args).compile().as_text()
    instructions, computations = parse_hlo(hlo_text)
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    print(f"call times {[round(t, 3) for t in times]} s (traced)")
    path = max(glob.glob(os.path.join(trace_dir, "plugins/profile/*/perfetto_trace.json.gz")), key=os.path.getmtime)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace

    def is_sampling(name: str) -> bool:
        inst = instructions.get(name) or instructions.get(name.removeprefix("wrapped_"))
        if inst is None:
            return False
        members, pending = [inst], [inst[2]] if inst[2] else []
        while pending:
            for member in computations.get(pending.pop(), []):
                members.append(instructions[member])
                if instructions[member][2]:
                    pending.append(instructions[member][2])
        return any(s in m[1] for m in members for s in SAMPLING_NAMES)

    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(SKIPPED_EVENTS):
            region, direction, kind = classify(event["name"], instructions, computations)
            if is_sampling(event["name"]):
                region = "deformable sampling"
            totals[(region, direction, kind)] += event["dur"] / 1e3 / steps
    return [(" / ".join(key), ms) for key, ms in totals.most_common()]


def torch_profile(case: dict, weights: str, steps: int, warmup: int) -> list:
    import torch

    call = bench.hf_runner(case, weights, tiny=False, compiled=False)  # the benchmark's HF eager call
    for _ in range(warmup):
        call()
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    print(f"call times {[round(t, 3) for t in times]} s (profiled)")
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="infer_b1_800x1216", choices=list(bench.CASES),
                        help="the benchmark's cases (the operator's: --side jax only)")
    parser.add_argument("--side", choices=("jax", "torch"), default="jax")
    parser.add_argument("--steps", type=int, default=2, help="profiled calls")
    parser.add_argument("--warmup", type=int, default=2, help="untraced calls before (the first compiles)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace_dir", default="/tmp/detr_jax_deformable_trace")
    args = parser.parse_args()

    case = bench.case_spec(args.case, False)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "hf.pt")
        if case["kind"] != "op":
            bench.make_weights(weights, False)
        if args.side == "jax":
            rows = jax_profile(case, weights, args.steps, args.warmup, args.trace_dir)
        else:
            rows = torch_profile(case, weights, args.steps, args.warmup)
    total = sum(ms for _, ms in rows)
    print(f"{'ms/call':>9} {'share':>6}  {'region / pass / kind' if args.side == 'jax' else 'aten operator (self)'}")
    for name, ms in rows[: args.top]:
        print(f"{ms:>9.1f} {ms / total:>6.1%}  {name}")
    print(f"{total:>9.1f}         total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
