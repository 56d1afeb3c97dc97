"""Throughput of the training input pipeline on COCO-like images, beside official DETR's.

Times the training iterator with official DETR's COCO-size augmentation (multi-scale
480..800 / max 1333, random crop branch, padding to a bucket; batches of uint8 pixels) for
each combination of worker processes and threads, over a COCO-format folder:
  --coco DIR   an existing folder DIR/train/*.jpg + DIR/annotations/instances_train.json,
               e.g. real photographs at COCO sizes from scripts/make_photo_coco.py;
  otherwise    N synthetic 640x480 JPEGs (shapes dataset) written to a temporary folder.
With --official-python PY (an environment with torch and torchvision), the same run then
times official DETR's pipeline on the same folder (scripts/official_input_pipeline.py: PIL
decode, its transforms, to-tensor + normalize, a DataLoader with the same worker counts)
and prints the ratio at equal worker counts (ours with one thread per process). Prints
tables and writes JSON.

    python scripts/make_photo_coco.py /tmp/photo_coco --images 200   # needs scikit-image
    python scripts/bench_input.py --coco /tmp/photo_coco --workers 0 1 2 --threads 1 \
        --official-python /path/to/torch-env/bin/python --out bench_results/bench_input.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
from PIL import Image

from detr_jax.data import SyntheticShapesSource, make_train_iterator, write_coco_folder
from detr_jax.data.config import data_config
from detr_jax.data.records import Record
from detr_jax.runtime.cpu_info import cpu_info


class _Resized:
    """A source whose images are all resized to exactly (height, width)."""

    def __init__(self, source, height: int, width: int):
        self.source, self.height, self.width = source, height, width
        self.category_names = source.category_names

    def __len__(self):
        return len(self.source)

    def _scale(self, record: Record) -> Record:
        h, w = record.orig_size
        record.boxes = record.boxes * np.array([self.width / w, self.height / h] * 2, np.float32)
        record.orig_size = (self.height, self.width)
        if record.image is not None:
            record.image = np.asarray(Image.fromarray(record.image).resize((self.width, self.height), Image.BILINEAR))
        return record

    def __getitem__(self, index):
        return self._scale(self.source[index])

    def annotations(self, index):
        return self._scale(self.source.annotations(index))


def bench(coco_dir: str, workers: int, threads: int, batch_size: int, warmup: int, batches: int) -> dict:
    data = data_config()
    data.update(dict(dataset="coco_folder", coco_dir=coco_dir, train_split="train",
                     num_workers=workers, num_threads=threads, prefetch_batches=2))
    iterator = make_train_iterator(data, batch_size, seed=0, shard_index=0, shard_count=1)
    start = time.perf_counter()
    for _ in range(warmup):
        next(iterator)
    first = time.perf_counter() - start
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    main_cpu, worker_cpu = (after - before for after, before in zip(cpu_seconds(), cpu_before))
    iterator.close()
    return {
        "workers": workers,
        "threads": threads,
        "batch_size": batch_size,
        "batches": batches,
        "seconds": round(elapsed, 3),
        "images_per_s": round(batches * batch_size / elapsed, 2),
        "warmup_seconds": round(first, 3),
        "distinct_shapes": len(iterator.stats.batch_shapes),
        # where the time goes: CPU seconds per batch of this process (its read threads
        # included) and of the worker processes; cores_used = all CPU time / wall time
        "main_cpu_s_per_batch": round(main_cpu / batches, 4),
        "worker_cpu_s_per_batch": round(worker_cpu / batches, 4),
        "cores_used": round((main_cpu + worker_cpu) / elapsed, 2),
    }


def cpu_seconds() -> tuple[float, float]:
    """(user + system CPU seconds of this process, of its live child processes)."""
    me = psutil.Process()
    children = 0.0
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
            children += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    times = me.cpu_times()
    return times.user + times.system, children


def official_rows(args, coco_dir: str, tmp: str) -> dict:
    """Official DETR's pipeline on the same folder, in `args.official_python`: its JSON."""
    out = os.path.join(tmp, "official.json")
    script = pathlib.Path(__file__).with_name("official_input_pipeline.py")
    subprocess.run([args.official_python, str(script), "--coco", coco_dir, "--workers", *map(str, args.workers),
                    "--batch-size", str(args.batch_size), "--batches", str(args.batches),
                    "--warmup", str(args.warmup), "--out", out], check=True, stdout=sys.stdout)
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def print_comparison(rows: list[dict], official: dict) -> None:
    """Ours (one thread per process) against official at each worker count: images/s, and
    images/s per core used (images per CPU second)."""
    theirs = {r["workers"]: r for r in official["rows"]}
    print(f"\n{'workers':>7} {'ours img/s':>10} {'official img/s':>14} {'ours/official':>13} "
          f"{'ours img/CPU s':>14} {'official img/CPU s':>18} {'ours/official':>13}")
    for r in rows:
        if r["threads"] == 1 and r["workers"] in theirs:
            o = theirs[r["workers"]]
            per_core, official_per_core = (x["images_per_s"] / x["cores_used"] for x in (r, o))
            print(f"{r['workers']:>7} {r['images_per_s']:>10.1f} {o['images_per_s']:>14.1f} "
                  f"{r['images_per_s'] / o['images_per_s']:>13.2f} {per_core:>14.1f} "
                  f"{official_per_core:>18.1f} {per_core / official_per_core:>13.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches (worker start-up)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--coco", help="an existing COCO-format folder (default: synthetic JPEGs)")
    parser.add_argument("--official-python", help="a python with torch + torchvision: also time official DETR's pipeline")
    parser.add_argument("--out", default="bench_results/bench_input.json")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        coco_dir = args.coco or tmp
        if not args.coco:
            source = _Resized(SyntheticShapesSource(args.images, seed=0, image_size=(480, 640)), 480, 640)
            start = time.perf_counter()
            write_coco_folder(source, tmp, split="train", image_format="jpeg")
            print(f"wrote {args.images} 640x480 JPEGs in {time.perf_counter() - start:.1f}s")
        rows = [
            bench(coco_dir, w, t, args.batch_size, args.warmup, args.batches)
            for w in args.workers
            for t in args.threads
        ]
        official = official_rows(args, coco_dir, tmp) if args.official_python else None

    print(f"\n{'workers':>7} {'threads':>7} {'images/s':>9} {'s/batch':>8} {'warmup s':>8} {'shapes':>6} "
          f"{'main CPU s/b':>12} {'worker CPU s/b':>14} {'cores used':>10}")
    for r in rows:
        print(f"{r['workers']:>7} {r['threads']:>7} {r['images_per_s']:>9.1f} "
              f"{r['seconds'] / r['batches']:>8.3f} {r['warmup_seconds']:>8.2f} {r['distinct_shapes']:>6} "
              f"{r['main_cpu_s_per_batch']:>12.3f} {r['worker_cpu_s_per_batch']:>14.3f} {r['cores_used']:>10.2f}")
    if official:
        print_comparison(rows, official)
    result = {
        "benchmark": "training input pipeline, COCO-size augmentation, JPEG folder",
        "images": args.coco or f"{args.images} synthetic 640x480",
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "rows": rows,
        "official": official,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"\n1-min load average before/after: {result['load_average_1min']} on {os.cpu_count()} CPUs")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
