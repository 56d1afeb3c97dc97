"""Counters of what the input pipeline skipped, dropped or padded, for the training log."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass
class PipelineStats:
    """Totals over the batches an iterator has yielded (since it was created or restored).

    Counted in worker processes, carried in each batch, summed in the consuming process.

    Attributes:
      batches: batches yielded.
      examples: real (non-filler) examples yielded.
      degenerate_boxes: objects dropped at load for a box of zero/negative size after
        clipping, or (with data.masks) an empty mask.
      truncated_boxes: boxes dropped because an image had more than `max_boxes`.
      bucket_overflows: batches that fit no bucket (padded to a rounded-up shape).
      unreadable_files: names (`Record.name`) of the images that failed to load and were
        replaced by another (training).
      skipped_images (read-only): the number of distinct unreadable images met,
        len(unreadable_files); not of failed reads, which grow every epoch and more than once
        for consecutive bad files (an example whose fallback is bad too meets the next one).
      batch_shapes: {(H, W): number of batches} of the padded image shapes.
    """

    batches: int = 0
    examples: int = 0
    degenerate_boxes: int = 0
    truncated_boxes: int = 0
    bucket_overflows: int = 0
    unreadable_files: set[str] = dataclasses.field(default_factory=set)
    batch_shapes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def skipped_images(self) -> int:
        return len(self.unreadable_files)

    def add(self, counters: dict, skipped_files: Iterable[str], shape: tuple[int, int]) -> bool:
        """Adds one batch's int counters and skipped file names; returns True if `shape` is new."""
        self.batches += 1
        for key, value in counters.items():
            setattr(self, key, getattr(self, key) + int(value))
        self.unreadable_files.update(skipped_files)
        new = shape not in self.batch_shapes
        self.batch_shapes[shape] += 1
        return new

    def as_dict(self) -> dict[str, int]:
        """Flat scalars for a metrics logger (prefix them, e.g. "data/")."""
        return {
            "batches": self.batches,
            "examples": self.examples,
            "skipped_images": self.skipped_images,
            "degenerate_boxes": self.degenerate_boxes,
            "truncated_boxes": self.truncated_boxes,
            "bucket_overflows": self.bucket_overflows,
            "distinct_shapes": len(self.batch_shapes),
        }
