"""Writes a small COCO-format detection folder of JPEGs made from real photographs.

    OUT/train/000000000001.jpg ...            N JPEGs (quality 90, baseline, 4:2:0, like COCO's)
    OUT/annotations/instances_train.json      COCO instances file: images, annotations, categories

Each image is a random crop (of the largest window with the target aspect ratio, 70-100% of
its side), optionally mirrored, of one of scikit-image's bundled colour photographs, resized
(PIL Lanczos) to a common COCO size (W x H) drawn from `SIZES`. Each image gets 1-8 random
boxes: bbox [x, y, w, h] in pixels inside the image, w, h >= 8, category_id in 1..90,
iscrowd 0, area w * h. The boxes are placeholders (they do not follow the photo's content):
they exist so that both input pipelines have targets to transform. Deterministic for --seed.

Photographs (those of `PHOTOS` that load offline from the installed scikit-image; others are
skipped), with the licence stated in each loader's docstring in `skimage.data` (scikit-image
0.26):
  astronaut             NASA, Eileen Collins: no known copyright restrictions, public domain
  coffee                Rachel Michetti: CC0
  chelsea               Stefan van der Walt: CC0
  rocket                SpaceX (DSCOVR launch): released into the public domain
  immunohistochemistry  CMMI microscopy: no known copyright restrictions
  hubble_deep_field     NASA: may be freely used, public domain
Left out: retina (CC0, but mostly a black border, unlike COCO scenes) and
stereo_motorcycle (Middlebury 2014; its docstring states no licence).
At 640x480 q90 these photos give ~30-90 kB JPEGs, smaller than COCO train2017's ~160 kB
average (18 GB / 118k): they are smoother than COCO's Flickr photos, so entropy decoding is
somewhat cheaper than on COCO.

Needs numpy, Pillow and scikit-image (not detr_jax).

    python scripts/make_photo_coco.py /tmp/photo_coco --images 200 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "hubble_deep_field")
# (width, height): common COCO train2017 sizes; 640x480 and 640x427 (landscape) dominate.
SIZES = ((640, 480), (640, 480), (640, 480), (640, 427), (640, 427), (480, 640),
         (427, 640), (640, 360), (500, 375), (640, 512), (612, 612), (640, 425))
JPEG_QUALITY = 90


def load_photos() -> dict[str, np.ndarray]:
    """{name: uint8 [H, W, 3]} for the photos of PHOTOS that load without a download."""
    import skimage.data  # pylint: disable=import-outside-toplevel

    photos = {}
    for name in PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception as e:  # missing loader, or one that needs pooch / the network
            print(f"skipping {name}: {type(e).__name__}: {e}")
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            photos[name] = np.ascontiguousarray(image[..., :3])
    if not photos:
        raise SystemExit("no photographs could be loaded from skimage.data")
    return photos


def make_image(photo: np.ndarray, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A random crop with aspect width/height of `photo`, maybe mirrored, resized to (width, height)."""
    ph, pw = photo.shape[:2]
    crop_w = min(pw, ph * width / height)  # largest window of the target aspect ratio
    scale = rng.uniform(0.7, 1.0)  # little upscaling: the photos are small
    cw, ch = max(1, round(crop_w * scale)), max(1, round(crop_w * scale * height / width))
    x0, y0 = rng.integers(0, pw - cw + 1), rng.integers(0, ph - ch + 1)
    image = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw])
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image.resize((width, height), Image.LANCZOS)


def random_boxes(width: int, height: int, rng: np.random.Generator) -> list[list[float]]:
    """1-8 boxes [x, y, w, h] (pixels, 2 decimals, as in COCO files) inside the image."""
    boxes = []
    for _ in range(rng.integers(1, 9)):
        w, h = rng.uniform(8, width), rng.uniform(8, height)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([round(float(v), 2) for v in (x, y, w, h)])
    return boxes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (gets train/ and annotations/)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    photos = load_photos()
    names = sorted(photos)
    rng = np.random.default_rng(args.seed)
    os.makedirs(os.path.join(args.out, "train"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "annotations"), exist_ok=True)

    images, annotations = [], []
    total_bytes, sizes, used = 0, collections.Counter(), collections.Counter()
    for image_id in range(1, args.images + 1):
        name = names[rng.integers(len(names))]
        width, height = SIZES[rng.integers(len(SIZES))]
        file_name = f"{image_id:012d}.jpg"
        path = os.path.join(args.out, "train", file_name)
        make_image(photos[name], width, height, rng).save(path, "JPEG", quality=JPEG_QUALITY)
        total_bytes += os.path.getsize(path)
        sizes[f"{width}x{height}"] += 1
        used[name] += 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for bbox in random_boxes(width, height, rng):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "bbox": bbox,
                "category_id": int(rng.integers(1, 91)), "iscrowd": 0,
                "area": round(bbox[2] * bbox[3], 2),
            })

    coco = {
        "info": {"description": f"make_photo_coco.py --images {args.images} --seed {args.seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": f"category_{i}"} for i in range(1, 91)],
    }
    ann_file = os.path.join(args.out, "annotations", "instances_train.json")
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump(coco, f)

    print(f"wrote {len(images)} JPEGs (q{JPEG_QUALITY}) to {os.path.join(args.out, 'train')}: "
          f"{total_bytes / 1e6:.1f} MB, {total_bytes / 1e3 / len(images):.0f} kB per image")
    print(f"wrote {len(annotations)} boxes to {ann_file}")
    print("sizes (WxH):  " + ", ".join(f"{k} {v}" for k, v in sizes.most_common()))
    print("photos:       " + ", ".join(f"{k} {v}" for k, v in used.most_common()))


if __name__ == "__main__":
    main()
