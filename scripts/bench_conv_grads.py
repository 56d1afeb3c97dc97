"""The R50 backbone's 3x3 convolutions at the training shape: forward, input and weight gradient.

For the 3x3 convolution of each ResNet-50 stage at bench_vs_torch's training shape
(2 x 512 x 512 images: stride-1 convs at 64/32/16 px, the stride-2 ones of each stage's first
block), times XLA:CPU's forward, input gradient and weight gradient (jitted alone, with the
train step's compiler options) and prints GFLOP/s; also two matrix-product formulations of
the weight gradient (nine per-tap products; one product over the nine taps stacked along
channels), to show whether writing it differently would pay. Prints a table and writes JSON.

    python scripts/bench_conv_grads.py --reps 15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from detr_jax.train.trainer import CPU_TRAIN_COMPILER_OPTIONS  # noqa: E402
from detr_jax.runtime.cpu_info import cpu_info

# (batch, input side, channels, stride): the 3x3 convs of layers 2-4 at 2 x 512 x 512.
SHAPES = [(2, 64, 128, 1), (2, 32, 256, 1), (2, 16, 512, 1), (2, 128, 128, 2), (2, 64, 256, 2), (2, 32, 512, 2)]


def conv3x3(x, kernel, stride):
    """x: [B, H, W, C] -> [B, H/stride, W/stride, C_out]; PyTorch's padding 1."""
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def taps(x, out_h, out_w, stride):
    """The nine shifted views of the padded input that tap (dy, dx) multiplies: [B, out_h, out_w, C] each."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [xp[:, dy: dy + stride * (out_h - 1) + 1: stride, dx: dx + stride * (out_w - 1) + 1: stride]
            for dy in range(3) for dx in range(3)]


def forward(x, kernel, g, stride):
    return conv3x3(x, kernel, stride)


def input_grad(x, kernel, g, stride):
    return jax.vjp(lambda x: conv3x3(x, kernel, stride), x)[1](g)[0]


def weight_grad(x, kernel, g, stride):
    return jax.vjp(lambda k: conv3x3(x, k, stride), kernel)[1](g)[0]


def weight_grad_per_tap(x, kernel, g, stride):
    out = [jnp.einsum("bhwc,bhwo->co", t, g) for t in taps(x, g.shape[1], g.shape[2], stride)]
    return jnp.stack(out).reshape(kernel.shape)


def weight_grad_stacked(x, kernel, g, stride):
    stacked = jnp.concatenate(taps(x, g.shape[1], g.shape[2], stride), axis=-1)  # [B, h, w, 9C]
    return jnp.einsum("bhwk,bhwo->ko", stacked, g).reshape(kernel.shape)


VARIANTS = {"forward": forward, "input_grad": input_grad, "weight_grad": weight_grad,
            "weight_grad_per_tap": weight_grad_per_tap, "weight_grad_stacked": weight_grad_stacked}


def time_ms(fn, args, stride, reps):
    jitted = jax.jit(fn, static_argnums=3, compiler_options=CPU_TRAIN_COMPILER_OPTIONS)
    out = jax.block_until_ready(jitted(*args, stride))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args, stride))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default="bench_results/bench_conv_grads.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'input':<20} {'stride':>6} {'variant':<20} {'ms':>8} {'GFLOP/s':>8} {'max rel. diff':>13}")
    for batch, side, channels, stride in SHAPES:
        x = jnp.asarray(rng.normal(size=(batch, side, side, channels)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(3, 3, channels, channels)) * 0.05, jnp.float32)
        g = jnp.asarray(rng.normal(size=(batch, side // stride, side // stride, channels)), jnp.float32)
        flops = 2 * g.shape[0] * g.shape[1] * g.shape[2] * 9 * channels * channels
        reference = None
        for name, fn in VARIANTS.items():
            ms, out = time_ms(fn, (x, kernel, g), stride, args.reps)
            diff = None
            if name == "weight_grad":
                reference = out
            elif name.startswith("weight_grad_"):
                diff = float(jnp.max(jnp.abs(out - reference)) / jnp.max(jnp.abs(reference)))
            rows.append(dict(input=list(x.shape), stride=stride, variant=name, ms=ms, gflops=flops / ms / 1e6,
                             max_rel_diff=diff))
            print(f"{str(tuple(x.shape)):<20} {stride:>6} {name:<20} {ms:>8.2f} {flops / ms / 1e6:>8.0f} "
                  f"{'' if diff is None else f'{diff:.1e}':>13}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "jax": jax.__version__, "cpu": cpu_info(), "cpu_count": os.cpu_count(),
                   "reps": args.reps, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
