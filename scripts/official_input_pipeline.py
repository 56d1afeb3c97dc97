"""Throughput of official DETR's training input pipeline (PyTorch) over a COCO-format folder.

The reference side of the input-pipeline comparison with `scripts/bench_input.py`; it does not
import detr_jax. Needs torch, torchvision and Pillow (no pycocotools: the JSON is read with
`json`, grouped as pycocotools' COCO index does). Folder layout, as make_photo_coco.py writes:
DIR/train/*.jpg and DIR/annotations/instances_train.json.

Reproduced from facebookresearch/detr (commit 29901c5, Apache License 2.0, Copyright (c)
Facebook, Inc. and its affiliates), the logic copied as is except where noted:
  datasets/coco.py        CocoDetection (with torchvision.datasets.CocoDetection's loading:
                          ids = sorted image ids, PIL.Image.open(path).convert('RGB')),
                          ConvertCocoPolysToMask (return_masks=False), make_coco_transforms('train')
  datasets/transforms.py  crop, hflip, resize, RandomSizeCrop, RandomHorizontalFlip,
                          RandomResize, RandomSelect, ToTensor, Normalize, Compose
  util/box_ops.py         box_xyxy_to_cxcywh
  util/misc.py            collate_fn, _max_by_axis, NestedTensor, nested_tensor_from_tensor_list
  main.py                 RandomSampler + BatchSampler(drop_last=True) + DataLoader(collate_fn)
Left out, as they never run for an instances file with return_masks=False: the masks and
keypoints branches, and nested_tensor_from_tensor_list's ONNX-tracing branch.

Batch (as official): (NestedTensor(tensors float32 [B, 3, Hmax, Wmax] normalized, zero-padded
bottom/right to the batch's largest image; mask bool [B, Hmax, Wmax], True on padding),
targets: tuple of B dicts with boxes float32 [N, 4] (cx, cy, w, h) / (w, h), labels int64 [N],
image_id, area, iscrowd, orig_size, size).

Timing follows bench_input.py: per worker count, the untimed warm-up batches (starting the
DataLoader iterator, i.e. forking the workers, included) then `--batches` timed batches.
torch runs single-threaded in the main process and in the workers: DataLoader already sets
torch.set_num_threads(1) in each worker process; setting it in the main process too makes the
0-worker row one core, like bench_input.py's 1-thread rows (one thread per process). PIL's
decode and resize are single-threaded anyway, so torch's intra-op threads would only speed up
to_tensor / normalize / the padding copy with workers=0.

    python scripts/official_input_pipeline.py --coco /tmp/photo_coco --workers 0 1 2 \\
        --out bench_results/official_input.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import time

import PIL
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image


# ----- util/box_ops.py

def box_xyxy_to_cxcywh(x):
    x0, y0, x1, y1 = x.unbind(-1)
    b = [(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0), (y1 - y0)]
    return torch.stack(b, dim=-1)


# ----- datasets/coco.py (+ torchvision.datasets.CocoDetection, without pycocotools)

class CocoDetection(torch.utils.data.Dataset):
    def __init__(self, img_folder, ann_file, transforms, return_masks=False):
        assert not return_masks, "masks are not reproduced"
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
        self.root = img_folder
        self.imgs = {img["id"]: img for img in data["images"]}
        self.img_to_anns = collections.defaultdict(list)  # file order, as pycocotools' index
        for ann in data.get("annotations", []):
            self.img_to_anns[ann["image_id"]].append(ann)
        self.ids = list(sorted(self.imgs.keys()))
        self._transforms = transforms
        self.prepare = ConvertCocoPolysToMask(return_masks)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        image_id = self.ids[idx]
        img = Image.open(os.path.join(self.root, self.imgs[image_id]["file_name"])).convert("RGB")
        target = {"image_id": image_id, "annotations": self.img_to_anns[image_id]}
        img, target = self.prepare(img, target)
        if self._transforms is not None:
            img, target = self._transforms(img, target)
        return img, target


class ConvertCocoPolysToMask:
    def __init__(self, return_masks=False):
        self.return_masks = return_masks

    def __call__(self, image, target):
        w, h = image.size
        image_id = torch.tensor([target["image_id"]])
        anno = [obj for obj in target["annotations"] if "iscrowd" not in obj or obj["iscrowd"] == 0]

        boxes = [obj["bbox"] for obj in anno]
        # guard against no boxes via resizing
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        classes = torch.tensor([obj["category_id"] for obj in anno], dtype=torch.int64)

        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": boxes[keep], "labels": classes[keep], "image_id": image_id}
        area = torch.tensor([obj["area"] for obj in anno])
        iscrowd = torch.tensor([obj["iscrowd"] if "iscrowd" in obj else 0 for obj in anno])
        target["area"] = area[keep]
        target["iscrowd"] = iscrowd[keep]
        target["orig_size"] = torch.as_tensor([int(h), int(w)])
        target["size"] = torch.as_tensor([int(h), int(w)])
        return image, target


def make_coco_transforms_train():
    normalize = Compose([ToTensor(), Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    scales = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    return Compose([
        RandomHorizontalFlip(),
        RandomSelect(
            RandomResize(scales, max_size=1333),
            Compose([
                RandomResize([400, 500, 600]),
                RandomSizeCrop(384, 600),
                RandomResize(scales, max_size=1333),
            ]),
        ),
        normalize,
    ])


# ----- datasets/transforms.py

def crop(image, target, region):
    cropped_image = F.crop(image, *region)
    target = target.copy()
    i, j, h, w = region
    target["size"] = torch.tensor([h, w])
    fields = ["labels", "area", "iscrowd"]
    if "boxes" in target:
        boxes = target["boxes"]
        max_size = torch.as_tensor([w, h], dtype=torch.float32)
        cropped_boxes = boxes - torch.as_tensor([j, i, j, i])
        cropped_boxes = torch.min(cropped_boxes.reshape(-1, 2, 2), max_size)
        cropped_boxes = cropped_boxes.clamp(min=0)
        area = (cropped_boxes[:, 1, :] - cropped_boxes[:, 0, :]).prod(dim=1)
        target["boxes"] = cropped_boxes.reshape(-1, 4)
        target["area"] = area
        fields.append("boxes")
        # remove elements for which the boxes have zero area
        cropped_boxes = target["boxes"].reshape(-1, 2, 2)
        keep = torch.all(cropped_boxes[:, 1, :] > cropped_boxes[:, 0, :], dim=1)
        for field in fields:
            target[field] = target[field][keep]
    return cropped_image, target


def hflip(image, target):
    flipped_image = F.hflip(image)
    w, h = image.size
    target = target.copy()
    if "boxes" in target:
        boxes = target["boxes"]
        boxes = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor([w, 0, w, 0])
        target["boxes"] = boxes
    return flipped_image, target


def resize(image, target, size, max_size=None):
    # size can be min_size (scalar) or (w, h) tuple

    def get_size_with_aspect_ratio(image_size, size, max_size=None):
        w, h = image_size
        if max_size is not None:
            min_original_size = float(min((w, h)))
            max_original_size = float(max((w, h)))
            if max_original_size / min_original_size * size > max_size:
                size = int(round(max_size * min_original_size / max_original_size))
        if (w <= h and w == size) or (h <= w and h == size):
            return (h, w)
        if w < h:
            ow = size
            oh = int(size * h / w)
        else:
            oh = size
            ow = int(size * w / h)
        return (oh, ow)

    def get_size(image_size, size, max_size=None):
        if isinstance(size, (list, tuple)):
            return size[::-1]
        return get_size_with_aspect_ratio(image_size, size, max_size)

    size = get_size(image.size, size, max_size)
    rescaled_image = F.resize(image, size)  # PIL image: PIL bilinear (antialiased)
    if target is None:
        return rescaled_image, None
    ratios = tuple(float(s) / float(s_orig) for s, s_orig in zip(rescaled_image.size, image.size))
    ratio_width, ratio_height = ratios
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_width, ratio_height, ratio_width, ratio_height])
    if "area" in target:
        target["area"] = target["area"] * (ratio_width * ratio_height)
    h, w = size
    target["size"] = torch.tensor([h, w])
    return rescaled_image, target


class RandomSizeCrop:
    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, img: PIL.Image.Image, target: dict):
        w = random.randint(self.min_size, min(img.width, self.max_size))
        h = random.randint(self.min_size, min(img.height, self.max_size))
        region = T.RandomCrop.get_params(img, [h, w])
        return crop(img, target, region)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, target):
        if random.random() < self.p:
            return hflip(img, target)
        return img, target


class RandomResize:
    def __init__(self, sizes, max_size=None):
        assert isinstance(sizes, (list, tuple))
        self.sizes = sizes
        self.max_size = max_size

    def __call__(self, img, target=None):
        size = random.choice(self.sizes)
        return resize(img, target, size, self.max_size)


class RandomSelect:
    """transforms1 with probability p, otherwise transforms2."""

    def __init__(self, transforms1, transforms2, p=0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, img, target):
        if random.random() < self.p:
            return self.transforms1(img, target)
        return self.transforms2(img, target)


class ToTensor:
    def __call__(self, img, target):
        return F.to_tensor(img), target


class Normalize:
    def __init__(self, mean, std):
        self.mean = mean
        self.std = std

    def __call__(self, image, target=None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        h, w = image.shape[-2:]
        if "boxes" in target:
            boxes = box_xyxy_to_cxcywh(target["boxes"])
            target["boxes"] = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


# ----- util/misc.py

def collate_fn(batch):
    batch = list(zip(*batch))
    batch[0] = nested_tensor_from_tensor_list(batch[0])
    return tuple(batch)


def _max_by_axis(the_list):
    maxes = the_list[0]
    for sublist in the_list[1:]:
        for index, item in enumerate(sublist):
            maxes[index] = max(maxes[index], item)
    return maxes


class NestedTensor:
    def __init__(self, tensors, mask):
        self.tensors = tensors
        self.mask = mask


def nested_tensor_from_tensor_list(tensor_list):
    max_size = _max_by_axis([list(img.shape) for img in tensor_list])
    batch_shape = [len(tensor_list)] + max_size
    b, c, h, w = batch_shape
    dtype = tensor_list[0].dtype
    device = tensor_list[0].device
    tensor = torch.zeros(batch_shape, dtype=dtype, device=device)
    mask = torch.ones((b, h, w), dtype=torch.bool, device=device)
    for img, pad_img, m in zip(tensor_list, tensor, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensor, mask)


# ----- benchmark

def _one_thread(_worker_id):
    torch.set_num_threads(1)  # DataLoader already does this in workers; stated, not relied on


def bench(dataset, workers: int, batch_size: int, warmup: int, batches: int, seed: int) -> dict:
    """Times `batches` batches after `warmup` untimed ones (as official main.py builds its loader)."""
    if warmup + batches > len(dataset) // batch_size:
        raise SystemExit(f"{warmup}+{batches} batches need {(warmup + batches) * batch_size} "
                         f"images; the folder has {len(dataset)}")
    random.seed(seed)  # the transforms' randomness with workers=0 (workers are seeded by torch)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                         num_workers=workers, worker_init_fn=_one_thread,
                                         generator=generator)
    start = time.perf_counter()
    iterator = iter(loader)  # forks the workers
    shapes = set()
    for _ in range(warmup):
        shapes.add(tuple(next(iterator)[0].tensors.shape))
    first = time.perf_counter() - start
    pids = [w.pid for w in getattr(iterator, "_workers", [])]  # the DataLoader's worker processes
    cpu_before = cpu_seconds(pids)
    start = time.perf_counter()
    for _ in range(batches):
        shapes.add(tuple(next(iterator)[0].tensors.shape))
    elapsed = time.perf_counter() - start
    main_cpu, worker_cpu = (after - before for after, before in zip(cpu_seconds(pids), cpu_before))
    del iterator  # shuts the workers down
    return {
        "workers": workers,
        "threads": 1,
        "batch_size": batch_size,
        "batches": batches,
        "seconds": round(elapsed, 3),
        "images_per_s": round(batches * batch_size / elapsed, 2),
        "warmup_seconds": round(first, 3),
        "distinct_shapes": len(shapes),
        # as bench_input.py reports ours: CPU seconds per batch of the main process and of
        # the workers; cores_used = all CPU time / wall time
        "main_cpu_s_per_batch": round(main_cpu / batches, 4),
        "worker_cpu_s_per_batch": round(worker_cpu / batches, 4),
        "cores_used": round((main_cpu + worker_cpu) / elapsed, 2),
    }


def cpu_seconds(worker_pids) -> tuple[float, float]:
    """(user + system CPU seconds of this process, of the worker processes `worker_pids`),
    from /proc (Linux; this environment need not have psutil)."""
    times = os.times()
    ticks = os.sysconf("SC_CLK_TCK")
    workers = 0.0
    for pid in worker_pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        workers += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime: fields 14, 15 of stat
    return times.user + times.system, workers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", required=True, help="folder with train/ and annotations/instances_train.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches (worker start-up)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed", type=int, default=42)  # official main.py's default
    parser.add_argument("--out", default="bench_results/official_input.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per process (see the module docstring)

    dataset = CocoDetection(os.path.join(args.coco, "train"),
                            os.path.join(args.coco, "annotations", "instances_train.json"),
                            transforms=make_coco_transforms_train(), return_masks=False)
    load_before = os.getloadavg()[0]
    rows = [bench(dataset, w, args.batch_size, args.warmup, args.batches, args.seed) for w in args.workers]

    print(f"\n{'workers':>7} {'images/s':>9} {'s/batch':>8} {'warmup s':>8} {'shapes':>6} "
          f"{'main CPU s/b':>12} {'worker CPU s/b':>14} {'cores used':>10}")
    for r in rows:
        print(f"{r['workers']:>7} {r['images_per_s']:>9.1f} {r['seconds'] / r['batches']:>8.3f} "
              f"{r['warmup_seconds']:>8.2f} {r['distinct_shapes']:>6} {r['main_cpu_s_per_batch']:>12.3f} "
              f"{r['worker_cpu_s_per_batch']:>14.3f} {r['cores_used']:>10.2f}")
    result = {
        "benchmark": "official DETR training input pipeline (PyTorch DataLoader), COCO train transforms",
        "coco": os.path.abspath(args.coco),
        "images": len(dataset),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
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
