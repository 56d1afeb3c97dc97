"""Where the DETR-R50 training step's time goes: a jax.profiler trace, summed by part of the model.

Runs bench_vs_torch's `train_b2_512x512` step (converted HF weights, layers 2-4 trained,
the train step's CPU compiler options, freed host memory retained), traces `--steps` steps
with `jax.profiler` (a Perfetto trace under --trace_dir, viewable in ui.perfetto.dev) and
sums the duration of every XLA operation (thunk) by (region, pass, kind):

  region  backbone / transformer / other (projection, heads, loss) from the op's JAX name
          stack; update (optimizer, gradient norm: outside the differentiated function);
          "unattributed" for ops XLA left without a name (layout copies, mostly)
  pass    forward, or backward when the op stems from a transposed (VJP) computation
  kind    conv, conv weight-gradient (a convolution whose window is a whole activation map),
          dot, copy/transpose, elementwise and other

Durations are the wall time of each op on the thread that ran it; XLA runs independent ops
concurrently, so the sum can exceed the step time. Needs the `torch` extra (for the weights).

    python scripts/profile_train_step.py --steps 2 --trace_dir /tmp/detr_trace
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SKIPPED_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "CommonPjRt", "$")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """Compiled HLO text -> ({instruction: (opcode, op_name, called computation, line)},
    {computation: [instruction names]})."""
    instructions, computations, current = {}, {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
            continue
        inst = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if inst and current is not None:
            op_name = re.search(r'op_name="([^"]*)"', line)
            calls = re.search(r"calls=%([\w.\-]+)", line)
            instructions[inst.group(1)] = (inst.group(2), op_name.group(1) if op_name else "",
                                           calls.group(1) if calls else None, line)
            computations[current].append(inst.group(1))
    return instructions, computations


def classify(name: str, instructions: dict, computations: dict) -> tuple[str, str, str]:
    """(region, pass, kind) of the thunk `name` (a top-level instruction of the step)."""
    inst = instructions.get(name) or instructions.get(name.removeprefix("wrapped_"))
    if inst is None:
        return "unattributed", "forward", "other"
    members, pending = [inst], [inst[2]] if inst[2] else []
    while pending:  # the instructions of the fused computation (and of the ones it calls)
        for member in computations.get(pending.pop(), []):
            members.append(instructions[member])
            if instructions[member][2]:
                pending.append(instructions[member][2])
    opcodes = {m[0] for m in members}
    op_names = " ".join(m[1] for m in members)
    if "backbone" in op_names:
        region = "backbone"
    elif "transformer" in op_names:
        region = "transformer"
    elif "jvp(" in op_names or "transpose(" in op_names:
        region = "other"
    elif op_names.strip():
        region = "update"  # outside the differentiated function: optimizer, gradient norm
    else:
        region = "unattributed"
    backward = "transpose(" in op_names
    if "convolution" in opcodes:
        windows = [re.search(r"window=\{size=(\d+)x(\d+)", m[3]) for m in members if m[0] == "convolution"]
        if any(w and max(int(w.group(1)), int(w.group(2))) > 7 for w in windows):
            kind, backward = "conv weight-gradient", True
            region = "backbone" if region == "unattributed" else region
        else:
            kind = "conv"
    elif "dot" in opcodes:
        kind = "dot"
    elif opcodes <= {"copy", "transpose", "bitcast", "parameter", "fusion"} or "copy" in name or "transpose" in name:
        kind = "copy/transpose"
    else:
        kind = "elementwise/other"
    return region, "backward" if backward else "forward", kind


def summarize(trace_path: str, hlo_text: str, steps: int) -> list[tuple[tuple[str, str, str], float]]:
    """Milliseconds per step for each (region, pass, kind), largest first."""
    instructions, computations = parse_hlo(hlo_text)
    with gzip.open(trace_path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(SKIPPED_EVENTS):
            totals[classify(event["name"], instructions, computations)] += event["dur"] / 1e3 / steps
    return totals.most_common()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="traced steps (after 3 untraced ones)")
    parser.add_argument("--trace_dir", default="/tmp/detr_jax_train_step_trace")
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from detr_jax.runtime.host_memory import retain_freed_memory

    retain_freed_memory()
    import jax

    import bench_vs_torch as bench
    from detr_jax.convert import convert_state_dict
    from detr_jax.models import build_model

    config = bench.r50_config()
    variables, _ = convert_state_dict({k: v.numpy() for k, v in bench.hf_state_dict().items()}, config.model)
    step, state, batch = bench.jax_train_step(config, build_model(config.model), variables,
                                              bench.CASES["train_b2_512x512"])
    for _ in range(3):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    hlo_text = step.lower(state, batch).compile().as_text()
    jax.profiler.start_trace(args.trace_dir, create_perfetto_trace=True)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    trace_path = max(glob.glob(os.path.join(args.trace_dir, "plugins/profile/*/perfetto_trace.json.gz")),
                     key=os.path.getmtime)
    rows = summarize(trace_path, hlo_text, args.steps)
    print(f"step times {[round(t, 3) for t in times]} s (traced); trace: {trace_path}")
    print(f"{'ms/step':>8}  {'region':<13} {'pass':<9} kind")
    for (region, direction, kind), ms in rows:
        print(f"{ms:>8.1f}  {region:<13} {direction:<9} {kind}")
    print(f"{sum(ms for _, ms in rows):>8.1f}  total (ops may overlap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
