"""DETR augmentations: official resize rule, box bookkeeping checked against the pixels."""

import numpy as np
import pytest

from detr_jax.data import batching
from detr_jax.data import transforms as T
from detr_jax.data.records import Record

# (h, w, size, max_size) -> (oh, ow), worked out by hand from official DETR's rule.
RESIZE_CASES = [
    ((480, 640, 800, 1333), (800, 1066)),
    ((640, 480, 800, 1333), (1066, 800)),
    ((427, 640, 800, 1333), (800, 1199)),
    ((500, 1500, 800, 1333), (444, 1332)),  # capped: short = round(1333 * 500 / 1500)
    ((100, 1000, 800, 1333), (133, 1330)),
    ((800, 1000, 800, 1333), (800, 1000)),  # already the right size
    ((300, 400, 500, None), (500, 666)),
]


@pytest.mark.parametrize("args,expected", RESIZE_CASES)
def test_resized_size_follows_official_rule(args, expected):
    assert T.resized_size(*args) == expected


def _official_size(image_size, size, max_size=None):
    """Official DETR's datasets/transforms.py get_size_with_aspect_ratio, verbatim: (w, h) in, (h, w) out."""
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


def test_resized_size_never_exceeds_max_size_and_is_official_otherwise():
    rng = np.random.default_rng(0)
    overshoots = 0
    for _ in range(5000):
        short = int(rng.integers(1, 1500))
        long = max(short, int(short * np.exp(rng.uniform(0, np.log(30)))))  # aspect up to 30
        height, width = (short, long) if rng.random() < 0.5 else (long, short)
        size = int(rng.integers(1, 1400))
        max_size = None if rng.random() < 0.1 else int(rng.integers(1, 2000))
        official = _official_size((width, height), size, max_size)
        ours = T.resized_size(height, width, size, max_size)
        args = (height, width, size, max_size)
        assert min(ours) <= size, args
        if max_size is None or max(official) <= max_size:
            assert ours == official, args
        else:  # only the longer side is clamped
            overshoots += 1
            assert max(ours) == max_size and min(ours) == min(official), args
    assert overshoots > 10  # the clamp was exercised


def test_odd_aspect_ratio_fits_the_max_size_bucket():
    # The case: official DETR resizes 320x700 with max_size 128 to 59x129.
    assert _official_size((700, 320), 480, 128) == (59, 129)
    assert T.resized_size(320, 700, 480, 128) == (59, 128)
    buckets = batching.make_buckets((), 128, 128)
    assert buckets == ((128, 128),)
    image = np.zeros((320, 700, 3), np.uint8)
    boxes, labels = np.array([[0, 0, 700, 320]], np.float32), np.array([1], np.int32)
    transforms = [T.EvalResize(800, 128)] + [
        T.TrainAugmentation(max_size=128, crop_size=(384, 700), crop_prob=p) for p in (0.0, 1.0)
    ]
    for transform in transforms:
        for seed in range(4):
            out, out_boxes, _ = transform(image, boxes, labels, np.random.default_rng(seed))
            assert max(out.shape[:2]) <= 128, (transform, out.shape)
            assert not batching.choose_bucket(buckets, *out.shape[:2], 128)[1]
            assert np.all(out_boxes[:, 2:] <= np.array([out.shape[1], out.shape[0]]) + 1e-3)  # boxes scale too


COLORS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}


def _three_rectangles():
    """A 200x300 gray image with a red, a green and a blue rectangle at known boxes."""
    image = np.full((200, 300, 3), 128, np.uint8)
    boxes = np.array([[20, 30, 120, 90], [150, 100, 280, 190], [60, 120, 140, 170]], np.float32)
    labels = np.array([1, 2, 3], np.int32)
    for (x0, y0, x1, y1), label in zip(boxes.astype(int), labels):
        image[y0:y1, x0:x1] = COLORS[label]
    return image, boxes, labels


def _pixel_box(image, label):
    """Tight xyxy box of the pixels that are clearly `label`'s colour, or None."""
    channel = int(np.argmax(COLORS[label]))
    values = image.astype(int)
    others = np.delete(values, channel, axis=-1)
    # halfway between the gray background (128) and the pure colour on every channel
    hit = (values[..., channel] > 191) & np.all(others < 64, axis=-1)
    ys, xs = np.nonzero(hit)
    if len(ys) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("crop_prob", [0.0, 1.0])
def test_boxes_follow_the_pixels_through_flip_resize_crop(crop_prob):
    augment = T.TrainAugmentation(
        scales=(96, 128, 160), max_size=240, crop_scales=(150, 200), crop_size=(80, 140),
        hflip_prob=0.5, crop_prob=crop_prob,
    )
    image, boxes, labels = _three_rectangles()
    flipped = cropped_away = 0
    for seed in range(25):
        out, out_boxes, out_labels = augment(image, boxes, labels, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        assert min(out.shape[:2]) in (96, 128, 160) or max(out.shape[:2]) <= 240
        assert np.all(out_boxes >= 0) and np.all(out_boxes[:, [2, 3]] <= [out.shape[1], out.shape[0]])
        for label in COLORS:
            pixels = _pixel_box(out, label)
            if label not in out_labels:
                cropped_away += 1
                assert pixels is None or np.prod(pixels[2:] - pixels[:2]) <= 2, (seed, label)
                continue
            box = out_boxes[list(out_labels).index(label)]
            if min(box[2] - box[0], box[3] - box[1]) < 3:
                continue  # a sliver: too thin to locate by colour
            assert pixels is not None, (seed, label, box)
            np.testing.assert_allclose(pixels, box, atol=1.0, err_msg=f"seed {seed} label {label}")
        # red is left of blue in the source; a flip puts it right
        if 1 in out_labels and 3 in out_labels:
            red, blue = (out_boxes[list(out_labels).index(k)] for k in (1, 3))
            flipped += red[0] > blue[0]
    assert flipped > 0  # the flip happened for some seeds
    if crop_prob == 1.0:
        assert cropped_away > 0  # and crops removed boxes for some


def test_augmentation_is_a_function_of_the_generator():
    augment = T.TrainAugmentation(scales=(64, 96), max_size=160, crop_scales=(100,), crop_size=(50, 90))
    image, boxes, labels = _three_rectangles()
    a = augment(image, boxes, labels, np.random.default_rng(7))
    b = augment(image, boxes, labels, np.random.default_rng(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    outputs = {augment(image, boxes, labels, np.random.default_rng(s))[0].shape for s in range(20)}
    assert len(outputs) > 1


def test_hflip_maps_boxes_and_is_an_involution():
    image = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    boxes = np.array([[1, 0, 3, 2]], np.float32)
    flipped, fboxes = T.hflip(image, boxes)
    np.testing.assert_array_equal(fboxes, [[2, 0, 4, 2]])
    again, aboxes = T.hflip(flipped, fboxes)
    np.testing.assert_array_equal(again, image)
    np.testing.assert_array_equal(aboxes, boxes)


def test_crop_clips_and_drops_boxes():
    image = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[10, 10, 30, 30], [40, 40, 90, 90], [0, 0, 5, 5]], np.float32)
    labels = np.array([1, 2, 3], np.int32)
    out, oboxes, olabels = T.crop(image, boxes, labels, top=20, left=20, height=50, width=40)
    assert out.shape == (50, 40, 3)
    np.testing.assert_array_equal(olabels, [1, 2])
    np.testing.assert_array_equal(oboxes, [[0, 0, 10, 10], [20, 20, 40, 50]])


def test_random_size_crop_handles_images_smaller_than_the_minimum():
    image = np.zeros((30, 50, 3), np.uint8)
    boxes = np.array([[0, 0, 50, 30]], np.float32)
    out, oboxes, _ = T.random_size_crop(image, boxes, np.array([1]), np.random.default_rng(0), 384, 600)
    assert out.shape == (30, 50, 3)
    np.testing.assert_array_equal(oboxes, boxes)


def test_clean_record_drops_crowd_clips_and_counts_degenerate():
    record = Record(
        image=np.zeros((50, 100, 3), np.uint8),
        boxes=np.array(
            [
                [-10, 5, 20, 60],  # partly outside: clipped
                [10, 10, 10, 20],  # zero width
                [30, 30, 20, 40],  # negative width
                [120, 10, 130, 20],  # entirely outside
                [np.nan, 0, 5, 5],
                [0, 0, 10, 10],  # crowd: removed, not counted
            ],
            np.float32,
        ),
        labels=np.array([1, 2, 3, 4, 5, 6]),
        is_crowd=np.array([0, 0, 0, 0, 0, 1], bool),
        image_id=1,
        orig_size=(50, 100),
    )
    boxes, labels, degenerate = T.clean_record(record)
    np.testing.assert_array_equal(boxes, [[0, 5, 20, 50]])
    np.testing.assert_array_equal(labels, [1])
    assert degenerate == 4
    assert len(T.clean_record(record, drop_crowd=False)[0]) == 2


def test_normalized_cxcywh():
    boxes = np.array([[10, 20, 30, 60]], np.float32)
    np.testing.assert_allclose(T.to_normalized_cxcywh(boxes, 100, 200), [[0.1, 0.4, 0.1, 0.4]])
    assert T.to_normalized_cxcywh(np.zeros((0, 4)), 10, 10).shape == (0, 4)
