"""DETR-R50: detr-jax against Hugging Face transformers' PyTorch DETR, same machine, one run.

Cases (the shapes of issue "Benchmarks"):
  infer_b1_800x1216   inference, batch 1 at 800x1216
  infer_b4_640x640    inference, batch 4 at 640x640
  train_b2_512x512    one training step, batch 2 at 512x512, 100 queries, aux loss,
                      Hungarian matching included, AdamW update included; backbone
                      layers 2-4 trained (official DETR), stem and layer1 frozen
  train_b2_512x512_frozen_backbone   the same with the whole backbone frozen

With --dino the train cases also time our DINO-R50 ("detr-jax-dino": configs/
dino_r50_4scale_coco.py, 4 scales, 900 queries, contrastive denoising on, the peer's class
count, its parameter rules, random weights from its own initializer: no DINO peer to
convert from) on the same batch, in turn with the others; its ratio to "detr-jax" (our
DETR-R50's step) is DINO's per-step cost over DETR's. `--frameworks` keeps only the workers
named (e.g. `--frameworks detr-jax detr-jax-dino`, our two models alone).

Note: Hugging Face's DetrForObjectDetection with its native (non-timm) ResNet freezes the
WHOLE backbone (transformers 5.24: its filter looks for "stage.1" in names that read
"stages.1"), so out of the box it skips the backbone's backward pass that official DETR
does. This script sets requires_grad on the peer explicitly so that both sides do the same
work in each case.

Inference cases also time our ONNX export (`detr-jax export --format onnx`, the same
weights, fixed size, dynamic batch) in onnxruntime ("detr-jax-onnx", CPU only, the export
made before timing, with the SessionOptions the export records), and its int8 variant
(`--quantize int8`, calibrated on 8 images of the built-in synthetic data:
"detr-jax-onnx-int8", a separate column: it is an approximation of the model, never our
float32 result); the table ends each case with our fastest float32 path against HF eager
and `torch.compile`.

Inputs are uint8 pixels, as `Predictor.batches` gives them: our jit and our exports
normalize them inside; the peer gets them normalized by the same arithmetic (as its image
processor does, outside the model), padded pixels zero. The JSON and the table name the
CPU (`detr_jax.runtime.cpu_info`: model, AVX2/AVX-512/AMX, usable cores).

Each (framework, case) runs in its own worker process, pinned to the same CPU cores
(same thread count: torch.set_num_threads = number of pinned cores; XLA's thread pool
sees only those cores), so each worker's peak resident set is its own. The two (or
three, with torch.compile) workers of a case are timed in turns, one repetition each
per round, so slow drifts of the machine hit both alike; the median over rounds is
reported, with the ratio peer / ours (> 1: we are faster). With `--rewarm` each timed
call follows an untimed one of the same worker, so no worker is timed straight after
waiting. Weights are the same: the HF model is built with random weights (no download),
and ours are converted from it.
Our compile time (first call) is reported separately and not in the medians. By default
every worker (ours and the peer's alike) keeps freed host memory, as `detr-jax train`
does (detr_jax.runtime.host_memory); `--host_malloc default` leaves glibc's malloc as it is.

    python scripts/bench_vs_torch.py                 # CPU, all cores
    python scripts/bench_vs_torch.py --reps 3 --cases infer_b4_640x640
    python scripts/bench_vs_torch.py --rewarm        # an untimed call before each timed one
    python scripts/bench_vs_torch.py --device gpu    # on a GPU machine (cuda + jax[cuda])
    python scripts/bench_vs_torch.py --no_onnx       # without the onnxruntime workers
    python scripts/bench_vs_torch.py --no_int8       # without the int8 onnxruntime worker
    python scripts/bench_vs_torch.py --cases train_b2_512x512 --dino --frameworks detr-jax detr-jax-dino

Writes a table to stdout and JSON to --out (default bench_results/bench_vs_torch.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

from detr_jax.runtime.cpu_info import cpu_info, describe

CASES = {
    "infer_b1_800x1216": dict(kind="infer", batch=1, height=800, width=1216),
    "infer_b4_640x640": dict(kind="infer", batch=4, height=640, width=640),
    "train_b2_512x512": dict(kind="train", batch=2, height=512, width=512, train_backbone=True),
    "train_b2_512x512_frozen_backbone": dict(kind="train", batch=2, height=512, width=512, train_backbone=False),
}
NUM_CLASSES = 91
NUM_TARGETS = 6  # objects per training image


def inputs(case: dict, seed: int = 0):
    """uint8 pixels [B, H, W, 3] (the second image padded: its right quarter), mask, targets."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, h, w = case["batch"], case["height"], case["width"]
    images = rng.integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)
    mask = np.ones((b, h, w), bool)
    if b > 1:
        mask[1:, :, (3 * w) // 4:] = False
        images[~mask] = 0
    labels = rng.integers(1, NUM_CLASSES, size=(b, NUM_TARGETS)).astype(np.int32)
    centers = rng.uniform(0.25, 0.75, size=(b, NUM_TARGETS, 2))
    sizes = rng.uniform(0.05, 0.4, size=(b, NUM_TARGETS, 2))
    boxes = np.concatenate([centers, sizes], -1).astype(np.float32)
    return images, mask, labels, boxes


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_hf(aux_loss: bool):
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    config = DetrConfig(
        use_timm_backbone=False, backbone_config=ResNetConfig(out_features=["stage4"]), num_labels=NUM_CLASSES,
        auxiliary_loss=aux_loss, class_cost=1, bbox_cost=5, giou_cost=2, bbox_loss_coefficient=5,
        giou_loss_coefficient=2, eos_coefficient=0.1,
    )
    return DetrForObjectDetection(config)


# ----------------------------------------------------------------------------- workers


def _setup_worker(cores, retain_host_memory: bool):
    """Pins the worker to `cores`; optionally keeps freed host memory (both frameworks alike)."""
    os.sched_setaffinity(0, cores)
    if retain_host_memory:
        from detr_jax.runtime.host_memory import retain_freed_memory

        retain_freed_memory()


def torch_worker(conn, case_name: str, weights_path: str, cores, device: str, retain_host_memory: bool,
                 compiled: bool):
    _setup_worker(cores, retain_host_memory)
    import numpy as np
    import torch

    torch.set_num_threads(len(cores))
    torch.manual_seed(0)
    case = CASES[case_name]
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model = build_hf(aux_loss=True)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    model.to(dev)
    images, mask, labels, boxes = inputs(case)
    from detr_jax.ops.image_statistics import normalize

    # Normalized as its image processor does (outside the model), padded pixels zero.
    images = np.where(mask[..., None], normalize(images), 0).astype(np.float32)
    pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(dev)
    pixel_mask = torch.from_numpy(mask.astype(np.int64)).to(dev)
    hf_labels = [{"class_labels": torch.from_numpy(labels[i]).long().to(dev),
                  "boxes": torch.from_numpy(boxes[i]).to(dev)} for i in range(len(labels))]
    sync = torch.cuda.synchronize if device == "gpu" else (lambda: None)

    if case["kind"] == "infer":
        model.eval()
        forward = torch.compile(model) if compiled else model

        def run():
            with torch.inference_mode():
                out = forward(pixel_values=pixel_values, pixel_mask=pixel_mask)
            sync()
            return out.logits
    else:
        model.train()
        for name, p in model.model.backbone.named_parameters():  # official DETR: layer2-4 trained
            p.requires_grad_(case["train_backbone"] and any(f"stages.{i}." in name for i in (1, 2, 3)))
        # Official DETR's param groups: backbone lr 1e-5, the rest 1e-4, weight decay 1e-4.
        backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
        rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
        optimizer = torch.optim.AdamW([{"params": rest}, {"params": backbone, "lr": 1e-5}], lr=1e-4,
                                      weight_decay=1e-4)
        forward = torch.compile(model) if compiled else model

        def run():
            out = forward(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=hf_labels)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            sync()
            return out.loss

    _serve(conn, run)


def jax_worker(conn, case_name: str, weights_path: str, cores, device: str, retain_host_memory: bool,
               dino: bool = False):
    """Our DETR-R50 with the peer's weights converted, or (`dino`) our DINO-R50 with random
    weights."""
    _setup_worker(cores, retain_host_memory)
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    case = CASES[case_name]
    config = dino_r50_config() if dino else r50_config()
    if case["kind"] == "train" and not case["train_backbone"]:
        config.train.param_rules = (("backbone/.*", None), ("position_embedding/.*", None))  # the whole backbone frozen
    _serve(conn, jax_runner(config, None if dino else weights_path, case))


def jax_runner(config, weights_path: str | None, case: dict):
    """The call a jax worker times for `case` (inference or one training step), our model of
    `config` with the PyTorch weights at `weights_path` converted (None: the model's own
    random initialization, seed 0): jitted inference on `inputs(case)`, or the train step,
    compiled before its first run as the training loop does. The model's own workers (this
    script's, bench_deformable_vs_torch's) serve it."""
    import jax
    import torch

    from detr_jax.convert import convert_state_dict
    from detr_jax.models import build_model, init_variables

    model = build_model(config.model)
    if weights_path is None:
        variables = init_variables(model, jax.random.PRNGKey(0))
    else:
        state_dict = {k: v.numpy() for k, v in torch.load(weights_path, weights_only=True).items()}
        variables, _ = convert_state_dict(state_dict, config.model, source=weights_path)
        del state_dict

    if case["kind"] == "infer":
        images, mask, _, _ = inputs(case)
        apply = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))
        on_device, x, m = jax.device_put((variables, images, mask))

        def run():
            return jax.block_until_ready(apply(on_device, x, m))
        return run

    from detr_jax.train.trainer import compile_step

    step, state, batch = jax_train_step(config, model, variables, case)
    del variables  # the state holds the parameters
    holder = {"state": state, "compiled": False}

    def run():
        if not holder["compiled"]:  # as the training loop: compile, give the freed memory back, run
            compile_step(step, holder["state"], batch)
            holder["compiled"] = True
        holder["state"], metrics = step(holder["state"], batch)
        return jax.block_until_ready(metrics["loss"])
    return run


def onnx_worker(conn, case_name: str, weights_path: str, cores, device: str, retain_host_memory: bool,
                quantize: str | None = None):
    """Our ONNX export of the same weights (`quantize` "int8": its int8 variant), run by
    onnxruntime on the same cores with the session options the export records."""
    _setup_worker(cores, retain_host_memory)
    os.environ["JAX_PLATFORMS"] = "cpu"  # the export is traced on the host
    import numpy as np
    import torch

    from detr_jax.convert import convert_state_dict
    from detr_jax.serving.export import ExportedDetector, export_detector

    case = CASES[case_name]
    config = r50_config()
    state_dict = {k: v.numpy() for k, v in torch.load(weights_path, weights_only=True).items()}
    variables, _ = convert_state_dict(state_dict, config.model, source=weights_path)
    del state_dict
    images, mask, _, _ = inputs(case)
    orig_size = np.full((case["batch"], 2), (case["height"], case["width"]), np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        directory = export_detector(config, variables, os.path.join(tmp, "onnx"), "onnx",
                                    size=(case["height"], case["width"]), quantize=quantize)
        del variables
        detector = ExportedDetector(directory, threads=len(cores))

    def run():
        return detector(images, mask, orig_size)

    _serve(conn, run)


def jax_train_step(config, model, variables: dict, case: dict):
    """Our jitted train step for `case`: (step, initial state, global batch)."""
    import jax
    import numpy as np

    from detr_jax.runtime.sharding import global_batch, make_mesh
    from detr_jax.train.trainer import assemble, train_state_from_variables

    images, mask, labels, boxes = inputs(case)
    mesh = make_mesh()
    run = assemble(config, mesh, 1000, model=model)
    state = train_state_from_variables(variables, run.optimizer, mesh, jax.random.PRNGKey(0))
    step = run.step
    batch = global_batch({"image": images, "mask": mask, "labels": labels, "boxes": boxes,
                          "valid": np.ones(labels.shape, bool)}, mesh)
    return step, state, batch


def _serve(conn, run):
    """First call: the compile/warm-up, timed separately; then one timed call per request."""
    try:
        start = time.perf_counter()
        run()
        conn.send(("ready", time.perf_counter() - start))
        while conn.recv() == "run":
            start = time.perf_counter()
            run()
            conn.send(("time", time.perf_counter() - start))
        conn.send(("rss", peak_rss_mib()))
    except Exception as e:  # noqa: BLE001 -- report any failure to the driver
        conn.send(("error", f"{type(e).__name__}: {str(e)[:500]}"))


# ----------------------------------------------------------------------------- driver


def run_case(case_name: str, weights_path: str, cores, device: str, reps: int, warmup: int,
             torch_compile: bool, retain_host_memory: bool = True, rewarm: bool = False, onnx: bool = True,
             int8: bool = True, dino: bool = False, frameworks: tuple[str, ...] | None = None) -> dict:
    """Times every framework of `case_name` in turns (only `frameworks` when given; `dino`:
    our DINO-R50 too, in train cases); `rewarm`: one untimed call before each timed one."""
    ctx = mp.get_context("spawn")
    common = (case_name, weights_path, cores, device, retain_host_memory)
    workers = {"detr-jax": (jax_worker, common), "hf-torch": (torch_worker, (*common, False))}
    if torch_compile:
        workers["hf-torch-compile"] = (torch_worker, (*common, True))
    if onnx and device == "cpu" and CASES[case_name]["kind"] == "infer":
        workers["detr-jax-onnx"] = (onnx_worker, common)
        if int8:
            workers["detr-jax-onnx-int8"] = (onnx_worker, (*common, "int8"))
    if dino and CASES[case_name]["kind"] == "train":
        workers["detr-jax-dino"] = (jax_worker, (*common, True))
    if frameworks:
        workers = {name: worker for name, worker in workers.items() if name in frameworks}
    procs, conns, first_call, errors = {}, {}, {}, {}
    for name, (fn, args) in workers.items():  # started one at a time: their start-up is not timed
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
        for name, conn in conns.items():
            if rewarm and r >= warmup:
                conn.send("run")
                kind, value = conn.recv()
                if kind == "error":
                    errors[name] = value
                    continue
            conn.send("run")
            kind, value = conn.recv()
            if kind == "error":
                errors[name] = value
                continue
            if r >= warmup:
                times[name].append(value)
    rss = {}
    for name, conn in conns.items():
        conn.send("stop")
        kind, value = conn.recv()
        if kind == "rss":
            rss[name] = value
        procs[name].join()
    result = {"case": case_name, **CASES[case_name], "errors": errors, "frameworks": {}}
    for name in conns:
        if times[name]:
            result["frameworks"][name] = {
                "median_s": statistics.median(times[name]), "min_s": min(times[name]),
                "times_s": times[name], "first_call_s": first_call[name], "peak_rss_mib": rss.get(name),
            }
    ours = result["frameworks"].get("detr-jax")
    for name, stats in result["frameworks"].items():
        if ours and name != "detr-jax":
            stats["peer_over_ours"] = stats["median_s"] / ours["median_s"]
    # Our fastest float32 path (the int8 export is an approximation: never the comparison).
    fastest = min((n for n in FLOAT32_OURS if n in result["frameworks"]),
                  key=lambda n: result["frameworks"][n]["median_s"], default=None)
    if fastest:
        result["fastest_ours"] = fastest
        for peer, key in (("hf-torch", "hf_eager_over_fastest_ours"),
                          ("hf-torch-compile", "torch_compile_over_fastest_ours")):
            if peer in result["frameworks"]:
                result[key] = result["frameworks"][peer]["median_s"] / result["frameworks"][fastest]["median_s"]
    onnx32, onnx8 = (result["frameworks"].get(n) for n in ("detr-jax-onnx", "detr-jax-onnx-int8"))
    if onnx32 and onnx8:
        result["int8_speedup_over_onnx_float32"] = onnx32["median_s"] / onnx8["median_s"]
    return result


FLOAT32_OURS = ("detr-jax", "detr-jax-onnx")


def hf_state_dict() -> dict:
    """The peer's random initial weights (seed 0): what every worker and script starts from."""
    import torch

    torch.manual_seed(0)
    return build_hf(aux_loss=True).state_dict()


def make_weights(path: str) -> None:
    import torch

    torch.save(hf_state_dict(), path)


def r50_config():
    """Our DETR-R50 config with the peer's class count."""
    from detr_jax.config import base_config

    config = base_config()
    config.model.num_classes = NUM_CLASSES
    return config


def dino_r50_config():
    """Our DINO-4scale R50 (configs/dino_r50_4scale_coco.py) with the peer's class count."""
    from detr_jax.config import load_config

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                      "dino_r50_4scale_coco.py"))
    config.model.num_classes = NUM_CLASSES
    return config


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
           "cpu_count": os.cpu_count(), "cpu": cpu_info()}
    for pkg in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy", "jax2onnx", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def format_table(results: list[dict], cpu: dict | None = None) -> str:
    lines = [f"CPU: {describe(cpu)}",
             f"{'case':<33} {'framework':<18} {'median s':>9} {'min s':>8} {'1st call s':>10} "
             f"{'peak RSS MiB':>12} {'peer/jit':>9}"]
    for res in results:
        for name, s in res["frameworks"].items():
            ratio = f"{s['peer_over_ours']:.2f}x" if "peer_over_ours" in s else ""
            lines.append(f"{res['case']:<33} {name:<18} {s['median_s']:>9.3f} {s['min_s']:>8.3f} "
                         f"{s['first_call_s']:>10.1f} {s['peak_rss_mib'] or float('nan'):>12.0f} {ratio:>9}")
        for name, err in res["errors"].items():
            lines.append(f"{res['case']:<33} {name:<18} failed: {err[:80]}")
        if "fastest_ours" in res:
            ratios = [f"{label} / it = {res[key]:.2f}x" for label, key in
                      (("HF eager", "hf_eager_over_fastest_ours"), ("torch.compile", "torch_compile_over_fastest_ours"))
                      if key in res]
            lines.append(f"{res['case']:<33} our fastest float32: {res['fastest_ours']}; " + "; ".join(ratios))
        if "int8_speedup_over_onnx_float32" in res:
            lines.append(f"{res['case']:<33} int8 export: {res['int8_speedup_over_onnx_float32']:.2f}x the float32 "
                         "export's speed (an approximation: not compared with float32 peers)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per framework and case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions after the first call")
    parser.add_argument("--threads", type=int, default=None, help="cores to pin every worker to (default: all)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--no_torch_compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no_onnx", action="store_true", help="skip our ONNX exports in onnxruntime")
    parser.add_argument("--no_int8", action="store_true", help="skip our int8 ONNX export")
    parser.add_argument("--host_malloc", choices=("retain", "default"), default="retain",
                        help="retain: every worker keeps freed host memory (detr_jax.runtime.host_memory, what "
                             "`detr-jax train` does); default: glibc's own behaviour")
    parser.add_argument("--rewarm", action="store_true",
                        help="one untimed call before each timed call of a worker's turn: times each framework "
                             "warm, as in a training loop, not just after the other worker's turn (on a machine "
                             "that pages out idle processes' file pages, e.g. DAMON's pageout, the first call "
                             "after waiting is slower)")
    parser.add_argument("--dino", action="store_true",
                        help="train cases also time our DINO-R50 (random weights) against our DETR-R50")
    parser.add_argument("--frameworks", nargs="+", default=None,
                        help="time only these workers (default: all of the case's)")
    parser.add_argument("--out", default="bench_results/bench_vs_torch.json")
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))[: args.threads or None]
    machine = versions()
    print(f"CPU: {describe(machine['cpu'])}; workers pinned to {len(cores)} of them", file=sys.stderr, flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "hf_detr_r50.pt")
        make_weights(weights)
        for case in args.cases:
            print(f"running {case} ...", file=sys.stderr, flush=True)
            results.append(run_case(case, weights, cores, args.device, args.reps, args.warmup,
                                    not args.no_torch_compile, args.host_malloc == "retain", args.rewarm,
                                    not args.no_onnx, not args.no_int8, args.dino, args.frameworks))
            print(format_table(results[-1:], machine["cpu"]), file=sys.stderr, flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "cores": len(cores),
              "cpu": machine["cpu"], "reps": args.reps, "rewarm": args.rewarm, "host_malloc": args.host_malloc,
              "dino": args.dino, "frameworks": args.frameworks,
              "versions": machine, "load_average": os.getloadavg(), "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(results, machine["cpu"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
