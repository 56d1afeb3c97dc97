"""Throughput of the training input pipeline on COCO-like images.

Writes N synthetic 640x480 JPEG images (shapes dataset, resized) as a COCO-format folder in
a temporary directory, then times the training iterator with official DETR's COCO-size
augmentation (multi-scale 480..800 / max 1333, random crop branch, padding, normalization)
for each combination of worker processes and threads. Prints a table and writes JSON.

    python scripts/bench_input.py --workers 0 1 2 --threads 1 4 --out bench_results/bench_input.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from detr_jax.data import SyntheticShapesSource, make_train_iterator, write_coco_folder
from detr_jax.data.config import data_config
from detr_jax.data.records import Record


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
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
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
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches (worker start-up)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", default="bench_results/bench_input.json")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        source = _Resized(SyntheticShapesSource(args.images, seed=0, image_size=(480, 640)), 480, 640)
        start = time.perf_counter()
        write_coco_folder(source, tmp, split="train", image_format="jpeg")
        print(f"wrote {args.images} 640x480 JPEGs in {time.perf_counter() - start:.1f}s")
        rows = [
            bench(tmp, w, t, args.batch_size, args.warmup, args.batches)
            for w in args.workers
            for t in args.threads
        ]

    print(f"\n{'workers':>7} {'threads':>7} {'images/s':>9} {'s/batch':>8} {'warmup s':>8} {'shapes':>6}")
    for r in rows:
        print(f"{r['workers']:>7} {r['threads']:>7} {r['images_per_s']:>9.1f} "
              f"{r['seconds'] / r['batches']:>8.3f} {r['warmup_seconds']:>8.2f} {r['distinct_shapes']:>6}")
    result = {
        "benchmark": "training input pipeline, COCO-size augmentation, 640x480 JPEG",
        "images": args.images,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"\n1-min load average before/after: {result['load_average_1min']} on {os.cpu_count()} CPUs")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
