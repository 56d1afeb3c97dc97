"""Counters of what the input pipeline skipped, dropped or padded, for the training log."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class PipelineStats:
    """Totals over the batches an iterator has yielded (since it was created or restored).

    Counted in worker processes, carried in each batch, summed in the consuming process.

    Attributes:
      batches: batches yielded.
      examples: real (non-filler) examples yielded.
      skipped_images: images that failed to load and were replaced by another (training).
      degenerate_boxes: boxes dropped at load for zero/negative size after clipping.
      truncated_boxes: boxes dropped because an image had more than `max_boxes`.
      bucket_overflows: batches that fit no bucket (padded to a rounded-up shape).
      batch_shapes: {(H, W): number of batches} of the padded image shapes.
    """

    batches: int = 0
    examples: int = 0
    skipped_images: int = 0
    degenerate_boxes: int = 0
    truncated_boxes: int = 0
    bucket_overflows: int = 0
    batch_shapes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, counters: dict, shape: tuple[int, int]) -> bool:
        """Adds one batch's counters; returns True if `shape` is new."""
        self.batches += 1
        for key, value in counters.items():
            setattr(self, key, getattr(self, key) + int(value))
        new = shape not in self.batch_shapes
        self.batch_shapes[shape] += 1
        return new

    def as_dict(self) -> dict[str, int]:
        """Flat scalars for a metrics logger (prefix them, e.g. "data/")."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "batch_shapes"}
        out["distinct_shapes"] = len(self.batch_shapes)
        return out
