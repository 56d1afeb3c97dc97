"""Drawn detections: colours, label boxes, scaling with the image size, grids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from detr_jax.evaluation import visualize

GREY = (128, 128, 128)


def _canvas(h, w):
    return np.full((h, w, 3), GREY, np.uint8)


def _run_length(row: np.ndarray, start: int, color) -> int:
    """Consecutive pixels of `color` in `row` [W, 3] from index `start` on."""
    n = 0
    while start + n < len(row) and tuple(row[start + n]) == tuple(color):
        n += 1
    return n


def _text_pixels(region: np.ndarray, label_color) -> int:
    """Pixels closer to the label's text colour than to its background and to the canvas
    (the text is antialiased, so few pixels have the text colour exactly)."""
    region = region.astype(float)
    dist = lambda c: np.linalg.norm(region - np.array(c, float), axis=-1)
    near_text = dist(visualize.text_color(label_color))
    return int(np.sum((near_text < dist(label_color)) & (near_text < dist(GREY))))


def test_draw_detections_draws_boxes_in_class_colours_and_leaves_the_input_alone():
    image = _canvas(200, 300)
    out = visualize.draw_detections(image, [[50, 80, 150, 180], [200, 100, 280, 190]], [1, 2], [0.9, 0.4],
                                    {1: "cat", 2: "dog"})
    assert isinstance(out, Image.Image) and out.size == (300, 200)
    assert np.all(image == GREY)  # input untouched
    pixels = np.asarray(out)
    c1, c2 = visualize.class_color(1), visualize.class_color(2)
    assert c1 != c2
    assert tuple(pixels[130, 50]) == c1 and tuple(pixels[150, 280]) == c2  # left / right edges
    assert tuple(pixels[130, 100]) == GREY  # inside the box: not filled
    # The label sits on a filled box of the class colour just above the box, with text in
    # the contrasting colour inside it.
    filled = [tuple(pixels[y, 50]) == c1 for y in range(60, 80)]  # the label's left edge
    assert filled[-1] and sum(filled) >= visualize.font_size_for(200, 300) - 2
    assert not filled[0]  # and it ends: a label, not a filled box
    assert _text_pixels(pixels[60:80, 50:100], c1) > 20


def test_pil_input_is_copied():
    image = Image.new("RGB", (64, 48), GREY)
    out = visualize.draw_detections(image, [[5, 20, 40, 40]], [3], [0.5])
    assert out is not image and image.getpixel((5, 30)) == GREY and out.getpixel((5, 30)) == visualize.class_color(3)


def test_label_moves_inside_a_box_at_the_top_edge():
    out = np.asarray(visualize.draw_detections(_canvas(100, 100), [[10, 0, 90, 60]], [1], [0.99]))
    color = visualize.class_color(1)
    assert all(tuple(out[y, 11]) == color for y in range(0, 7))  # label inside, at the top
    assert _text_pixels(out[0:10, 10:60], color) > 20


def test_line_width_and_label_size_grow_with_the_image():
    small = np.asarray(visualize.draw_detections(_canvas(120, 160), [[20, 20, 100, 100]], [4], [0.5]))
    large = np.asarray(visualize.draw_detections(_canvas(1000, 1400), [[200, 200, 900, 900]], [4], [0.5]))
    color = visualize.class_color(4)
    assert _run_length(small[60], 20, color) == visualize.line_width_for(120, 160) == 1
    assert _run_length(large[600], 200, color) == visualize.line_width_for(1000, 1400) == 4
    label_height = lambda px, x: int(np.sum(np.any(np.all(px[:, x : x + 3] == color, axis=-1), axis=1)))
    assert label_height(large, 210) > 3 * label_height(small, 22)


def test_longer_names_get_wider_labels():
    def label_width(name):
        out = np.asarray(visualize.draw_detections(_canvas(200, 400), [[10, 100, 390, 190]], [1], [0.5], {1: name}))
        return int(np.sum(np.all(out[90] == visualize.class_color(1), axis=-1)))

    assert label_width("a much longer class name") > label_width("cat") + 50


def test_without_scores_and_with_sequence_names():
    out = visualize.draw_detections(_canvas(80, 80), np.array([[10, 30, 70, 70]], np.float32), [1], None, ["bg", "shape"])
    assert out.getpixel((10, 50)) == visualize.class_color(1)


def test_palette_colours_are_distinct_and_labels_readable():
    palette = np.array(visualize.PALETTE, float)
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2)]
    assert min(distances) > 50 and len(visualize.PALETTE) >= 12
    for a, b in zip(visualize.PALETTE, visualize.PALETTE[1:]):  # neighbouring class ids
        assert np.linalg.norm(np.subtract(a, b)) > 90
    assert visualize.text_color((0xF3, 0xC3, 0x00)) == (0, 0, 0)  # yellow: black text
    assert visualize.text_color((0x2B, 0x3D, 0x26)) == (255, 255, 255)  # dark green: white text


@pytest.mark.parametrize("count,columns,rows", [(1, 4, 1), (5, 4, 2), (8, 4, 2)])
def test_grid_layout(tmp_path, count, columns, rows):
    images = [Image.new("RGB", (60 + 10 * i, 40), (i * 20, 0, 0)) for i in range(count)]
    path = visualize.save_grid(images, tmp_path / "sub" / "grid.png", columns=columns)
    grid = Image.open(path)
    assert grid.height == rows * (40 + 4) + 4
    rows_of = [images[i : i + columns] for i in range(0, count, columns)]
    assert grid.width == max(sum(im.width for im in row) + 4 * (len(row) + 1) for row in rows_of)


def test_grid_scales_to_a_common_height():
    grid = visualize.make_grid([Image.new("RGB", (100, 50)), Image.new("RGB", (50, 100))], cell_height=50)
    assert grid.size == (100 + 25 + 3 * 4, 50 + 2 * 4)


def test_draw_segments_fills_outlines_and_names_each_segment():
    h, w = 60, 80
    image = _canvas(h, w)
    id_map = np.zeros((h, w), np.int32)
    id_map[:, 40:] = 1  # stuff: the right half
    id_map[10:30, 5:25] = 2  # a thing on the left; the rest of the left half is void
    segments = [{"id": 1, "category_id": 4}, {"id": 2, "category_id": 1}]
    drawn = np.asarray(visualize.draw_segments(image, id_map, segments, {1: "a", 4: "b"}, alpha=0.5))
    assert (image == GREY).all()  # the input is left alone
    void = drawn[45:, :30]
    assert (void == GREY).all()
    for segment, (y, x) in zip(segments, [(50, 75), (28, 8)]):  # away from the label at the centroid
        color = np.array(visualize.class_color(segment["category_id"]))
        np.testing.assert_allclose(drawn[y, x], (np.array(GREY) + color) / 2, atol=1)
    # The outline: where a segment meets another segment or void, its pixels take the full colour.
    assert tuple(drawn[20, 24]) == visualize.class_color(1) and tuple(drawn[29, 15]) == visualize.class_color(1)
    assert tuple(drawn[5, 40]) == visualize.class_color(4)  # the stuff's edge with void
    assert tuple(drawn[5, 39]) == GREY  # void's own edge pixel stays as it is
    # Each name is drawn on a box of its class colour near the segment's centre.
    assert _text_pixels(drawn[15:26, 5:25], visualize.class_color(1)) > 3
    with pytest.raises(ValueError, match=r"id_map \(2, 2\) does not match the image \(60, 80\)"):
        visualize.draw_segments(image, np.zeros((2, 2), np.int32), segments)
