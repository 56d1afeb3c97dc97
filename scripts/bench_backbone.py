"""The ResNet-50 backbone alone: our forward and forward + backward against the PyTorch peer's.

Splits the training step of `bench_vs_torch.py` (train_b2_512x512) to show where the time
goes: the backbone's forward, and its forward + backward with layers 2-4 trained (the stem
and layer1 frozen, as official DETR; the loss is the sum of the last feature map). Ours is
jitted with the train step's CPU compiler options; the peer is Hugging Face DETR's backbone
(`model.model.backbone`, eager), with the same (converted) weights. Both run in this one
process, in turns, with freed host memory retained (as `detr-jax train` does) and the same
thread count.

    python scripts/bench_backbone.py --reps 5

Needs the `torch` extra. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="bench_results/bench_backbone.json")
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from detr_jax.runtime.host_memory import retain_freed_memory

    retain_freed_memory()
    import jax
    import numpy as np
    import torch

    import bench_vs_torch as bench
    from detr_jax.convert import convert_state_dict
    from detr_jax.models import build_model
    from detr_jax.train.optim import frozen_mask
    from detr_jax.train.trainer import CPU_TRAIN_COMPILER_OPTIONS, stop_frozen_gradients

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    case = bench.CASES["train_b2_512x512"]
    config = bench.r50_config()
    state_dict = bench.hf_state_dict()
    hf = bench.build_hf(aux_loss=True)
    hf.load_state_dict(state_dict)
    variables, _ = convert_state_dict({k: v.numpy() for k, v in state_dict.items()}, config.model)
    images, mask, _, _ = bench.inputs(case)

    # Ours: the backbone module of DETR, with DETR's parameter subtree.
    backbone = build_model(config.model).backbone
    frozen = frozen_mask(variables["params"], config.train.param_rules)["backbone"]
    params, frozen_bn = variables["params"]["backbone"], variables["frozen_bn"]["backbone"]

    def loss(params, x, mask):
        params = stop_frozen_gradients(params, frozen)
        return backbone.apply({"params": params, "frozen_bn": frozen_bn}, x, mask).features.sum()

    ours_fwd = jax.jit(loss, compiler_options=CPU_TRAIN_COMPILER_OPTIONS)
    ours_grad = jax.jit(jax.grad(loss), compiler_options=CPU_TRAIN_COMPILER_OPTIONS)

    # The peer: layers 2-4 trainable, as in bench_vs_torch.
    peer = hf.model.backbone
    peer.train()
    for name, p in peer.named_parameters():
        p.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))
    pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    pixel_mask = torch.from_numpy(mask.astype(np.int64))

    def peer_fwd():
        with torch.no_grad():
            return peer(pixel_values, pixel_mask)[-1][0].sum()

    def peer_fwd_bwd():
        for p in peer.parameters():
            p.grad = None
        peer(pixel_values, pixel_mask)[-1][0].sum().backward()

    runs = {
        ("forward", "detr-jax"): lambda: jax.block_until_ready(ours_fwd(params, images, mask)),
        ("forward", "hf-torch"): peer_fwd,
        ("forward + backward", "detr-jax"): lambda: jax.block_until_ready(ours_grad(params, images, mask)),
        ("forward + backward", "hf-torch"): peer_fwd_bwd,
    }
    for run in runs.values():  # compile / warm up
        run()
        run()
    times = {key: [] for key in runs}
    for _ in range(args.reps):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(t) for key, t in times.items()}

    lines = [f"{'backbone, 2 x 512 x 512':<22} {'detr-jax s':>10} {'hf-torch s':>10} {'peer/ours':>9}"]
    for part in ("forward", "forward + backward"):
        ours, theirs = medians[(part, "detr-jax")], medians[(part, "hf-torch")]
        lines.append(f"{part:<22} {ours:>10.3f} {theirs:>10.3f} {theirs / ours:>8.2f}x")
    print("\n".join(lines))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "reps": args.reps, "versions": bench.versions(),
              "median_s": {f"{part} / {fw}": v for (part, fw), v in medians.items()}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
