"""Checks of a dataset against the run's settings, made when a run starts: a mistake is
reported at once, naming the annotation file, rather than as a NaN loss at step 1, a
silent "no object" class, or a crash at the first evaluation.

Sources offer what a check needs where it is cheap: every source has `category_names`;
file-based sources (`CocoFolderSource`) also `image_files()` and `box_counts()`. A check a
source cannot answer cheaply (a TFDS dataset's box counts) is skipped.
"""

from __future__ import annotations

import logging

from detr_jax.data.images import check_image_file
from detr_jax.data.records import DataError, DetectionSource, ImageLoadError

log = logging.getLogger(__name__)


def describe(source: DetectionSource) -> str:
    """How messages name a source: its annotation file, else its kind and split."""
    if getattr(source, "annotation_file", None):
        return source.annotation_file
    parts = [type(source).__name__, getattr(source, "name", ""), getattr(source, "split", "")]
    return " ".join(str(p) for p in parts if p)


def check_category_ids(source: DetectionSource, num_classes: int) -> None:
    """DataError unless every category id of `source` is a class of a head of `num_classes`.

    The class head predicts ids 0..num_classes-1 and index num_classes is "no object", so
    an id equal to num_classes would be trained as background, and a larger one makes the
    loss NaN. `source.num_classes` is the source's largest id + 1.
    """
    if source.num_classes > num_classes:
        largest = source.num_classes - 1
        raise DataError(
            f"{describe(source)}: category ids go up to {largest}, but model.num_classes={num_classes} "
            f"(the class head predicts ids 0..{num_classes - 1}; {num_classes} is its 'no object' class). "
            f"Set model.num_classes={largest + 1} (the largest id + 1) or \"auto\"")


def check_max_boxes(source: DetectionSource, max_boxes: int) -> int | None:
    """Warns when images have more boxes than `max_boxes` (training keeps only the first
    max_boxes of each); returns the largest box count found (None: the source cannot say)."""
    counts_of = getattr(source, "box_counts", None)
    if counts_of is None:
        return None
    counts = counts_of()
    largest = int(counts.max(initial=0))
    if largest > max_boxes:
        over = int((counts > max_boxes).sum())
        log.warning(
            "%s: %d of %d images have more than data.max_boxes=%d boxes (up to %d); training drops the "
            "boxes beyond the first %d of each. Set data.max_boxes=%d to keep them all",
            describe(source), over, len(counts), max_boxes, largest, max_boxes, largest)
    return largest


def check_image_files(source: DetectionSource) -> None:
    """DataError naming every image file of `source` that is missing, has a header that does
    not decode, or a size other than its annotation's; the pixels are not decoded."""
    files_of = getattr(source, "image_files", None)
    if files_of is None:
        return
    files = files_of()
    bad = []
    for path, size in files:
        try:
            check_image_file(path, size)
        except ImageLoadError as e:
            bad.append(f"  {e}")
    if bad:
        raise DataError(f"{describe(source)}: {len(bad)} of {len(files)} images cannot be read:\n" + "\n".join(bad))
