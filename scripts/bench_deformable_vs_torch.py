"""Deformable DETR-R50: detr-jax against Hugging Face transformers' PyTorch Deformable DETR, one run.

Cases (issue 29's "Speed"), at Deformable-DETR-R50's COCO shapes:
  op_decoder_fwd        the multi-scale deformable attention operator alone, forward: 4 levels
                        100x152, 50x76, 25x38, 13x19 (an 800x1216 image at strides 8..64),
                        batch 1, 300 queries, 8 heads, head dim 32, 4 points per head and level
  op_decoder_fwd_bwd    the same, forward + backward (the gradient of the output's sum with
                        respect to the value, the sampling locations and the weights)
  op_encoder_fwd        the encoder's case: queries = every position of the 4 levels (20197)
  op_encoder_fwd_bwd    its forward + backward
  infer_b1_800x1216     the whole Deformable DETR-R50 (plain: no box refinement, no two-stage),
                        inference, batch 1 at 800x1216 (raw logits and boxes, as HF returns)
  train_b2_512x512      one training step, batch 2 at 512x512 (the second image padded),
                        every decoder layer supervised, Hungarian matching, focal loss,
                        backward, gradient clipping 0.1 and the AdamW update included

Ours: `detr_jax.models.deformable_attention.ms_deform_attn_sample` jitted (and `jax.grad`
of its sum, jitted), and the model of `configs/deformable_detr_r50_coco.py` (its parameter
rules: stem and layer1 frozen, the rest of the backbone, the sampling offsets and the
reference points at 0.1 x lr). The peer: transformers' `MultiScaleDeformableAttention`
module (its pure-PyTorch `grid_sample` path: transformers' hub kernel is not installed, so
nothing custom runs) and `DeformableDetrForObjectDetection`, each eager and under
`torch.compile`. HF's model is built with random weights (no download, seed 0) and ours
are converted from them (`detr_jax.convert.convert_state_dict`). Its training step gets
the same trained parameters and lr groups as ours, set explicitly: with its native
(non-timm) ResNet, HF freezes the whole backbone (its filter looks for "stage.1" in names
that read "stages.1"), and it has no lower lr for the offsets and reference points.

Timing as `scripts/bench_vs_torch.py` (its helpers are imported): every (framework, case)
in its own worker process pinned to the same cores, the workers of a case timed in
turns, one call each per round, medians over `--reps` rounds, the first call (compile)
reported apart, `--rewarm` an untimed call before each timed one, the ratio peer / ours
(> 1: we are faster), the CPU named (`detr_jax.runtime.cpu_info`).

    python scripts/bench_deformable_vs_torch.py --reps 3 --rewarm
    python scripts/bench_deformable_vs_torch.py --cases op_decoder_fwd op_decoder_fwd_bwd
    python scripts/bench_deformable_vs_torch.py --tiny --out /tmp/b.json   # tiny shapes, 1 rep (CI)

Writes a table to stdout and JSON to --out (default bench_results/bench_deformable_vs_torch.json).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vs_torch import (  # noqa: E402
    NUM_CLASSES,
    _serve,
    _setup_worker,
    format_table,
    inputs,
    jax_runner,
    versions,
)

from detr_jax.runtime.cpu_info import describe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "deformable_detr_r50_coco.py")

# Deformable-DETR-R50's 4 levels for an 800x1216 image (strides 8, 16, 32, 64).
LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))
OP = dict(kind="op", batch=1, heads=8, head_dim=32, points=4, levels=LEVELS)
CASES = {
    "op_decoder_fwd": dict(OP, queries=300, grad=False),
    "op_decoder_fwd_bwd": dict(OP, queries=300, grad=True),
    "op_encoder_fwd": dict(OP, queries="all", grad=False),
    "op_encoder_fwd_bwd": dict(OP, queries="all", grad=True),
    "infer_b1_800x1216": dict(kind="infer", batch=1, height=800, width=1216),
    "train_b2_512x512": dict(kind="train", batch=2, height=512, width=512),
}
# --tiny: the same cases at toy sizes (a smoke run of every code path in seconds, not a timing).
TINY_OP = dict(heads=2, head_dim=8, points=2, levels=((8, 12), (4, 6), (2, 3), (1, 2)))
TINY_QUERIES = 5
TINY_IMAGES = {"infer": dict(height=64, width=96), "train": dict(height=64, width=64)}
# Tiny model: the ResNet of test_parity_hf (our "resnet_tiny"), width 32, 2 heads, 1 + 2 layers.
TINY_RESNET = dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="bottleneck")
TINY_HF = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
               encoder_attention_heads=2, decoder_attention_heads=2, num_queries=7, encoder_n_points=2,
               decoder_n_points=2)
LR, LR_SCALE, WEIGHT_DECAY, CLIP = 2e-4, 0.1, 1e-4, 0.1  # the recipe (configs/deformable_detr_r50_coco.py)


def case_spec(name: str, tiny: bool) -> dict:
    """The case's shapes; `tiny`: the toy sizes."""
    case = dict(CASES[name])
    if tiny and case["kind"] == "op":
        case.update(TINY_OP, queries="all" if case["queries"] == "all" else TINY_QUERIES)
    elif tiny:
        case.update(TINY_IMAGES[case["kind"]])
    if case["kind"] == "op":
        case["length"] = sum(h * w for h, w in case["levels"])
        if case["queries"] == "all":
            case["queries"] = case["length"]
    return case


def op_inputs(case: dict, seed: int = 0):
    """value [B, S, H, Dh], sampling locations [B, Q, H, L, P, 2] in [-0.05, 1.05] (some
    points off the map, as trained offsets give), weights [B, Q, H, L, P] softmaxed over
    levels x points; float32 numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, q, h, d, p, levels = (case[k] for k in ("batch", "queries", "heads", "head_dim", "points", "levels"))
    value = rng.standard_normal((b, case["length"], h, d), np.float32)
    locations = rng.uniform(-0.05, 1.05, size=(b, q, h, len(levels), p, 2)).astype(np.float32)
    logits = rng.standard_normal((b, q, h, len(levels) * p), np.float32)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = (weights / weights.sum(-1, keepdims=True)).reshape(b, q, h, len(levels), p)
    return value, locations, weights


def build_hf(tiny: bool):
    """HF's Deformable DETR (plain), native ResNet-50 res3..res5 (or the tiny ResNet), the
    recipe's matching costs, every decoder layer supervised; random weights (no download)."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    config = DeformableDetrConfig(
        use_timm_backbone=False, num_labels=NUM_CLASSES, auxiliary_loss=True, class_cost=2, bbox_cost=5, giou_cost=2,
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"], **(TINY_RESNET if tiny else {})),
        **(TINY_HF if tiny else {}))
    return DeformableDetrForObjectDetection(config)


def make_weights(path: str, tiny: bool) -> None:
    import torch

    torch.manual_seed(0)
    torch.save(build_hf(tiny).state_dict(), path)


def our_config(tiny: bool):
    """configs/deformable_detr_r50_coco.py with the peer's class count (tiny: the tiny model)."""
    from detr_jax.config.loading import load_config

    overrides = {"model.num_classes": NUM_CLASSES}
    if tiny:
        overrides.update({"model.backbone": "resnet_tiny", "model.hidden_dim": TINY_HF["d_model"],
                          "model.num_heads": TINY_HF["encoder_attention_heads"],
                          "model.num_encoder_layers": TINY_HF["encoder_layers"],
                          "model.num_decoder_layers": TINY_HF["decoder_layers"],
                          "model.dim_feedforward": TINY_HF["encoder_ffn_dim"],
                          "model.num_queries": TINY_HF["num_queries"]})
    config = load_config(CONFIG, overrides)
    if tiny:
        config.model.transformer_args = {**config.model.transformer_args, "encoder_n_points": 2, "decoder_n_points": 2}
    return config


# ----------------------------------------------------------------------------- workers


def torch_op_worker(conn, case: dict, cores, retain_host_memory: bool, compiled: bool):
    _setup_worker(cores, retain_host_memory)
    import torch
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    torch.set_num_threads(len(cores))
    attention = MultiScaleDeformableAttention()
    shapes_list = [tuple(s) for s in case["levels"]]
    shapes = torch.tensor(shapes_list, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])

    def op(value, locations, weights):
        return attention(value, shapes, shapes_list, starts, locations, weights, 64)

    forward = torch.compile(op) if compiled else op
    value, locations, weights = (torch.from_numpy(a) for a in op_inputs(case))
    if case["grad"]:
        for t in (value, locations, weights):
            t.requires_grad_(True)

        def run():
            return torch.autograd.grad(forward(value, locations, weights).sum(), (value, locations, weights))
    else:
        def run():
            with torch.no_grad():
                return forward(value, locations, weights)

    _serve(conn, run)


def jax_op_worker(conn, case: dict, cores, retain_host_memory: bool):
    _setup_worker(cores, retain_host_memory)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    fn, args = jax_op(case)

    def run():
        return jax.block_until_ready(fn(*args))

    _serve(conn, run)


def jax_op(case: dict):
    """(the jitted operator, or its gradient with respect to every input: `case["grad"]`;
    its arguments on device) for an operator case. scripts/profile_deformable.py profiles
    the same."""
    import jax

    from detr_jax.models.deformable_attention import ms_deform_attn_sample

    levels = tuple(tuple(s) for s in case["levels"])

    def op(value, locations, weights):
        return ms_deform_attn_sample(value, levels, locations, weights)

    if case["grad"]:
        fn = jax.jit(jax.grad(lambda *a: op(*a).sum(), argnums=(0, 1, 2)))
    else:
        fn = jax.jit(op)
    return fn, jax.device_put(op_inputs(case))


def torch_model_worker(conn, case: dict, weights_path: str, tiny: bool, cores, retain_host_memory: bool,
                       compiled: bool):
    _setup_worker(cores, retain_host_memory)
    import torch

    torch.set_num_threads(len(cores))
    _serve(conn, hf_runner(case, weights_path, tiny, compiled))


def hf_runner(case: dict, weights_path: str, tiny: bool, compiled: bool):
    """The call a torch worker times for `case`: HF's model with the weights at
    `weights_path` (`torch.compile`d with `compiled`), inference on `inputs(case)` or one
    training step with the recipe's parameter groups. scripts/profile_deformable.py profiles
    the same call."""
    import numpy as np
    import torch

    from detr_jax.ops.image_statistics import normalize

    torch.manual_seed(0)
    model = build_hf(tiny)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    images, mask, labels, boxes = inputs(case)
    # Normalized as its image processor does (outside the model), padded pixels zero.
    images = np.where(mask[..., None], normalize(images), 0).astype(np.float32)
    pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    pixel_mask = torch.from_numpy(mask.astype(np.int64))
    hf_labels = [{"class_labels": torch.from_numpy(labels[i]).long(), "boxes": torch.from_numpy(boxes[i])}
                 for i in range(len(labels))]

    if case["kind"] == "infer":
        model.eval()
        forward = torch.compile(model) if compiled else model

        def run():
            with torch.inference_mode():
                return forward(pixel_values=pixel_values, pixel_mask=pixel_mask).logits
        return run

    model.train()
    # The recipe, as our config's parameter rules: stem and layer1 frozen, layers 2-4 at
    # 0.1 x lr (HF would freeze the whole native ResNet: module docstring), the sampling
    # offsets and the reference points at 0.1 x lr, the rest at lr.
    for name, p in model.model.backbone.named_parameters():
        p.requires_grad_(any(f"stages.{i}." in name for i in (1, 2, 3)))
    slow, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_slow = "backbone" in name or "sampling_offsets" in name or "reference_points" in name
            (slow if is_slow else rest).append(p)
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": slow, "lr": LR * LR_SCALE}], lr=LR,
                                  weight_decay=WEIGHT_DECAY)
    forward = torch.compile(model) if compiled else model

    def run():
        out = forward(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=hf_labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        return out.loss

    return run


def jax_model_worker(conn, case: dict, weights_path: str, tiny: bool, cores, retain_host_memory: bool):
    _setup_worker(cores, retain_host_memory)
    os.environ["JAX_PLATFORMS"] = "cpu"
    _serve(conn, jax_runner(our_config(tiny), weights_path, case))


# ----------------------------------------------------------------------------- driver


def workers_of(case: dict, weights_path: str, tiny: bool, cores, retain_host_memory: bool,
               torch_compile: bool) -> dict:
    """{framework: (worker function, its arguments after the pipe)} of a case."""
    if case["kind"] == "op":
        common = (case, cores, retain_host_memory)
        workers = {"detr-jax": (jax_op_worker, common), "hf-torch": (torch_op_worker, (*common, False))}
        compiled = (torch_op_worker, (*common, True))
    else:
        common = (case, weights_path, tiny, cores, retain_host_memory)
        workers = {"detr-jax": (jax_model_worker, common), "hf-torch": (torch_model_worker, (*common, False))}
        compiled = (torch_model_worker, (*common, True))
    if torch_compile:
        workers["hf-torch-compile"] = compiled
    return workers


def time_in_turns(workers: dict, reps: int, warmup: int, rewarm: bool) -> tuple[dict, dict, dict, dict]:
    """Starts every worker (one at a time: start-up and first call untimed), then times them
    in turns, one call each per round (`rewarm`: after an untimed one). Returns (times,
    first call, peak RSS, errors), keyed by framework. The protocol is bench_vs_torch's
    run_case, whose loop is tied to its own workers."""
    ctx = mp.get_context("spawn")
    procs, conns, first_call, errors = {}, {}, {}, {}
    for name, (fn, args) in workers.items():
        parent, child = ctx.Pipe()
        procs[name] = ctx.Process(target=fn, args=(child, *args), daemon=True)
        procs[name].start()
        kind, value = parent.recv()
        if kind == "error":
            errors[name] = value
            procs[name].join()
            continue
        conns[name], first_call[name] = parent, value
    times = {name: [] for name in conns}
    for r in range(warmup + reps):
        for name, conn in list(conns.items()):
            if name in errors:
                continue
            for timed in ((False, True) if rewarm and r >= warmup else (True,)):
                conn.send("run")
                kind, value = conn.recv()
                if kind == "error":
                    errors[name] = value
                    break
                if timed and r >= warmup:
                    times[name].append(value)
    rss = {}
    for name, conn in conns.items():
        if name not in errors:
            conn.send("stop")
            kind, value = conn.recv()
            if kind == "rss":
                rss[name] = value
        procs[name].join(timeout=60)
    return times, first_call, rss, errors


def summarize(case_name: str, case: dict, times: dict, first_call: dict, rss: dict, errors: dict) -> dict:
    """bench_vs_torch's result format (its format_table reads it): medians, ratios peer /
    ours, and our fastest path against HF eager and torch.compile."""
    shape = {k: (list(map(list, v)) if k == "levels" else v) for k, v in case.items()}
    result = {"case": case_name, **shape, "errors": errors, "frameworks": {}}
    for name, ts in times.items():
        if ts:
            result["frameworks"][name] = {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts,
                                          "first_call_s": first_call[name], "peak_rss_mib": rss.get(name)}
    ours = result["frameworks"].get("detr-jax")
    if ours:
        for name, stats in result["frameworks"].items():
            if name != "detr-jax":
                stats["peer_over_ours"] = stats["median_s"] / ours["median_s"]
        result["fastest_ours"] = "detr-jax"  # our only float32 path here (no ONNX export of it timed)
        for peer, key in (("hf-torch", "hf_eager_over_fastest_ours"),
                          ("hf-torch-compile", "torch_compile_over_fastest_ours")):
            if peer in result["frameworks"]:
                result[key] = result["frameworks"][peer]["median_s"] / ours["median_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per framework and case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions after the first call")
    parser.add_argument("--threads", type=int, default=None, help="cores to pin every worker to (default: all)")
    parser.add_argument("--no_torch_compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no_torch_compile_model", action="store_true",
                        help="torch.compile for the operator cases only (its whole-model compile can be long)")
    parser.add_argument("--host_malloc", choices=("retain", "default"), default="retain",
                        help="retain: every worker keeps freed host memory, as `detr-jax train` does")
    parser.add_argument("--rewarm", action="store_true", help="one untimed call before each timed call")
    parser.add_argument("--tiny", action="store_true",
                        help="toy shapes and models, one repetition, no warm-up, torch.compile for the operator only: "
                             "checks that every path runs")
    parser.add_argument("--out", default="bench_results/bench_deformable_vs_torch.json")
    args = parser.parse_args(argv)
    if args.tiny:  # the whole model's torch.compile takes minutes even at toy sizes: the operator's only
        args.reps, args.warmup, args.no_torch_compile_model = 1, 0, True

    cores = sorted(os.sched_getaffinity(0))[: args.threads or None]
    machine = versions()
    print(f"CPU: {describe(machine['cpu'])}; workers pinned to {len(cores)} of them", file=sys.stderr, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "hf_deformable_detr_r50.pt")
        if any(CASES[c]["kind"] != "op" for c in args.cases):
            make_weights(weights, args.tiny)
        for name in args.cases:
            case = case_spec(name, args.tiny)
            compile_it = not args.no_torch_compile and not (args.no_torch_compile_model and case["kind"] != "op")
            print(f"running {name} ...", file=sys.stderr, flush=True)
            workers = workers_of(case, weights, args.tiny, cores, args.host_malloc == "retain", compile_it)
            results.append(summarize(name, case, *time_in_turns(workers, args.reps, args.warmup, args.rewarm)))
            print(format_table(results[-1:], machine["cpu"]), file=sys.stderr, flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": "cpu", "cores": len(cores), "cpu": machine["cpu"],
              "tiny": args.tiny, "reps": args.reps, "rewarm": args.rewarm, "host_malloc": args.host_malloc,
              "versions": machine, "load_average": os.getloadavg(), "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(results, machine["cpu"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
