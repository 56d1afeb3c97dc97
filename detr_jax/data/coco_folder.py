"""COCO-format dataset: an `instances_*.json` file plus a folder of images.

Images are ordered by image id (as torchvision's CocoDetection, used by official DETR).
Category ids are used as they are in the file. Annotation boxes (x, y, w, h) in pixels
become (x0, y0, x1, y1); they are not cleaned here (see `transforms.clean_record`), but
the number that cleaning will drop is logged once when the file is read.
Images without annotations are kept.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import numpy as np

from detr_jax.data.images import decode_image
from detr_jax.data.records import DatasetFormatError, Record, empty_annotations

log = logging.getLogger(__name__)


class CocoFolderSource:
    """Random-access COCO-format dataset.

    Args:
      annotation_file: COCO json with `images`, `categories` and (optionally) `annotations`.
      image_dir: folder the images' `file_name`s are relative to.
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike):
        self.annotation_file = str(annotation_file)
        self.image_dir = str(image_dir)
        data = _read_json(self.annotation_file)
        self.category_names = _parse_categories(data, self.annotation_file)
        images = _parse_images(data, self.annotation_file)
        self._image_ids = np.array(sorted(images), dtype=np.int64)
        self._file_names = [images[i][0] for i in self._image_ids]
        self._sizes = [images[i][1] for i in self._image_ids]
        self._annotations = _parse_annotations(
            data, self.annotation_file, images, self.category_names
        )
        self.num_degenerate_boxes = self._count_degenerate()
        if self.num_degenerate_boxes:
            log.warning(
                "%s: %d boxes have zero or negative size after clipping to the image; "
                "they are dropped when loaded",
                self.annotation_file,
                self.num_degenerate_boxes,
            )

    @property
    def num_classes(self) -> int:
        return max(self.category_names, default=0) + 1

    def __len__(self) -> int:
        return len(self._image_ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self._file_names[index])

    def image_files(self) -> list[tuple[str, tuple[int, int] | None]]:
        """(path, (height, width) from the annotation file or None) of every image, in order."""
        return [(self.image_path(i), size) for i, size in enumerate(self._sizes)]

    def box_counts(self) -> np.ndarray:
        """int64 [N]: the non-crowd boxes of each image (what training pads to max_boxes)."""
        return np.array([int(np.sum(~self._annotations.get(int(i), empty_annotations())[2]))
                         for i in self._image_ids], np.int64)

    def annotations(self, index: int) -> Record:
        image_id = int(self._image_ids[index])
        boxes, labels, is_crowd = self._annotations.get(image_id, empty_annotations())
        return Record(
            image=None,
            boxes=boxes.copy(),
            labels=labels.copy(),
            is_crowd=is_crowd.copy(),
            image_id=image_id,
            orig_size=self._sizes[index] or (0, 0),
            name=self.image_path(index),
        )

    def __getitem__(self, index: int) -> Record:
        record = self.annotations(index)
        record.image = decode_image(record.name, expected_size=self._sizes[index])
        record.orig_size = record.image.shape[:2]
        return record

    def _count_degenerate(self) -> int:
        count = 0
        for index, image_id in enumerate(self._image_ids):
            size = self._sizes[index]
            boxes = self._annotations.get(int(image_id), empty_annotations())[0]
            if size is not None and len(boxes):
                h, w = size
                x0, x1 = np.clip(boxes[:, 0], 0, w), np.clip(boxes[:, 2], 0, w)
                y0, y1 = np.clip(boxes[:, 1], 0, h), np.clip(boxes[:, 3], 0, h)
                count += int(np.sum((x1 <= x0) | (y1 <= y0)))
        return count


def _read_json(path: str) -> dict:
    file = pathlib.Path(path)
    if file.is_dir():
        raise DatasetFormatError(
            f"{path}: is a directory; the annotation file must be a COCO instances JSON file "
            "(such as annotations/instances_train2017.json)"
        )
    if not file.is_file():
        raise DatasetFormatError(f"{path}: annotation file not found")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetFormatError(f"{path}: annotation file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(
            f"{path}: not a COCO annotation file (top level is a {type(data).__name__}, "
            "expected an object with 'images', 'annotations' and 'categories')"
        )
    missing = [key for key in ("images", "categories") if key not in data]
    if missing:
        raise DatasetFormatError(
            f"{path}: not a COCO annotation file: missing {', '.join(map(repr, missing))} "
            f"(found keys: {', '.join(sorted(data)) or 'none'})"
        )
    if "annotations" not in data:
        log.warning("%s: no 'annotations' list; every image has no objects", path)
    return data


def _parse_categories(data: dict, path: str) -> dict[int, str]:
    names = {}
    for i, category in enumerate(_as_list(data, "categories", path)):
        try:
            names[int(category["id"])] = str(category.get("name", category["id"]))
        except (KeyError, TypeError, ValueError):
            raise DatasetFormatError(f"{path}: categories[{i}] has no integer 'id'") from None
    if any(i < 0 for i in names):
        raise DatasetFormatError(f"{path}: negative category id {min(names)}")
    return names


def _parse_images(data: dict, path: str) -> dict[int, tuple[str, tuple[int, int] | None]]:
    """{image id: (file_name, (height, width) or None)}."""
    images = {}
    for i, image in enumerate(_as_list(data, "images", path)):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DatasetFormatError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        image_id = int(image["id"])
        if image_id in images:
            raise DatasetFormatError(f"{path}: duplicate image id {image_id}")
        size = None
        if "height" in image and "width" in image:
            size = (int(image["height"]), int(image["width"]))
        images[image_id] = (str(image["file_name"]), size)
    return images


def _parse_annotations(data, path, images, category_names):
    """{image id: (boxes xyxy float32 [N, 4], labels int32 [N], is_crowd bool [N])}."""
    grouped: dict[int, list] = {}
    for i, ann in enumerate(_as_list(data, "annotations", path, required=False)):
        ann_id = ann.get("id", f"#{i}") if isinstance(ann, dict) else f"#{i}"
        where = f"{path}: annotation {ann_id}"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "category_id", "bbox")):
            raise DatasetFormatError(f"{where} needs 'image_id', 'category_id' and 'bbox'")
        if ann["category_id"] not in category_names:
            raise DatasetFormatError(
                f"{where}: unknown category id {ann['category_id']} "
                f"(known: {sorted(category_names)})"
            )
        if ann["image_id"] not in images:
            raise DatasetFormatError(f"{where}: unknown image id {ann['image_id']}")
        bbox = ann["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DatasetFormatError(f"{where}: 'bbox' must be [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        grouped.setdefault(int(ann["image_id"]), []).append(
            ((x, y, x + w, y + h), int(ann["category_id"]), bool(ann.get("iscrowd", 0)))
        )
    out = {}
    for image_id, anns in grouped.items():
        boxes, labels, crowd = zip(*anns)
        out[image_id] = (
            np.array(boxes, np.float32).reshape(-1, 4),
            np.array(labels, np.int32),
            np.array(crowd, bool),
        )
    return out


def _as_list(data: dict, key: str, path: str, required: bool = True) -> list:
    value = data.get(key, None if required else [])
    if not isinstance(value, list):
        raise DatasetFormatError(f"{path}: {key!r} must be a list, got {type(value).__name__}")
    return value
