"""Instance and panoptic masks through the input pipeline: the synthetic set's masks and
stuff, the transforms, batching, COCO segmentations (read and written), bad masks."""

import hashlib
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from detr_jax.data import (
    CocoFolderSource,
    DataError,
    DatasetFormatError,
    Record,
    SyntheticShapesSource,
    make_eval_iterator,
    make_source,
    make_train_iterator,
    to_coco_dict,
    write_coco_folder,
)
from detr_jax.data import batching
from detr_jax.data import transforms as T
from detr_jax.data.coco_panoptic import masks_to_boxes
from detr_jax.data.panoptic_png import id_to_rgb
from detr_jax.data.config import data_config


def _digest(source) -> str:
    h = hashlib.sha256()
    for i in range(len(source)):
        r = source[i]
        for a in (r.image, r.boxes, r.labels, r.is_crowd, np.array(r.orig_size)):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# --- synthetic masks and stuff ----------------------------------------------------------


def test_default_synthetic_is_unchanged_and_masks_only_add():
    # Recorded from the dataset before masks and stuff existed: images and annotations of
    # the plain dataset (with or without masks) must stay these bytes.
    recorded = "cf59a4e8193ead6543933aab64e8f4ba2553d27cf7bb54f5c29a537314958ead"
    plain = SyntheticShapesSource(6, seed=3, image_size=(48, 80))
    assert _digest(plain) == recorded
    assert plain[0].masks is None
    assert _digest(SyntheticShapesSource(6, seed=3, image_size=(48, 80), masks=True)) == recorded


def _tight_box(mask):
    return masks_to_boxes(mask[None])[0]


def _nearest_color_class(image, colors, where):
    """int [H, W]: index of the nearest of `colors` [K, 3] for each pixel (-1 outside `where`)."""
    distance = np.linalg.norm(image.astype(float)[:, :, None] - np.asarray(colors)[None, None], axis=-1)
    return np.where(where, distance.argmin(-1), -1)


@pytest.mark.parametrize("stuff", [False, True])
def test_synthetic_single_shape_mask_is_the_shape_colour_region(stuff):
    # One shape: no other shape covers it, so its mask is exactly its pixels and its box is
    # the mask's tight box. The pixels are told apart by colour: shapes are >= 120 away from
    # the background colours and their noise (std <= 6 per channel on a shape, <= 12 on the
    # background) would need 5 std along one axis to cross half of that.
    source = SyntheticShapesSource(6, seed=2, image_size=(40, 64), num_objects=(1, 1), masks=True, stuff=stuff)
    for i in range(len(source)):
        record = source[i]
        h, w = record.orig_size
        assert record.masks.dtype == bool and record.masks.shape == (len(record.labels), h, w)
        shape = record.masks[0]
        np.testing.assert_array_equal(_tight_box(shape), record.boxes[0])
        backgrounds = record.masks[1:] if stuff else ~shape[None]
        colors = [np.median(record.image[shape], axis=0)] + [np.median(record.image[m], axis=0) for m in backgrounds]
        nearest = _nearest_color_class(record.image, colors, np.ones((h, w), bool))
        np.testing.assert_array_equal(nearest == 0, shape, err_msg=f"example {i}")
        if stuff:  # sky and ground by colour, too
            for k, region in enumerate(record.masks[1:], start=1):
                np.testing.assert_array_equal(nearest == k, region, err_msg=f"example {i}")


def test_synthetic_masks_partition_the_image_and_agree_with_the_boxes():
    source = SyntheticShapesSource(10, seed=4, image_size=(48, 72), num_objects=(2, 4), masks=True, stuff=True)
    assert source.num_classes == 6
    assert source.category_names == {1: "rectangle", 2: "ellipse", 3: "triangle", 4: "sky", 5: "ground"}
    assert source.category_isthing == {1: True, 2: True, 3: True, 4: False, 5: False}
    covered_shapes = 0
    for i in range(len(source)):
        record = source[i]
        things = record.labels <= 3
        assert list(record.labels[~things]) in ([4, 5], [4], [5])  # stuff last, sky first
        np.testing.assert_array_equal(record.masks.sum(0), 1)  # every pixel in exactly one object
        assert record.masks.any(axis=(1, 2)).all()
        boxes = masks_to_boxes(record.masks)
        np.testing.assert_array_equal(boxes[~things], record.boxes[~things])  # stuff: tight boxes
        for k in np.nonzero(things)[0]:
            x0, y0, x1, y1 = record.boxes[k].astype(int)
            assert not record.masks[k, :y0].any() and not record.masks[k, y1:].any()
            assert not record.masks[k, :, :x0].any() and not record.masks[k, :, x1:].any()
            later = record.boxes[k + 1 : things.sum()]
            overlapped = np.any((later[:, 0] < x1) & (later[:, 2] > x0) & (later[:, 1] < y1) & (later[:, 3] > y0))
            if not overlapped:  # nothing drawn over it: its mask spans its box
                np.testing.assert_array_equal(boxes[k], record.boxes[k])
            covered_shapes += overlapped
        annotations = source.annotations(i)  # the same without rendering the image
        assert annotations.image is None
        for field in ("boxes", "labels", "is_crowd", "masks"):
            np.testing.assert_array_equal(getattr(annotations, field), getattr(record, field))
    assert covered_shapes > 0  # the partly covered case was exercised
    again = SyntheticShapesSource(10, seed=4, image_size=(48, 72), num_objects=(2, 4), masks=True, stuff=True)
    np.testing.assert_array_equal(again[7].masks, source[7].masks)  # random access, pure


def test_stuff_without_masks_lists_the_regions_and_a_fully_covered_region_is_left_out():
    source = SyntheticShapesSource(8, seed=1, image_size=(32, 48), stuff=True)
    record = source[0]
    assert record.masks is None and set(record.labels[-2:]) == {4, 5}
    # A shape covering the whole image leaves no stuff pixel: no stuff object.
    full = SyntheticShapesSource(6, seed=0, image_size=(16, 16), num_objects=(1, 1), object_size=(1.0, 1.0),
                                 masks=True, stuff=True)
    labels = [tuple(full.annotations(i).labels) for i in range(len(full))]
    assert (1,) in labels  # a rectangle fills the image
    for i, lab in enumerate(labels):
        assert len(full.annotations(i).masks) == len(lab)


# --- transforms -----------------------------------------------------------------------


def test_resize_masks_is_pytorch_nearest():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for in_size, out_size in [((7, 9), (3, 4)), ((5, 6), (10, 12)), ((13, 17), (29, 11)), ((100, 3), (37, 7))]:
        masks = rng.random((2, *in_size)) < 0.5
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(masks)[:, None].float(), size=out_size, mode="nearest")[:, 0] > 0.5
        np.testing.assert_array_equal(T.resize_masks(masks, out_size), expected.numpy(), err_msg=str(in_size))


def _rectangles():
    """A 60x90 image with three rectangles, their boxes, labels and masks (one per box)."""
    image = np.full((60, 90, 3), 128, np.uint8)
    boxes = np.array([[5, 8, 40, 30], [50, 20, 85, 55], [20, 35, 45, 52]], np.float32)
    masks = np.zeros((3, 60, 90), bool)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[k, y0:y1, x0:x1] = True
        image[y0:y1, x0:x1] = 60 * (k + 1)
    return image, boxes, np.array([1, 2, 3], np.int32), masks


def test_flip_and_crop_move_masks_exactly_with_their_boxes():
    image, boxes, labels, masks = _rectangles()
    out, fboxes, fmasks = T.hflip(image, boxes, masks)
    np.testing.assert_array_equal(masks_to_boxes(fmasks), fboxes)
    for plain, with_masks in zip(T.hflip(image, boxes), (out, fboxes), strict=True):  # without masks: as before
        np.testing.assert_array_equal(plain, with_masks)
    cropped, cboxes, clabels, cmasks = T.crop(image, boxes, labels, 10, 30, 40, 40, masks)
    np.testing.assert_array_equal(clabels, [1, 2, 3])
    np.testing.assert_array_equal(masks_to_boxes(cmasks), cboxes)
    assert cmasks.shape == (3, 40, 40)
    _, cboxes, clabels, cmasks = T.crop(image, boxes, labels, 0, 45, 25, 45, masks)  # only box 2 remains
    np.testing.assert_array_equal(clabels, [2])
    np.testing.assert_array_equal(masks_to_boxes(cmasks), cboxes)


def test_resize_keeps_masks_within_a_pixel_of_their_boxes():
    image, boxes, labels, masks = _rectangles()
    for size in [(37, 55), (120, 181), (60, 90)]:
        _, rboxes, rmasks = T.resize(image, boxes, size, masks)
        assert rmasks.shape == (3, *size)
        # nearest rounds each edge to a whole pixel: within 1 px of the scaled box
        np.testing.assert_allclose(masks_to_boxes(rmasks), rboxes, atol=1.0)


@pytest.mark.parametrize("crop_prob", [0.0, 1.0])
def test_augmentation_carries_masks_without_changing_anything_else(crop_prob):
    augment = T.TrainAugmentation(scales=(40, 64), max_size=100, crop_scales=(50, 70), crop_size=(30, 50),
                                  crop_prob=crop_prob)
    image, boxes, labels, masks = _rectangles()
    # Nearest resizing moves a mask's edge by up to a pixel; the crop branch resizes twice,
    # and the second resize scales the first one's pixel by up to max(scales) / min(crop_size).
    atol = 1.0 + crop_prob * 64 / 30
    for seed in range(12):
        plain = augment(image, boxes, labels, np.random.default_rng(seed))
        out, oboxes, olabels, omasks = augment(image, boxes, labels, np.random.default_rng(seed), masks)
        for a, b in zip(plain, (out, oboxes, olabels)):
            np.testing.assert_array_equal(a, b)  # the randomness does not depend on masks
        assert omasks.shape == (len(olabels), *out.shape[:2]) and omasks.flags.c_contiguous
        seen = omasks.any(axis=(1, 2))
        np.testing.assert_allclose(masks_to_boxes(omasks[seen]), oboxes[seen], atol=atol)
        # each mask covers its rectangle's pixels (grey 60 * label; bilinear blends the edges)
        for k, label in enumerate(olabels):
            grey = out[..., 0] == 60 * label
            if grey.sum() >= 4:
                assert omasks[k][grey].mean() > 0.9, (seed, label)
    out, rboxes, rlabels, rmasks = T.EvalResize(40, 100)(image, boxes, labels, None, masks)
    assert rmasks.shape == (3, *out.shape[:2])
    assert len(T.EvalResize(40, 100)(image, boxes, labels)) == 3


def _record(masks, boxes=None, crowd=None, name="rec.png"):
    n = len(masks) if boxes is None else len(boxes)
    return Record(
        image=np.zeros((10, 12, 3), np.uint8),
        boxes=np.array(boxes if boxes is not None else [[0, 0, 4, 4]] * n, np.float32),
        labels=np.arange(1, n + 1, dtype=np.int32),
        is_crowd=np.array(crowd if crowd is not None else [False] * n),
        image_id=1, orig_size=(10, 12), name=name, masks=masks,
    )


def test_clean_record_drops_masks_with_their_objects_and_counts_empty_masks():
    masks = np.zeros((4, 10, 12), bool)
    masks[0, 1:3, 1:3] = masks[1, 0:2, 0:2] = masks[2, 5:9, 5:9] = True  # masks[3] is empty
    boxes = [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 5, 9], [0, 0, 4, 4]]  # 2: zero width
    record = _record(masks, boxes, crowd=[False, True, False, False])
    cboxes, clabels, dropped, cmasks = T.clean_record(record, with_masks=True)
    np.testing.assert_array_equal(clabels, [1])
    np.testing.assert_array_equal(cmasks, masks[:1])
    assert dropped == 2  # the degenerate box and the empty mask; the crowd object is not counted
    assert len(T.clean_record(record)) == 3 and T.clean_record(record)[2] == 1  # without masks: as before


@pytest.mark.parametrize(
    "masks,expected",
    [
        (np.zeros((3, 10, 12), bool), r"masks of shape \[3, 10, 12\], expected \[2, 10, 12\]"),
        (np.zeros((2, 12, 10), bool), r"expected \[2, 10, 12\] \(one mask per box"),
        (None, "has no masks"),
    ],
)
def test_bad_masks_name_the_record(masks, expected):
    record = _record(masks, boxes=[[0, 0, 4, 4]] * 2, name="images/bad.png")
    with pytest.raises(DatasetFormatError, match=r"images/bad.png: .*" + expected):
        T.clean_record(record, with_masks=True)


# --- batches ----------------------------------------------------------------------------


def _tiny_data(**overrides):
    data = data_config()
    data.update(dict(
        synthetic_train_examples=8, synthetic_eval_examples=5, synthetic_image_size=(40, 72),
        train_scales=(48, 56), train_max_size=96, crop_scales=(48,), crop_size=(32, 48),
        eval_scale=48, eval_max_size=96, bucket_step=32, max_boxes=6, num_threads=0,
        masks=True, synthetic_stuff=True,
    ))
    data.update(overrides)
    return data


def _check_batch_masks(batch, atol=1.0):
    masks, valid = batch["masks"], batch["valid"]
    n, m, height, width = masks.shape
    assert masks.dtype == bool and (n, m) == valid.shape and (height, width) == batch["image"].shape[1:3]
    assert not masks[~valid].any()  # empty slots and fillers have no pixels
    assert not (masks & ~batch["mask"][:, None]).any()  # nothing on padding pixels
    assert masks.sum(1).max() <= 1  # one object per pixel
    sizes = np.tile(batch["size"][:, ::-1], 2)[:, None].astype(np.float32)  # (w, h, w, h)
    cx, cy, bw, bh = np.moveaxis(batch["boxes"] * sizes, -1, 0)
    xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    shown = masks.any(axis=(2, 3))
    assert shown[valid].mean() > 0.8
    tight = masks_to_boxes(masks[shown])
    # a mask lies inside its box (the box of a partly covered shape is larger), within what
    # nearest-neighbour resizing can move an edge by (`atol`)
    assert np.all(tight[:, :2] >= xyxy[shown][:, :2] - atol) and np.all(tight[:, 2:] <= xyxy[shown][:, 2:] + atol)


def test_train_and_eval_batches_carry_aligned_masks():
    data = _tiny_data()
    train = next(make_train_iterator(data, 4, 0, 0, 1))
    _check_batch_masks(train, atol=1 + 56 / 32)  # the crop branch resizes twice (see the augmentation test)
    assert set(train["labels"][train["valid"]].tolist()) & {4, 5}
    source = make_source(data, "eval")
    assert source.masks and source.stuff
    it = make_eval_iterator(data, 4, 0, 1, source=source)
    first, second = next(it), next(it)
    for batch in (first, second):
        _check_batch_masks(batch)
    assert not second["is_real"][1:].any()  # 5 examples: the second batch has three fillers
    # eval: the masks are the source's (after cleaning) resized to the batch's image size
    for i in range(4):
        h, w = first["size"][i]
        _, _, _, masks = T.clean_record(source[i], with_masks=True)
        k = min(len(masks), data.max_boxes)
        np.testing.assert_array_equal(first["masks"][i, :k, :h, :w], T.resize_masks(masks, (h, w))[:k])
    plain = next(make_eval_iterator(_tiny_data(masks=False), 4, 0, 1))
    assert "masks" not in plain
    np.testing.assert_array_equal(plain["image"], first["image"])  # data.masks changes nothing else
    np.testing.assert_array_equal(plain["boxes"], first["boxes"])


def test_repad_pads_masks_with_the_image():
    batch = next(make_eval_iterator(_tiny_data(), 2, 0, 1))
    batch.pop("mask")
    height, width = batch["image"].shape[1:3]
    wider = batching.repad(batch, (height + 32, width + 64))
    assert wider["masks"].shape[2:] == (height + 32, width + 64)
    np.testing.assert_array_equal(wider["masks"][:, :, :height, :width], batch["masks"])
    assert not wider["masks"][:, :, height:].any() and not wider["masks"][:, :, :, width:].any()
    np.testing.assert_array_equal(batching.repad(wider, (height, width))["masks"], batch["masks"])


def test_masks_from_a_source_without_masks_is_a_clear_error():
    data = _tiny_data(synthetic_stuff=False)
    plain = SyntheticShapesSource(4, image_size=(40, 72))
    expected = r"data.masks=True, but the dataset SyntheticShapesSource train .*gives no masks"
    with pytest.raises(DataError, match=expected):
        make_train_iterator(data, 2, 0, 0, 1, source=plain)
    with pytest.raises(DataError, match="gives no masks"):
        make_eval_iterator(data, 2, 0, 1, source=plain)


class _BadMasks:
    """A source whose second record has masks of the wrong size."""

    def __init__(self):
        self.inner = SyntheticShapesSource(4, image_size=(40, 72), masks=True)
        self.category_names, self.category_isthing = self.inner.category_names, self.inner.category_isthing
        self.num_classes = self.inner.num_classes

    def __len__(self):
        return 4

    def __getitem__(self, index):
        record = self.inner[index]
        if index == 1:
            record.masks = record.masks[:, :-1]
        return record

    annotations = __getitem__


def test_bad_masks_in_the_pipeline_name_the_record():
    with pytest.raises(DatasetFormatError, match=r"synthetic train\[1\]: masks of shape"):
        next(make_eval_iterator(_tiny_data(), 2, 0, 1, source=_BadMasks()))


def test_empty_masks_are_counted_as_degenerate(tmp_path, caplog):
    Image.new("RGB", (12, 10)).save(tmp_path / "a.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 4, 4], "segmentation": [[5, 5, 9, 5]]},  # no area
    ]
    path = _write_coco(tmp_path, anns)
    data = _tiny_data(dataset="coco_folder", train_annotation_file=str(path), train_image_dir=str(tmp_path),
                      hflip_prob=0.0, crop_prob=0.0)
    it = make_train_iterator(data, 2, 0, 0, 1)
    with caplog.at_level(logging.WARNING):
        batch = next(it)
    assert batch["valid"].sum(1).tolist() == [1, 1]
    assert it.stats.degenerate_boxes == 2 and "empty mask" in caplog.text


# --- COCO segmentations -----------------------------------------------------------------


def _write_coco(tmp_path, annotations, height=10, width=12):
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_folder_decodes_polygons_and_rles(tmp_path):
    Image.new("RGB", (12, 10)).save(tmp_path / "a.png")
    expected = np.zeros((4, 10, 12), bool)
    expected[0, 1:4, 2:6] = expected[0, 6:9, 7:10] = True  # two polygons: their union
    expected[1].T.flat[[5, 6, 7, 20, 21]] = True  # uncompressed RLE: column-major runs
    expected[2, 4:7, 0:3] = True
    compressed = mask_utils.encode(np.asfortranarray(expected[2].astype(np.uint8)))["counts"].decode()
    expected[3, 0:2, 10:12] = True
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [2, 1, 8, 8],
         "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4], [7, 6, 10, 6, 10, 9, 7, 9]]},
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 5, 2, 3], "iscrowd": 1,
         "segmentation": {"size": [10, 12], "counts": [5, 3, 12, 2, 98]}},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 4, 3, 3],
         "segmentation": {"size": [10, 12], "counts": compressed}},
        {"id": 14, "image_id": 1, "category_id": 1, "bbox": [10, 0, 2, 2],
         "segmentation": [[10, 0, 12, 0, 12, 2, 10, 2], [0, 0, 1, 1]]},  # a 2-point polygon: ignored
    ]
    source = CocoFolderSource(_write_coco(tmp_path, anns), tmp_path, masks=True)
    assert source.masks and source.category_isthing == {1: True, 2: True}
    record = source[0]
    np.testing.assert_array_equal(record.masks, expected)
    np.testing.assert_array_equal(source.annotations(0).masks, expected)
    assert CocoFolderSource(source.annotation_file, tmp_path).annotations(0).masks is None
    data = data_config()
    data.update(dataset="coco_folder", coco_dir="", masks=True,
                train_annotation_file=source.annotation_file, train_image_dir=str(tmp_path))
    assert make_source(data, "train").masks


@pytest.mark.parametrize(
    "segmentation,expected",
    [
        (None, "annotation 7: no 'segmentation'"),
        ({"size": [10, 12]}, "annotation 7: 'segmentation' must be a list of polygons or an RLE"),
        ([[1, 2, 3]], "annotation 7: 'segmentation' polygons must be lists"),
        ({"size": [12, 10], "counts": [120]}, r"annotation 7: RLE 'size' \[12, 10\] is not the image's"),
        ({"size": [10, 12], "counts": [100]},
         "annotation 7: RLE 'counts' must be .* summing to height \\* width = 120"),
        ({"size": [10, 12], "counts": "zzz"}, "annotation 7: RLE 'counts' must be"),  # runs 10, 10, 10
        ({"size": [10, 12], "counts": "P"}, "annotation 7: RLE 'counts' must be"),  # cut short: 0x20 = more
    ],
)
def test_malformed_segmentations_name_file_and_annotation(tmp_path, segmentation, expected):
    ann = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}
    if segmentation is not None:
        ann["segmentation"] = segmentation
    path = _write_coco(tmp_path, [ann])
    CocoFolderSource(path, tmp_path)  # without masks the segmentation is not read
    with pytest.raises(DatasetFormatError, match=re.escape(str(path)) + ": " + expected):
        CocoFolderSource(path, tmp_path, masks=True)


def test_masks_need_image_sizes(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": [{"id": 4, "file_name": "a.png"}], "annotations": [],
                                "categories": [{"id": 1}]}))
    CocoFolderSource(path, tmp_path)
    with pytest.raises(DatasetFormatError, match=r"image 4 \(a.png\) needs 'height' and 'width' for masks"):
        CocoFolderSource(path, tmp_path, masks=True)


def test_undecodable_polygon_names_the_annotation_when_loaded(tmp_path):
    ann = {"id": 8, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
           "segmentation": [[0, 0, "x", 0, 4, 4]]}
    source = CocoFolderSource(_write_coco(tmp_path, [ann]), tmp_path, masks=True)
    with pytest.raises(DatasetFormatError, match="annotation 8: 'segmentation' does not decode"):
        source.annotations(0)


def test_coco_export_writes_rle_masks_that_read_back(tmp_path):
    source = SyntheticShapesSource(3, seed=5, image_size=(24, 40), masks=True, stuff=True)
    coco = json.loads(json.dumps(to_coco_dict(source)))  # JSON-able
    assert {c["id"]: c["isthing"] for c in coco["categories"]} == {1: 1, 2: 1, 3: 1, 4: 0, 5: 0}
    anns = iter(coco["annotations"])
    for i in range(len(source)):
        record = source.annotations(i)
        for mask in record.masks:
            ann = next(anns)
            np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), mask)
            assert ann["area"] == mask.sum()  # COCO's area: the mask's pixels
    annotation_file, image_dir = write_coco_folder(source, tmp_path)
    back = CocoFolderSource(annotation_file, image_dir, masks=True)
    for i in range(len(source)):
        np.testing.assert_array_equal(back.annotations(i).masks, source.annotations(i).masks)
    plain = to_coco_dict(SyntheticShapesSource(3, seed=5, image_size=(24, 40)))
    assert "segmentation" not in plain["annotations"][0]
    x, y, w, h = plain["annotations"][0]["bbox"]
    assert plain["annotations"][0]["area"] == w * h


# --- COCO panoptic through make_source ----------------------------------------------------


def _write_panoptic(image_path, png_path, annotation_path):
    """One 8x10 image: a thing (id 1) on a stuff region (id 9); its PNG holds segments 5 and 6."""
    ids = np.full((8, 10), 6, np.uint32)
    ids[2:5, 3:7] = 5
    for path in (image_path, png_path, annotation_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 10, 3), 100, np.uint8)).save(image_path)
    Image.fromarray(id_to_rgb(ids)).save(png_path)
    annotation_path.write_text(json.dumps({
        "images": [{"id": 3, "file_name": image_path.name, "height": 8, "width": 10}],
        "annotations": [{"image_id": 3, "file_name": png_path.name, "segments_info": [
            {"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 6, "category_id": 9, "iscrowd": 0}]}],
        "categories": [{"id": 1, "name": "thing", "isthing": 1}, {"id": 9, "name": "wall", "isthing": 0}],
    }))
    return ids


def test_coco_panoptic_paths_from_the_official_layout_or_explicit_keys(tmp_path):
    coco = tmp_path / "coco"
    ids = _write_panoptic(coco / "val2017" / "a.png", coco / "annotations" / "panoptic_val2017" / "a.png",
                          coco / "annotations" / "panoptic_val2017.json")
    data = _tiny_data(dataset="coco_panoptic", coco_dir=str(coco))
    source = make_source(data, "eval")
    assert source.category_isthing == {1: True, 9: False}
    np.testing.assert_array_equal(source[0].masks, [ids == 5, ids == 6])
    batch = next(make_eval_iterator(data, 2, 0, 1, source=source))
    h, w = batch["size"][0]
    np.testing.assert_array_equal(batch["masks"][0, :2, :h, :w], T.resize_masks(np.stack([ids == 5, ids == 6]), (h, w)))
    np.testing.assert_array_equal(batch["labels"][0, :2], [1, 9])

    mine = tmp_path / "mine"
    _write_panoptic(mine / "img" / "b.png", mine / "png" / "b.png", mine / "pan.json")
    explicit = _tiny_data(dataset="coco_panoptic", train_panoptic_file=str(mine / "pan.json"),
                          train_panoptic_png_dir=str(mine / "png"), train_image_dir=str(mine / "img"))
    source = make_source(explicit, "train")
    assert (source.annotation_file, source.image_dir, source.panoptic_dir) == (
        str(mine / "pan.json"), str(mine / "img"), str(mine / "png"))
    explicit.train_panoptic_png_dir = ""
    with pytest.raises(DataError, match="'coco_panoptic' needs data.coco_dir or all of data.train_panoptic_file, "
                                        "data.train_image_dir, data.train_panoptic_png_dir"):
        make_source(explicit, "train")
