"""COCO-format dataset: an `instances_*.json` file plus a folder of images.

Images are ordered by image id (as torchvision's CocoDetection, used by official DETR).
Category ids are used as they are in the file. Annotation boxes (x, y, w, h) in pixels
become (x0, y0, x1, y1); they are not cleaned here (see `transforms.clean_record`), but
the number that cleaning will drop is logged once when the file is read.
Images without annotations are kept.

With `masks=True` each annotation's "segmentation" becomes its mask, decoded with
pycocotools as official DETR's `convert_coco_poly_to_mask` does: a list of polygons (their
union; a polygon of fewer than 3 points has no area and is ignored), an uncompressed RLE
(counts a list) or a compressed one (counts a string), e.g. a crowd region. The format is
checked when the file is read (a missing or malformed segmentation, or an RLE of another
size than its image, is a DatasetFormatError naming the file and the annotation id); masks
are decoded when an example is loaded.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from pycocotools import mask as mask_utils

from detr_jax.data.coco_json import as_list, parse_categories, parse_images, read_coco_json
from detr_jax.data.images import decode_image
from detr_jax.data.records import DatasetFormatError, Record, empty_annotations

log = logging.getLogger(__name__)


class CocoFolderSource:
    """Random-access COCO-format dataset.

    Args:
      annotation_file: COCO json with `images`, `categories` and (optionally) `annotations`.
      image_dir: folder the images' `file_name`s are relative to.
      masks: records carry `masks` from the annotations' "segmentation" (every annotation
        needs one, and every image its "height" and "width").

    Attributes:
      category_names: {category id: name}.
      category_isthing: {category id: True}: instance annotations are all "things".
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, masks: bool = False):
        self.annotation_file = str(annotation_file)
        self.image_dir = str(image_dir)
        self.masks = bool(masks)
        data = read_coco_json(self.annotation_file, "instances")
        if "annotations" not in data:
            log.warning("%s: no 'annotations' list; every image has no objects", self.annotation_file)
        self.category_names = parse_categories(data, self.annotation_file)
        self.category_isthing = dict.fromkeys(self.category_names, True)
        images = parse_images(data, self.annotation_file)
        if self.masks:
            for image_id, (file_name, size) in images.items():
                if size is None:
                    raise DatasetFormatError(
                        f"{self.annotation_file}: image {image_id} ({file_name}) needs 'height' and 'width' for masks"
                    )
        self._image_ids = np.array(sorted(images), dtype=np.int64)
        self._file_names = [images[i][0] for i in self._image_ids]
        self._sizes = [images[i][1] for i in self._image_ids]
        self._annotations, self._segmentations = _parse_annotations(
            data, self.annotation_file, images, self.category_names, self.masks
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
        size = self._sizes[index] or (0, 0)  # known with masks
        masks = None
        if self.masks:
            segmentations = self._segmentations.get(image_id, [])
            masks = np.zeros((len(segmentations), *size), bool)
            for k, (ann_id, segmentation) in enumerate(segmentations):
                masks[k] = _decode_segmentation(segmentation, size, f"{self.annotation_file}: annotation {ann_id}")
        return Record(
            image=None,
            boxes=boxes.copy(),
            labels=labels.copy(),
            is_crowd=is_crowd.copy(),
            image_id=image_id,
            orig_size=size,
            name=self.image_path(index),
            masks=masks,
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


def _parse_annotations(data, path, images, category_names, masks: bool = False):
    """({image id: (boxes xyxy float32 [N, 4], labels int32 [N], is_crowd bool [N])},
    {image id: [(annotation id, segmentation)] in the same order}, empty unless `masks`)."""
    grouped: dict[int, list] = {}
    segmentations: dict[int, list] = {}
    for i, ann in enumerate(as_list(data, "annotations", path, required=False)):
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
        if masks:
            if "segmentation" not in ann:
                raise DatasetFormatError(f"{where}: no 'segmentation' (masks need one per annotation)")
            _check_segmentation(ann["segmentation"], images[ann["image_id"]][1], where)
            segmentations.setdefault(int(ann["image_id"]), []).append((ann_id, ann["segmentation"]))
    out = {}
    for image_id, anns in grouped.items():
        boxes, labels, crowd = zip(*anns)
        out[image_id] = (
            np.array(boxes, np.float32).reshape(-1, 4),
            np.array(labels, np.int32),
            np.array(crowd, bool),
        )
    return out, segmentations


def _check_segmentation(segmentation, size: tuple[int, int], where: str) -> None:
    """DatasetFormatError unless `segmentation` is polygons [[x0, y0, x1, y1, ...], ...] or an
    RLE {"size": [h, w] = size, "counts": str or run lengths summing to h * w}."""
    if isinstance(segmentation, list):
        for polygon in segmentation:  # the numbers themselves are checked when decoded
            if not isinstance(polygon, list) or len(polygon) % 2:
                raise DatasetFormatError(
                    f"{where}: 'segmentation' polygons must be lists of x, y pixel coordinates, got {polygon!r:.80}"
                )
        return
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise DatasetFormatError(
            f"{where}: 'segmentation' must be a list of polygons or an RLE with 'counts' and 'size', "
            f"got {segmentation!r:.80}"
        )
    if list(segmentation["size"]) != list(size):
        raise DatasetFormatError(f"{where}: RLE 'size' {segmentation['size']} is not the image's [height, width] "
                                 f"{list(size)}")
    counts = segmentation["counts"]
    if isinstance(counts, str):  # pycocotools reads memory past the mask where these do not add up
        counts = _compressed_counts(counts)
    if (not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts)
            or sum(counts) != size[0] * size[1]):
        raise DatasetFormatError(
            f"{where}: RLE 'counts' must be run lengths (non-negative integers, or COCO's string of them) summing "
            f"to height * width = {size[0] * size[1]}"
        )


def _compressed_counts(counts: str) -> list[int] | None:
    """The run lengths of a compressed RLE string (pycocotools' rleFrString), None if cut short.

    Each run is 6-bit characters from "0": 5 bits of value each, least significant first,
    bit 0x20 = more follow, 0x10 in the last = negative; from the fourth run on, the value
    is the difference to the run two before.
    """
    runs, p = [], 0
    while p < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if p == len(counts):
                return None
            c = ord(counts[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p, shift = p + 1, shift + 5
            if not more and c & 0x10:
                value -= 1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    return runs


def _decode_segmentation(segmentation, size: tuple[int, int], where: str) -> np.ndarray:
    """bool [H, W]: a segmentation `_check_segmentation` accepted, decoded by pycocotools."""
    h, w = size
    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if len(p) >= 6]  # pycocotools reads 4 numbers as a box
            if not polygons:
                return np.zeros(size, bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, h, w)
        else:
            rle = segmentation
        return mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError) as e:
        raise DatasetFormatError(f"{where}: 'segmentation' does not decode ({e})") from None
