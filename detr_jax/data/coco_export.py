"""Writing any source as COCO-format annotations (and image folders).

`to_coco_dict` gives pycocotools-ready ground truth for any source (boxes in original image
pixels, crowd objects included with iscrowd 1; masks, where the records have them, as RLE
segmentations). `write_coco_folder` writes a source in the official COCO layout,
`{dir}/annotations/instances_{split}.json` and `{dir}/{split}/`, so
`data.dataset="coco_folder"`, `data.coco_dir=dir` reads it back (with data.masks, its masks
too).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from detr_jax.ops.mask_rle import encode_masks
from detr_jax.data.records import DetectionSource

IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg"}


def to_coco_dict(source: DetectionSource, file_names: list[str] | None = None) -> dict:
    """COCO instances dict ({"images", "annotations", "categories"}) of a source.

    Where the records carry masks, each annotation also has "segmentation", the mask as
    compressed RLE (counts a str, so the dict is JSON-able), and "area" is the mask's pixel
    count (COCO's meaning) instead of the box's area. Categories have "isthing" (1 or 0)
    where the source has `category_isthing`.

    Args:
      source: any detection source; annotations come from `source.annotations(i)`.
      file_names: file name per example (default "{image_id:012d}.png").
    """
    images, annotations = [], []
    for index in range(len(source)):
        record = source.annotations(index)
        h, w = (int(v) for v in record.orig_size)
        name = file_names[index] if file_names else f"{record.image_id:012d}.png"
        images.append({"id": int(record.image_id), "file_name": name, "height": h, "width": w})
        has_masks = record.masks is not None
        segmentations = encode_masks(record.masks) if has_masks else [None] * len(record.boxes)
        areas = np.asarray(record.masks).sum(axis=(1, 2)) if has_masks else [None] * len(record.boxes)
        for box, label, crowd, segmentation, area in zip(record.boxes, record.labels, record.is_crowd,
                                                         segmentations, areas):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotation = {
                "id": len(annotations) + 1,
                "image_id": int(record.image_id),
                "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": max(0.0, x1 - x0) * max(0.0, y1 - y0),
                "iscrowd": int(crowd),
            }
            if segmentation is not None:
                annotation.update(segmentation=segmentation, area=float(area))
            annotations.append(annotation)
    isthing = getattr(source, "category_isthing", None)
    categories = [
        {"id": int(i), "name": n, **({"isthing": int(isthing[i])} if isthing is not None else {})}
        for i, n in sorted(source.category_names.items())
    ]
    return {"images": images, "annotations": annotations, "categories": categories}



def write_coco_folder(
    source: DetectionSource,
    directory: str | os.PathLike,
    split: str = "train",
    image_format: str = "png",
    jpeg_quality: int = 90,
) -> tuple[str, str]:
    """Writes every image of `source` and its annotations in the COCO layout.

    Args:
      image_format: "png" (lossless: pixels read back exactly) or "jpeg".

    Returns:
      (annotation_file, image_dir).
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r}: expected one of {tuple(IMAGE_FORMATS)}")
    directory = os.fspath(directory)
    image_dir = os.path.join(directory, split)
    annotation_dir = os.path.join(directory, "annotations")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(annotation_dir, exist_ok=True)
    file_names = []
    for index in range(len(source)):
        record = source[index]
        name = f"{record.image_id:012d}{IMAGE_FORMATS[image_format]}"
        options = {"quality": jpeg_quality} if image_format == "jpeg" else {}
        Image.fromarray(np.asarray(record.image, np.uint8)).save(os.path.join(image_dir, name), **options)
        file_names.append(name)
    annotation_file = os.path.join(annotation_dir, f"instances_{split}.json")
    with open(annotation_file, "w", encoding="utf-8") as f:
        json.dump(to_coco_dict(source, file_names), f)
    return annotation_file, image_dir
