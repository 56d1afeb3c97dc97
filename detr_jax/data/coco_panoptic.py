"""COCO panoptic dataset: a `panoptic_*.json` file, a folder of images, a folder of PNGs.

The format (panopticapi, as official DETR's datasets/coco_panoptic.py reads it): the JSON
has "images" (id, file_name, height, width), "categories" (id, name, isthing) and
"annotations", one per image: image_id, file_name of its PNG and segments_info
[{id, category_id, iscrowd, bbox, area}]. The PNG is RGB; each pixel holds the id of its
segment, id = R + 256 G + 256^2 B (`rgb_to_id`); 0 is void (unlabelled).

Each segment is one object of the `Record`, "stuff" (sky, grass) as well as "things":
labels are the category ids as in the file, `masks` the segment's pixels, `is_crowd` its
iscrowd. Choices (official DETR's in brackets):
- Examples are the images that have an entry in "annotations", ordered by image id
  [DETR iterates over the annotations]. An image without one has no ground truth at all
  (not even "all void"), so it is left out; the number is logged (`num_unannotated_images`).
- Boxes are the tight boxes of the segments' pixels in the PNG, (x0, y0, x1, y1) pixels with
  x1, y1 exclusive (one pixel at column 3: x0 = 3, x1 = 4), as every other source's; the
  JSON 'bbox' is not read, so boxes always agree with the masks [DETR's masks_to_boxes makes
  x1, y1 inclusive: one pixel narrower].
- A listed segment with no pixels in the PNG keeps its place with an all-False mask and the
  box (0, 0, 0, 0): `transforms.clean_record` drops it as degenerate, and the pipeline counts
  it, the rule shared by every source. A segment can vanish legitimately (a PNG resized with
  nearest neighbour), and dropping it mislabels no pixel.
- PNG pixels whose id is not in segments_info (other than 0) are an error
  (DatasetFormatError): they have no class, and calling them void would train a real object
  as background. [panopticapi refuses them in predictions.]
- A missing, unreadable PNG, or one whose size differs from the image's, raises
  ImageLoadError naming the PNG, as a bad image does: training can skip it
  (data.skip_bad_images), and `image_files()` lists the PNGs so the checks made when a run
  starts (`data.checks.check_image_files`) find it first.
- Missing keys, unknown category or image ids, a category without 'isthing', segment ids
  out of range or repeated in an image: DatasetFormatError when the file is read.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import numpy as np

from detr_jax.data.coco_json import as_list, parse_categories, parse_images, read_coco_json
from detr_jax.data.images import decode_image
from detr_jax.data.records import DatasetFormatError, Record
from detr_jax.data.panoptic_png import MAX_SEGMENT_ID, rgb_to_id

log = logging.getLogger(__name__)

def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of bool masks [N, H, W] -> float32 [N, 4] (x0, y0, x1, y1) pixels, x1 and y1
    exclusive; (0, 0, 0, 0) for an empty mask."""
    masks = np.asarray(masks, bool)
    n, h, w = masks.shape
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # [N, H], [N, W]
    boxes = np.stack(
        [cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)], axis=1
    ).astype(np.float32)
    boxes[~rows.any(axis=1)] = 0.0
    return boxes.reshape(n, 4)


class _Segments(NamedTuple):
    """One image's segments_info, in the file's order."""

    png_name: str
    ids: np.ndarray  # uint32 [N], 1..256^3-1
    labels: np.ndarray  # int32 [N] category ids
    is_crowd: np.ndarray  # bool [N]


class CocoPanopticSource:
    """Random-access COCO panoptic dataset; records always carry masks (boxes come from them).

    Args:
      annotation_file: panoptic json (`panoptic_{split}.json`) with `images`, `categories`
        (with `isthing`) and `annotations`.
      image_dir: folder the images' `file_name`s are relative to.
      panoptic_dir: folder the annotations' PNG `file_name`s are relative to.

    Attributes:
      category_names: {category id: name}.
      category_isthing: {category id: True for things, False for stuff}.
      num_unannotated_images: images of the file left out for having no annotation.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        panoptic_dir: str | os.PathLike,
    ):
        self.annotation_file = str(annotation_file)
        self.image_dir = str(image_dir)
        self.panoptic_dir = str(panoptic_dir)
        path = self.annotation_file
        data = read_coco_json(path, "panoptic")
        if "annotations" not in data:
            raise DatasetFormatError(f"{path}: not a COCO panoptic file: missing 'annotations'")
        self.category_names = parse_categories(data, path)
        self.category_isthing = _parse_isthing(data, path)
        images = parse_images(data, path)
        segments = _parse_segments(data, path, images, self.category_names)
        self._image_ids = np.array(sorted(segments), dtype=np.int64)
        self._file_names = [images[i][0] for i in self._image_ids]
        self._sizes = [images[i][1] for i in self._image_ids]
        self._segments = [segments[i] for i in self._image_ids]
        self.num_unannotated_images = len(images) - len(segments)
        if self.num_unannotated_images:
            log.warning(
                "%s: %d of %d images have no entry in 'annotations' (no panoptic PNG); they are left out",
                path, self.num_unannotated_images, len(images),
            )

    @property
    def num_classes(self) -> int:
        return max(self.category_names, default=0) + 1

    def __len__(self) -> int:
        return len(self._image_ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self._file_names[index])

    def png_path(self, index: int) -> str:
        """The panoptic PNG of example `index`."""
        return os.path.join(self.panoptic_dir, self._segments[index].png_name)

    def image_files(self) -> list[tuple[str, tuple[int, int] | None]]:
        """(path, (height, width) from the annotation file or None) of every file the source
        reads: each example's image, then its PNG (both must have that size)."""
        return [
            (path, size)
            for i, size in enumerate(self._sizes)
            for path in (self.image_path(i), self.png_path(i))
        ]

    def box_counts(self) -> np.ndarray:
        """int64 [N]: the non-crowd segments (things and stuff) of each image."""
        return np.array([int(np.sum(~s.is_crowd)) for s in self._segments], np.int64)

    def annotations(self, index: int) -> Record:
        """The example's targets and masks, read from its PNG only (`image` is None).

        Raises:
          ImageLoadError: the PNG is missing, unreadable or not of the image's size.
          DatasetFormatError: the PNG has pixels of a segment that segments_info lacks.
        """
        segments = self._segments[index]
        png = self.png_path(index)
        ids = rgb_to_id(decode_image(png, expected_size=self._sizes[index]))  # [H, W]
        masks = ids[None] == segments.ids[:, None, None]  # [N, H, W]
        labelled = masks.any(axis=0) | (ids == 0)
        if not labelled.all():
            unknown = np.unique(ids[~labelled])
            raise DatasetFormatError(
                f"{png}: segment ids {_head(unknown)} of the PNG are not in the segments_info of image "
                f"{int(self._image_ids[index])} in {self.annotation_file} (known: {_head(segments.ids)}; "
                "a panoptic PNG is RGB with id = R + 256 G + 256^2 B, 0 = void)"
            )
        return Record(
            image=None,
            boxes=masks_to_boxes(masks),
            labels=segments.labels.copy(),
            is_crowd=segments.is_crowd.copy(),
            image_id=int(self._image_ids[index]),
            orig_size=ids.shape,
            name=self.image_path(index),
            masks=masks,
        )

    def __getitem__(self, index: int) -> Record:
        record = self.annotations(index)
        record.image = decode_image(record.name, expected_size=record.orig_size)
        return record


def _parse_isthing(data: dict, path: str) -> dict[int, bool]:
    isthing = {}
    for i, category in enumerate(data["categories"]):  # parse_categories checked the ids
        if "isthing" not in category:
            raise DatasetFormatError(
                f"{path}: categories[{i}] (id {category['id']}) has no 'isthing' (1: thing, 0: stuff)"
            )
        isthing[int(category["id"])] = bool(category["isthing"])
    return isthing


def _parse_segments(data, path, images, category_names) -> dict[int, _Segments]:
    """{image id: its segments}, for the images that have an annotation."""
    out = {}
    for i, ann in enumerate(as_list(data, "annotations", path)):
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "file_name", "segments_info")):
            raise DatasetFormatError(
                f"{path}: annotations[{i}] needs 'image_id', 'file_name' and 'segments_info'"
            )
        image_id = ann["image_id"]
        if image_id not in images:
            raise DatasetFormatError(f"{path}: annotations[{i}]: unknown image id {image_id}")
        if image_id in out:
            raise DatasetFormatError(f"{path}: annotations[{i}]: a second annotation of image {image_id}")
        where = f"{path}: annotations[{i}] (image {image_id})"
        ids, labels, crowd = [], [], []
        for j, seg in enumerate(as_list(ann, "segments_info", where)):
            if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
                raise DatasetFormatError(f"{where}: segments_info[{j}] needs 'id' and 'category_id'")
            seg_id = seg["id"]
            if not isinstance(seg_id, int) or not 0 < seg_id <= MAX_SEGMENT_ID:
                raise DatasetFormatError(
                    f"{where}: segment id {seg_id!r} is not an integer in 1..{MAX_SEGMENT_ID} (0 is void)"
                )
            if seg_id in ids:
                raise DatasetFormatError(f"{where}: segment id {seg_id} appears twice in segments_info")
            if seg["category_id"] not in category_names:
                raise DatasetFormatError(
                    f"{where}: segment {seg_id} has unknown category id {seg['category_id']} "
                    f"(known: {sorted(category_names)})"
                )
            ids.append(seg_id)
            labels.append(int(seg["category_id"]))
            crowd.append(bool(seg.get("iscrowd", 0)))
        out[image_id] = _Segments(
            str(ann["file_name"]), np.array(ids, np.uint32), np.array(labels, np.int32), np.array(crowd, bool)
        )
    return out


def _head(values: np.ndarray, limit: int = 10) -> str:
    """The first `limit` values, for messages."""
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"
