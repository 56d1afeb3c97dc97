"""Drawing detections and panoptic segments on images (PIL), and grids of drawn images for
sample sheets.

Boxes are pixel (x0, y0, x1, y1) of the image they are drawn on. Each class has a fixed
colour from a high-contrast palette (Kelly's colours of maximum contrast, without white,
black and grey), so a class keeps its colour across images; the label "name 0.93" sits on
a filled box of the class colour with black or white text, whichever reads better.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Kelly (1965), "Twenty-two colors of maximum contrast", minus white, black, grey and four
# that are too close to another (two yellows, a violet, a brown): every pair differs by
# more than 50 in RGB, neighbours (consecutive class ids are common) by more than 90.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0xF3, 0xC3, 0x00), (0x87, 0x56, 0x92), (0xF3, 0x84, 0x00), (0xA1, 0xCA, 0xF1),
    (0xBE, 0x00, 0x32), (0xC2, 0xB2, 0x80), (0x00, 0x88, 0x56), (0xE6, 0x8F, 0xAC),
    (0x00, 0x67, 0xA5), (0xF9, 0x93, 0x79), (0xB3, 0x44, 0x6C), (0x88, 0x2D, 0x17),
    (0x8D, 0xB6, 0x00), (0xE2, 0x58, 0x22), (0x2B, 0x3D, 0x26),
)  # fmt: skip


def class_color(label: int) -> tuple[int, int, int]:
    """The fixed RGB colour of class `label`."""
    return PALETTE[int(label) % len(PALETTE)]


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `background` (WCAG relative luminance)."""
    channels = [c / 255.0 for c in background]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    # Contrast with black (L + 0.05) / 0.05 vs with white 1.05 / (L + 0.05): equal at L ~ 0.18.
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


def line_width_for(height: int, width: int) -> int:
    """Box outline width: 1 px up to ~300 px images, 2 px at 640, 4 px at 1333."""
    return max(1, round(max(height, width) / 320))


def font_size_for(height: int, width: int) -> int:
    """Label font size: 2.5% of the shorter side, at least 9 px."""
    return max(9, round(0.025 * min(height, width)))


def load_font(size: int) -> ImageFont.ImageFont:
    """PIL's bundled font at `size` px (a fixed-size bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _label_name(class_names, label: int) -> str:
    if isinstance(class_names, Mapping):
        return class_names.get(int(label), str(int(label)))
    if class_names is not None and 0 <= int(label) < len(class_names):
        return class_names[int(label)]
    return str(int(label))


def to_pil(image) -> Image.Image:
    """An RGB PIL image (a copy) from a PIL image or a uint8 [H, W, 3] / [H, W] array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # convert copies, even from RGB
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image array, got {array.dtype}")
    return Image.fromarray(array).convert("RGB")


def draw_detections(
    image,
    boxes: np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float] | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    line_width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """A copy of `image` with boxes and "name 0.93" labels drawn.

    Args:
      image: PIL image or uint8 [H, W, 3] array.
      boxes: [N, 4] pixel (x0, y0, x1, y1) in `image`.
      labels: [N] category ids (colour and name).
      scores: [N] or None (labels without scores).
      class_names: {id: name} or a sequence indexed by id; default: the id.
      line_width, font_size: default scaled to the image size.

    Higher-scoring detections are drawn last, so they are on top where labels overlap.
    """
    out = to_pil(image)
    w, h = out.size
    line_width = line_width or line_width_for(h, w)
    font = load_font(font_size or font_size_for(h, w))
    draw = ImageDraw.Draw(out)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    order = np.argsort(np.asarray(scores, np.float32), kind="stable") if scores is not None else range(len(boxes))
    pad = max(1, line_width)
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        color = class_color(labels[i])
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=line_width)
        text = _label_name(class_names, labels[i])
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(max(0.0, x0), max(0.0, w - tw))
        ty = y0 - th if y0 - th >= 0 else max(0.0, y0)  # above the box, else inside it
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        draw.text((tx + pad - left, ty + pad - top), text, fill=text_color(color), font=font)
    return out


def draw_segments(
    image,
    id_map: np.ndarray,
    segments: Sequence[Mapping],
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """A copy of `image` with each segment filled in its class colour, outlined, and named.

    Args:
      image: PIL image or uint8 [H, W, 3] array.
      id_map: int [H, W] segment ids of `image`'s pixels; 0 = void (left as it is).
      segments: [{"id", "category_id", ...}] (COCO panoptic `segments_info`).
      alpha: opacity of the fill.

    Segments of one class share its colour; the outline (pixels with a 4-neighbour in
    another segment or void) tells touching ones apart. Each name sits at the
    segment's pixel nearest its centroid.
    """
    out = np.asarray(to_pil(image), np.float32)
    id_map = np.asarray(id_map)
    if id_map.shape != out.shape[:2]:
        raise ValueError(f"id_map {id_map.shape} does not match the image {out.shape[:2]}")
    edge = np.zeros(id_map.shape, bool)  # both pixels of each pair of 4-neighbours that differ
    across = id_map[:, :-1] != id_map[:, 1:]
    down = id_map[:-1, :] != id_map[1:, :]
    edge[:, :-1] |= across
    edge[:, 1:] |= across
    edge[:-1, :] |= down
    edge[1:, :] |= down
    for segment in segments:
        inside = id_map == int(segment["id"])
        color = np.array(class_color(segment["category_id"]), np.float32)
        out[inside] = (1 - alpha) * out[inside] + alpha * color
        out[inside & edge] = color
    drawn = Image.fromarray(out.round().astype(np.uint8))
    h, w = id_map.shape
    font = load_font(font_size_for(h, w))
    draw = ImageDraw.Draw(drawn)
    for segment in segments:
        ys, xs = np.nonzero(id_map == int(segment["id"]))
        if len(ys) == 0:
            continue
        nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        color = class_color(segment["category_id"])
        text = _label_name(class_names, segment["category_id"])
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx = min(max(0, int(xs[nearest]) - (right - left) // 2), max(0, w - (right - left) - 2))
        ty = min(max(0, int(ys[nearest]) - (bottom - top) // 2), max(0, h - (bottom - top) - 2))
        draw.rectangle([tx, ty, tx + right - left + 2, ty + bottom - top + 2], fill=color)
        draw.text((tx + 1 - left, ty + 1 - top), text, fill=text_color(color), font=font)
    return drawn


def make_grid(images: Sequence[Image.Image], columns: int = 4, cell_height: int | None = None,
              spacing: int = 4, background: tuple[int, int, int] = (32, 32, 32)) -> Image.Image:
    """The images scaled to one height (default: the smallest, at most 480 px) in rows of
    `columns`, separated by `spacing` px."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cell_height = cell_height or min(480, min(im.height for im in images))
    scaled = [im.resize((max(1, round(im.width * cell_height / im.height)), cell_height), Image.BILINEAR)
              for im in images]
    rows = [scaled[i : i + columns] for i in range(0, len(scaled), columns)]
    width = max(sum(im.width for im in row) + spacing * (len(row) + 1) for row in rows)
    height = len(rows) * (cell_height + spacing) + spacing
    grid = Image.new("RGB", (width, height), background)
    for r, row in enumerate(rows):
        x = spacing
        for im in row:
            grid.paste(im, (x, spacing + r * (cell_height + spacing)))
            x += im.width + spacing
    return grid


def save_grid(images: Sequence[Image.Image], path: str | pathlib.Path, columns: int = 4,
              cell_height: int | None = None) -> pathlib.Path:
    """Writes `make_grid(images)` to `path` (PNG; parent folders created); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, columns, cell_height).save(path)
    return path
