"""Synthetic shapes: a procedurally generated detection dataset that needs no download.

Each image is a noisy background of one random colour with 1-4 solid shapes (rectangle,
ellipse, triangle; category ids 1, 2, 3, so num_classes = 4) of random size, colour and
position. Shapes are large (a fraction of the shorter side), their colours are far from the
background's, and overlap is limited, so the task is learnable by a small DETR in minutes.
Boxes are exact: each is the tight box of the shape's drawn pixels.

Options for segmentation:
- `masks=True`: each record carries the exact pixels each object shows, `Record.masks`.
  Shapes are drawn in order and a later one can cover part of an earlier one: the earlier
  shape keeps the box of its whole shape (boxes do not depend on `masks`), while its mask
  holds only its visible pixels, so the masks never overlap and the mask's box lies inside
  the box (the same box unless a later shape covers all of the shape's pixels along one
  edge of it).
- `stuff=True` (a panoptic dataset): the background becomes two "stuff" regions, "sky"
  (id 4, smooth texture) above a wavy, slanted horizon at a random height and "ground"
  (id 5, rough texture) below it, in colours far from each other and from every shape's
  (num_classes = 6). They are listed after the shapes, each with the tight box of its
  visible pixels (its region less the shapes); a region with none is not listed. Things
  and stuff then partition the image's pixels.
With neither option the images and annotations are those of the plain dataset, bit for bit.

Example `i` of a split is a pure function of (seed, split, i) and the options: random
access, any size.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
from PIL import Image, ImageDraw

from detr_jax.data.coco_panoptic import masks_to_boxes
from detr_jax.data.records import Record, empty_annotations

SHAPE_NAMES = {1: "rectangle", 2: "ellipse", 3: "triangle"}
STUFF_NAMES = {4: "sky", 5: "ground"}  # in the order of the background's regions
_MIN_COLOR_DISTANCE = 120.0  # Euclidean RGB distance between a shape and the background
_MIN_STUFF_DISTANCE = 150.0  # between sky and ground
_MIN_SHAPE_PX = 6
# Noise std of the background (and half of it on the shapes drawn over it): the plain
# background's, and with stuff sky's (smooth) and ground's (rough), so that texture tells
# the two apart as well as colour.
_TEXTURE_STD = 12.0
_STUFF_TEXTURE_STD = (4.0, 12.0)


@dataclasses.dataclass(frozen=True)
class _Shape:
    label: int
    color: np.ndarray  # float32 [3]
    top: int
    left: int
    mask: np.ndarray  # bool [h, w], the shape's pixels inside its tight box

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """bool [height, width]: the shape's pixels in the image."""
        out = np.zeros((height, width), bool)
        mh, mw = self.mask.shape
        out[self.top : self.top + mh, self.left : self.left + mw] = self.mask
        return out


@dataclasses.dataclass(frozen=True)
class _Background:
    """The background: one region of one colour, or sky above a horizon and ground below.

    colors: float64 [K, 3], one per region (K = 1, or 2 with stuff).
    horizon: (height, amplitude, period, phase, slope) of the horizon, row = height +
      amplitude * sin(2 pi x / period + phase) + slope * (x - width / 2); None when K = 1.
    """

    colors: np.ndarray
    horizon: tuple[float, float, float, float, float] | None

    def texture(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(noise std float32 [H, W, 1] or [], colour float32 [H, W, 3]) of each pixel."""
        if self.horizon is None:  # one region: broadcast, as cheap as a single colour
            return np.float32(_TEXTURE_STD), np.broadcast_to(self.colors[0].astype(np.float32), (height, width, 3))
        regions = self.regions(height, width)
        return np.float32(_STUFF_TEXTURE_STD)[regions][..., None], self.colors.astype(np.float32)[regions]

    def regions(self, height: int, width: int) -> np.ndarray:
        """intp [height, width] (with a horizon): each pixel's region, 0 (sky) above the
        horizon, 1 (ground) below."""
        level, amplitude, period, phase, slope = self.horizon
        x = np.arange(width)
        rows = level + amplitude * np.sin(2 * math.pi * x / period + phase) + slope * (x - width / 2)
        return (np.arange(height)[:, None] >= rows[None, :]).astype(np.intp)


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
      masks: records carry `masks`, bool [N, H, W] (see the module docstring).
      stuff: the background is sky and ground, listed as objects (ids 4 and 5).

    Attributes:
      category_names: {id: name}: the shapes', and with stuff sky's and ground's.
      category_isthing: {id: bool}: True for the shapes, False for sky and ground.
    """

    def __init__(
        self,
        num_examples: int,
        seed: int = 0,
        split: str = "train",
        image_size: tuple[int, int] = (320, 640),
        num_objects: tuple[int, int] = (1, 4),
        object_size: tuple[float, float] = (0.2, 0.5),
        max_overlap: float = 0.2,
        masks: bool = False,
        stuff: bool = False,
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
        self.masks = bool(masks)
        self.stuff = bool(stuff)
        self._split_key = zlib.crc32(split.encode())
        stuff_names = STUFF_NAMES if self.stuff else {}
        self.category_names = {**SHAPE_NAMES, **stuff_names}
        self.category_isthing = {**{i: True for i in SHAPE_NAMES}, **{i: False for i in stuff_names}}

    @property
    def num_classes(self) -> int:
        return max(self.category_names) + 1

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

    def _layout(self, index: int) -> tuple[Record, list[_Shape], _Background]:
        rng, _ = self._rngs(index)
        h, w = (int(v) for v in rng.integers(self.image_size[0], self.image_size[1] + 1, size=2))
        background = _draw_background(rng, h, w, self.stuff)
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
        if self.masks or self.stuff:
            self._add_masks_and_stuff(record, shapes, background)
        return record, shapes, background

    def _add_masks_and_stuff(self, record: Record, shapes: list[_Shape], background: _Background) -> None:
        """Appends the stuff objects (with stuff) and sets `masks` (with masks), in place."""
        h, w = record.orig_size
        things = np.zeros((len(shapes), h, w), bool)
        covered = np.zeros((h, w), bool)  # by the shapes drawn after the current one
        for k in reversed(range(len(shapes))):
            things[k] = shapes[k].full_mask(h, w) & ~covered
            covered |= things[k]
        masks = things
        if self.stuff:
            regions = background.regions(h, w)
            stuff = np.stack([(regions == r) & ~covered for r in range(len(STUFF_NAMES))])
            shown = stuff.any(axis=(1, 2))  # a region the shapes cover entirely is not listed
            stuff, stuff_ids = stuff[shown], np.array(list(STUFF_NAMES), np.int32)[shown]
            record.boxes = np.concatenate([record.boxes, masks_to_boxes(stuff)])
            record.labels = np.concatenate([record.labels, stuff_ids])
            record.is_crowd = np.concatenate([record.is_crowd, np.zeros(len(stuff_ids), bool)])
            masks = np.concatenate([things, stuff])
        if self.masks:
            record.masks = masks

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
                color=_contrasting_color(rng, background.colors),
                top=top + int(y0),
                left=left + int(x0),
                mask=mask[y0:y1, x0:x1],
            )
        return None

    def _render(self, index, size, shapes, background) -> np.ndarray:
        _, noise_rng = self._rngs(index)
        h, w = size
        noise = noise_rng.standard_normal((h, w, 3), dtype=np.float32)
        std, base = background.texture(h, w)
        image = noise * std + base
        for shape in shapes:
            mh, mw = shape.mask.shape
            window = (slice(shape.top, shape.top + mh), slice(shape.left, shape.left + mw))
            region = image[window]
            # the background's noise, halved, shows on the shape (in an overlap, what is under it
            # includes the earlier shape's colour)
            texture = region - base[window]
            region[shape.mask] = (shape.color + 0.5 * texture)[shape.mask]
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


def _draw_background(rng: np.random.Generator, height: int, width: int, stuff: bool) -> _Background:
    """One colour, or (stuff) sky and ground colours at least _MIN_STUFF_DISTANCE apart and
    the horizon: at 30-70% of the height, waves up to 10% of it, slope up to 0.3."""
    first = rng.uniform(40, 215, size=3)  # the plain background's colour, or sky's
    if not stuff:
        return _Background(first[None], None)
    for _ in range(50):
        ground = rng.uniform(40, 215, size=3)
        if np.linalg.norm(ground - first) >= _MIN_STUFF_DISTANCE:
            break
    else:  # the far corner of the colour range, >= 87.5 per channel away
        ground = np.where(first < 128, 215.0, 40.0)
    horizon = (
        float(rng.uniform(0.3, 0.7)) * height,
        float(rng.uniform(0.0, 0.1)) * height,
        float(rng.uniform(0.5, 2.0)) * width,
        float(rng.uniform(0.0, 2 * math.pi)),
        float(rng.uniform(-0.3, 0.3)),
    )
    return _Background(np.stack([first, ground]), horizon)


def _contrasting_color(rng, avoid: np.ndarray) -> np.ndarray:
    """float32 [3]: a random colour at least _MIN_COLOR_DISTANCE from each of `avoid` [K, 3]."""
    for _ in range(50):
        color = rng.uniform(0, 255, size=3)
        if min(np.linalg.norm(color - c) for c in avoid) >= _MIN_COLOR_DISTANCE:
            return color.astype(np.float32)
    # Each try succeeds with p > 1/3, so this is all but never reached; with one colour to
    # avoid it is the corner of the RGB cube opposite it (>= 128 per channel).
    return np.where(avoid.mean(axis=0) < 128, 255.0, 0.0).astype(np.float32)
