"""Synthetic shapes: a procedurally generated detection dataset that needs no download.

Each image is a noisy background of one random colour with 1-4 solid shapes (rectangle,
ellipse, triangle; category ids 1, 2, 3, so num_classes = 4) of random size, colour and
position. Shapes are large (a fraction of the shorter side), their colours are far from the
background's, and overlap is limited, so the task is learnable by a small DETR in minutes.
Boxes are exact: each is the tight box of the shape's rendered pixels.

Example `i` of a split is a pure function of (seed, split, i): random access, any size.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
from PIL import Image, ImageDraw

from detr_jax.data.records import Record, empty_annotations

SHAPE_NAMES = {1: "rectangle", 2: "ellipse", 3: "triangle"}
_MIN_COLOR_DISTANCE = 120.0  # Euclidean RGB distance between a shape and the background
_MIN_SHAPE_PX = 6


@dataclasses.dataclass(frozen=True)
class _Shape:
    label: int
    color: np.ndarray  # float32 [3]
    top: int
    left: int
    mask: np.ndarray  # bool [h, w], the shape's pixels inside its tight box


class SyntheticShapesSource:
    """Random-access synthetic shapes dataset.

    Args:
      num_examples: length of the split.
      seed: dataset seed (not the training seed: it fixes the images themselves).
      split: any name; different names give independent images.
      image_size: (min, max) of each image side in pixels, drawn per image and side.
      num_objects: (min, max) shapes per image (fewer if a shape finds no free place).
      object_size: (min, max) of a shape's width and height as a fraction of the shorter
        image side.
      max_overlap: the largest fraction of a shape's box that another's box may cover.
    """

    category_names = dict(SHAPE_NAMES)

    def __init__(
        self,
        num_examples: int,
        seed: int = 0,
        split: str = "train",
        image_size: tuple[int, int] = (320, 640),
        num_objects: tuple[int, int] = (1, 4),
        object_size: tuple[float, float] = (0.2, 0.5),
        max_overlap: float = 0.2,
    ):
        if not 0 < image_size[0] <= image_size[1]:
            raise ValueError(f"image_size={image_size}: need 0 < min <= max")
        if not 0 <= num_objects[0] <= num_objects[1]:
            raise ValueError(f"num_objects={num_objects}: need 0 <= min <= max")
        if not 0 < object_size[0] <= object_size[1] <= 1:
            raise ValueError(f"object_size={object_size}: need 0 < min <= max <= 1")
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.split = split
        self.image_size = tuple(image_size)
        self.num_objects = tuple(num_objects)
        self.object_size = tuple(object_size)
        self.max_overlap = float(max_overlap)
        self._split_key = zlib.crc32(split.encode())

    @property
    def num_classes(self) -> int:
        return max(SHAPE_NAMES) + 1

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Record:
        record, shapes, background = self._layout(index)
        record.image = self._render(index, record.orig_size, shapes, background)
        return record

    def annotations(self, index: int) -> Record:
        return self._layout(index)[0]

    def _rngs(self, index: int):
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        seq = np.random.SeedSequence([self.seed, self._split_key, index])
        layout_seq, noise_seq = seq.spawn(2)
        return np.random.default_rng(layout_seq), np.random.default_rng(noise_seq)

    def _layout(self, index: int) -> tuple[Record, list[_Shape], np.ndarray]:
        rng, _ = self._rngs(index)
        h, w = (int(v) for v in rng.integers(self.image_size[0], self.image_size[1] + 1, size=2))
        background = rng.uniform(40, 215, size=3)
        shapes: list[_Shape] = []
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))):
            shape = self._place_shape(rng, h, w, background, boxes)
            if shape is not None:
                shapes.append(shape)
                mh, mw = shape.mask.shape
                boxes.append((shape.left, shape.top, shape.left + mw, shape.top + mh))
        if boxes:
            arr_boxes = np.array(boxes, np.float32)
            labels = np.array([s.label for s in shapes], np.int32)
            crowd = np.zeros(len(shapes), bool)
        else:
            arr_boxes, labels, crowd = empty_annotations()
        record = Record(
            image=None,
            boxes=arr_boxes,
            labels=labels,
            is_crowd=crowd,
            image_id=index,
            orig_size=(h, w),
            name=f"synthetic {self.split}[{index}]",
        )
        return record, shapes, background

    def _place_shape(self, rng, h, w, background, boxes) -> _Shape | None:
        short = min(h, w)
        for _ in range(20):
            bw, bh = (
                max(_MIN_SHAPE_PX, int(round(f * short)))
                for f in rng.uniform(self.object_size[0], self.object_size[1], size=2)
            )
            bw, bh = min(bw, w), min(bh, h)
            left = int(rng.integers(0, w - bw + 1))
            top = int(rng.integers(0, h - bh + 1))
            label = int(rng.integers(1, len(SHAPE_NAMES) + 1))
            apex = float(rng.uniform(0.0, 1.0))
            upside_down = bool(rng.integers(2))
            if _overlaps((left, top, left + bw, top + bh), boxes, self.max_overlap):
                continue
            mask = _shape_mask(label, bh, bw, apex, upside_down)
            ys, xs = np.nonzero(mask)
            if len(ys) == 0:
                continue
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            return _Shape(
                label=label,
                color=_contrasting_color(rng, background),
                top=top + int(y0),
                left=left + int(x0),
                mask=mask[y0:y1, x0:x1],
            )
        return None

    def _render(self, index, size, shapes, background) -> np.ndarray:
        _, noise_rng = self._rngs(index)
        h, w = size
        image = noise_rng.standard_normal((h, w, 3), dtype=np.float32) * 12.0
        image += background.astype(np.float32)
        for shape in shapes:
            mh, mw = shape.mask.shape
            region = image[shape.top : shape.top + mh, shape.left : shape.left + mw]
            noise = region - background.astype(np.float32)  # keep the same texture on shapes
            region[shape.mask] = (shape.color + 0.5 * noise)[shape.mask]
        return np.clip(image, 0, 255).round().astype(np.uint8)


def _shape_mask(label: int, h: int, w: int, apex: float, upside_down: bool) -> np.ndarray:
    """bool [h, w]: the shape drawn to fill an h x w box."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if label == 1:
        draw.rectangle([0, 0, w - 1, h - 1], fill=1)
    elif label == 2:
        draw.ellipse([0, 0, w - 1, h - 1], fill=1)
    else:
        base, tip = (0, h - 1) if upside_down else (h - 1, 0)
        draw.polygon([(0, base), (w - 1, base), (apex * (w - 1), tip)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _overlaps(box, boxes, max_overlap) -> bool:
    x0, y0, x1, y1 = box
    area = (x1 - x0) * (y1 - y0)
    for bx0, by0, bx1, by1 in boxes:
        inter = max(0, min(x1, bx1) - max(x0, bx0)) * max(0, min(y1, by1) - max(y0, by0))
        other = (bx1 - bx0) * (by1 - by0)
        if inter > max_overlap * min(area, other):
            return True
    return False


def _contrasting_color(rng, background) -> np.ndarray:
    for _ in range(50):
        color = rng.uniform(0, 255, size=3)
        if np.linalg.norm(color - background) >= _MIN_COLOR_DISTANCE:
            return color.astype(np.float32)
    return np.where(background < 128, 255.0, 0.0).astype(np.float32)  # >= 128 per channel
