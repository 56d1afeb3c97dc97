"""COCO panoptic source: segments from the PNG's RGB ids, tight boxes, stuff and crowd, errors."""

import copy
import json
import re

import numpy as np
import pytest
from PIL import Image

from detr_jax.data.checks import check_image_files
from detr_jax.data.coco_panoptic import CocoPanopticSource, masks_to_boxes
from detr_jax.data.panoptic_png import id_to_rgb, rgb_to_id
from detr_jax.data.records import DataError, DatasetFormatError, DetectionSource, ImageLoadError
from detr_jax.data.transforms import clean_record

H, W = 16, 24
SKY, PERSON, CROWD, DOT = 70000, 300, 5, 6  # SKY uses the B channel, PERSON the G channel


def _id_map_10() -> np.ndarray:
    """Image 10: sky (stuff) on top, a person, a crowd of cars, a one-pixel person; the rest void."""
    ids = np.zeros((H, W), np.uint32)
    ids[0:4, :] = SKY
    ids[5:10, 2:7] = PERSON
    ids[10:15, 12:21] = CROWD
    ids[15, 3] = DOT
    return ids


def _id_map_4() -> np.ndarray:
    """Image 4: one car covering all but a void border."""
    ids = np.zeros((H, W), np.uint32)
    ids[1:-1, 1:-1] = 1
    return ids


ANNOTATIONS = {
    "images": [
        {"id": 10, "file_name": "000010.png", "height": H, "width": W},
        {"id": 4, "file_name": "000004.png", "height": H, "width": W},
        {"id": 7, "file_name": "000007.png", "height": H, "width": W},  # no annotation
    ],
    "annotations": [  # not in image id order: the source orders by image id
        {
            "image_id": 10,
            "file_name": "000010.png",
            "segments_info": [
                {"id": SKY, "category_id": 7, "iscrowd": 0, "bbox": [0, 0, 24, 4], "area": 96},
                {"id": PERSON, "category_id": 1, "iscrowd": 0, "bbox": [2, 5, 5, 5], "area": 25},
                {"id": CROWD, "category_id": 2, "iscrowd": 1, "bbox": [12, 10, 9, 5], "area": 45},
                {"id": DOT, "category_id": 1, "iscrowd": 0, "bbox": [3, 15, 1, 1], "area": 1},
            ],
        },
        {
            "image_id": 4,
            "file_name": "000004.png",
            "segments_info": [
                {"id": 1, "category_id": 2, "iscrowd": 0, "bbox": [1, 1, 22, 14], "area": 308},
                {"id": 9, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1},  # not in the PNG
            ],
        },
    ],
    "categories": [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 2, "name": "car", "isthing": 1},
        {"id": 7, "name": "sky", "isthing": 0},
    ],
}


def _write(tmp_path, annotations=ANNOTATIONS, id_maps=None):
    """Writes the dataset; returns (source args, {image id: image array})."""
    id_maps = id_maps or {10: _id_map_10(), 4: _id_map_4()}
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "panoptic").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images = {}
    for image_id in (10, 4, 7):
        images[image_id] = rng.integers(0, 256, (H, W, 3), np.uint8)
        Image.fromarray(images[image_id]).save(tmp_path / "images" / f"{image_id:06d}.png")
    for image_id, ids in id_maps.items():
        Image.fromarray(id_to_rgb(ids)).save(tmp_path / "panoptic" / f"{image_id:06d}.png")
    annotation_file = tmp_path / "panoptic_val.json"
    annotation_file.write_text(json.dumps(annotations))
    return (annotation_file, tmp_path / "images", tmp_path / "panoptic"), images


@pytest.fixture
def dataset(tmp_path):
    args, images = _write(tmp_path)
    return CocoPanopticSource(*args), images


def test_rgb_to_id_uses_all_three_channels():
    ids = np.array([0, 1, 255, 256, 300, 65535, 65536, 70000, 256**3 - 1])
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[4], [44, 1, 0])  # 300 = 44 + 256
    np.testing.assert_array_equal(rgb[7], [112, 17, 1])  # 70000 = 112 + 256 * 17 + 256**2
    np.testing.assert_array_equal(rgb_to_id(rgb), ids)


def test_masks_to_boxes_are_tight_with_exclusive_ends():
    masks = np.zeros((3, 5, 6), bool)
    masks[0, 2, 3] = True  # one pixel at row 2, column 3
    masks[1, 1:4, 0:6] = True
    np.testing.assert_array_equal(masks_to_boxes(masks), [[3, 2, 4, 3], [0, 1, 6, 4], [0, 0, 0, 0]])
    assert masks_to_boxes(masks[:0]).shape == (0, 4)


def test_records_hold_each_segment_with_its_mask_box_label_and_crowd_flag(dataset):
    source, images = dataset
    assert isinstance(source, DetectionSource)
    assert len(source) == 2 and source.num_unannotated_images == 1
    record = source[1]
    assert record.image_id == 10 and record.orig_size == (H, W)
    assert record.name.endswith("000010.png") and "images" in record.name
    np.testing.assert_array_equal(record.image, images[10])
    assert record.image.dtype == np.uint8 and record.masks.dtype == bool
    assert record.boxes.dtype == np.float32 and record.labels.dtype == np.int32
    np.testing.assert_array_equal(record.labels, [7, 1, 2, 1])
    np.testing.assert_array_equal(record.is_crowd, [False, False, True, False])
    ids = _id_map_10()
    np.testing.assert_array_equal(record.masks, ids[None] == np.array([SKY, PERSON, CROWD, DOT])[:, None, None])
    np.testing.assert_array_equal(
        record.boxes, [[0, 0, 24, 4], [2, 5, 7, 10], [12, 10, 21, 15], [3, 15, 4, 16]]
    )


def test_a_listed_segment_without_pixels_is_dropped_as_degenerate(dataset):
    source, _ = dataset
    record = source[0]
    assert record.image_id == 4
    np.testing.assert_array_equal(record.labels, [2, 1])
    assert record.masks[0].sum() == 14 * 22 and not record.masks[1].any()
    np.testing.assert_array_equal(record.boxes, [[1, 1, 23, 15], [0, 0, 0, 0]])
    _, labels, degenerate = clean_record(record)
    np.testing.assert_array_equal(labels, [2])
    assert degenerate == 1


def test_annotations_are_the_record_without_the_image(dataset):
    source, _ = dataset
    for index in range(len(source)):
        full, light = source[index], source.annotations(index)
        assert light.image is None
        for field in ("boxes", "labels", "is_crowd", "masks"):
            np.testing.assert_array_equal(getattr(light, field), getattr(full, field))
        assert (light.image_id, light.orig_size, light.name) == (full.image_id, full.orig_size, full.name)


def test_categories_counts_and_files(dataset):
    source, _ = dataset
    assert source.category_names == {1: "person", 2: "car", 7: "sky"}
    assert source.category_isthing == {1: True, 2: True, 7: False}
    assert source.num_classes == 8
    np.testing.assert_array_equal(source.box_counts(), [2, 3])  # image 4, image 10 (crowd not counted)
    files = [(p.split("/")[-2:], size) for p, size in source.image_files()]
    assert files == [
        (["images", "000004.png"], (H, W)), (["panoptic", "000004.png"], (H, W)),
        (["images", "000010.png"], (H, W)), (["panoptic", "000010.png"], (H, W)),
    ]
    check_image_files(source)


def _mutated(change):
    annotations = copy.deepcopy(ANNOTATIONS)
    change(annotations)
    return annotations


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("annotations"), "missing 'annotations'"),
        (lambda a: a["annotations"][0].pop("segments_info"), r"annotations\[0\] needs .*'segments_info'"),
        (lambda a: a["annotations"][1]["segments_info"][0].pop("category_id"),
         r"annotations\[1\] \(image 4\): segments_info\[0\] needs 'id' and 'category_id'"),
        (lambda a: a["annotations"][0]["segments_info"][1].update(category_id=3),
         "image 10.*segment 300 has unknown category id 3"),
        (lambda a: a["categories"][2].pop("isthing"), r"categories\[2\] \(id 7\) has no 'isthing'"),
        (lambda a: a["annotations"][0].update(image_id=99), "unknown image id 99"),
        (lambda a: a["annotations"].append(dict(a["annotations"][1])), "a second annotation of image 4"),
        (lambda a: a["annotations"][1]["segments_info"][0].update(id=0), "segment id 0 is not an integer in 1"),
        (lambda a: a["annotations"][0]["segments_info"][3].update(id=SKY), f"segment id {SKY} appears twice"),
    ],
)
def test_malformed_annotation_file_is_refused_naming_file_and_field(tmp_path, change, message):
    args, _ = _write(tmp_path, _mutated(change))
    with pytest.raises(DatasetFormatError, match=re.escape(str(args[0])) + ".*" + message):
        CocoPanopticSource(*args)


def test_png_pixels_of_an_unlisted_segment_are_refused(tmp_path):
    ids = _id_map_10()
    ids[4, 0] = 999
    args, _ = _write(tmp_path, id_maps={10: ids, 4: _id_map_4()})
    source = CocoPanopticSource(*args)
    png = str(tmp_path / "panoptic" / "000010.png")
    for load in (source.annotations, source.__getitem__):
        with pytest.raises(DatasetFormatError, match=re.escape(png) + r": segment ids \[999\] .* image 10"):
            load(1)
    assert source[0].image_id == 4  # the other image still loads


def test_png_of_another_size_is_a_bad_file_named_at_load_and_by_the_checks(tmp_path):
    args, _ = _write(tmp_path, id_maps={10: _id_map_10()[:, :-1], 4: _id_map_4()})
    source = CocoPanopticSource(*args)
    png = str(tmp_path / "panoptic" / "000010.png")
    with pytest.raises(ImageLoadError, match=re.escape(png) + r": decoded size \(h=16, w=23\) differs") as info:
        source.annotations(1)
    assert info.value.path == png
    with pytest.raises(DataError, match="1 of 4 images cannot be read:\n.*" + re.escape(png)):
        check_image_files(source)


def test_missing_or_corrupt_png_raises_image_load_error_naming_it(tmp_path):
    args, _ = _write(tmp_path)
    source = CocoPanopticSource(*args)
    corrupt, missing = tmp_path / "panoptic" / "000010.png", tmp_path / "panoptic" / "000004.png"
    corrupt.write_bytes(b"not a png" * 10)
    missing.unlink()
    for index, path, reason in ((1, corrupt, "cannot decode"), (0, missing, "file not found")):
        with pytest.raises(ImageLoadError, match=re.escape(str(path)) + ": " + reason) as info:
            source[index]
        assert info.value.path == str(path)
