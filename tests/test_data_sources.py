"""Sources: synthetic shapes, COCO-format folder (round trip), TFDS through mock_data."""

import json

import numpy as np
import pytest

from detr_jax.data import CocoFolderSource, SyntheticShapesSource, to_coco_dict, write_coco_folder
from detr_jax.data.coco_categories import COCO_IDS
from detr_jax.data.synthetic import SHAPE_NAMES


def _small_synthetic(n=6, **kw):
    return SyntheticShapesSource(n, seed=3, image_size=(48, 80), **kw)


def test_synthetic_is_deterministic_random_access():
    a, b = _small_synthetic(), _small_synthetic()
    for i in (4, 0, 2):  # any order
        ra, rb = a[i], b[i]
        np.testing.assert_array_equal(ra.image, rb.image)
        np.testing.assert_array_equal(ra.boxes, rb.boxes)
    assert not np.array_equal(a[0].image, a[1].image)
    other_split = SyntheticShapesSource(6, seed=3, split="validation", image_size=(48, 80))
    assert not np.array_equal(a[0].image, other_split[0].image)
    with pytest.raises(IndexError):
        a[6]


def test_synthetic_boxes_are_tight_around_the_shapes():
    source = SyntheticShapesSource(12, seed=1, image_size=(64, 96), num_objects=(1, 1))
    labels_seen = set()
    for i in range(len(source)):
        record = source[i]
        assert record.image.dtype == np.uint8 and record.image.shape[2] == 3
        assert record.image.shape[:2] == record.orig_size
        assert 64 <= min(record.orig_size) and max(record.orig_size) <= 96
        (x0, y0, x1, y1), label = record.boxes[0].astype(int), int(record.labels[0])
        labels_seen.add(label)
        # pixels nearer the shape's colour than the background's
        image = record.image.astype(float)
        background = np.median(np.concatenate([image[0], image[-1]]), axis=0)
        box = image[y0:y1, x0:x1].reshape(-1, 3)
        color = np.median(box[np.linalg.norm(box - background, axis=-1) > 60], axis=0)
        assert np.linalg.norm(color - background) > 100
        differs = np.linalg.norm(image - color, axis=-1) < np.linalg.norm(image - background, axis=-1)
        ys, xs = np.nonzero(differs)
        np.testing.assert_array_equal([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x0, y0, x1, y1])
        if label == 1:  # a rectangle fills its box
            assert differs[y0:y1, x0:x1].all()
        np.testing.assert_array_equal(source.annotations(i).boxes, record.boxes)
    assert labels_seen == set(SHAPE_NAMES)
    assert source.num_classes == 4 and source.category_names == {1: "rectangle", 2: "ellipse", 3: "triangle"}


def test_synthetic_objects_are_large_and_few():
    source = SyntheticShapesSource(40, seed=0, image_size=(100, 100))
    counts, fractions = [], []
    for i in range(len(source)):
        record = source.annotations(i)
        counts.append(len(record.boxes))
        wh = record.boxes[:, 2:] - record.boxes[:, :2]
        fractions.extend((wh / 100).max(axis=1))
    assert 1 <= min(counts) and max(counts) <= 4 and np.mean(counts) > 1.5
    assert min(fractions) >= 0.15


def test_coco_folder_round_trip_of_synthetic(tmp_path):
    source = _small_synthetic(n=5)
    annotation_file, image_dir = write_coco_folder(source, tmp_path, split="train")
    assert annotation_file == str(tmp_path / "annotations" / "instances_train.json")
    loaded = CocoFolderSource(annotation_file, image_dir)
    assert len(loaded) == 5
    assert loaded.category_names == source.category_names and loaded.num_classes == 4
    for i in range(5):
        original, back = source[i], loaded[i]
        assert back.image_id == original.image_id and back.orig_size == original.orig_size
        np.testing.assert_array_equal(back.image, original.image)  # PNG is lossless
        np.testing.assert_allclose(back.boxes, original.boxes, atol=1e-4)
        np.testing.assert_array_equal(back.labels, original.labels)
        assert back.name.endswith(f"{original.image_id:012d}.png")


def test_coco_folder_orders_by_image_id_and_keeps_crowd_and_empty_images(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (20, 10)).save(tmp_path / name)
    data = {
        "images": [
            {"id": 9, "file_name": "a.png", "height": 10, "width": 20},
            {"id": 2, "file_name": "b.png", "height": 10, "width": 20},
            {"id": 5, "file_name": "c.png", "height": 10, "width": 20},
        ],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 0},
            {"id": 2, "image_id": 9, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [2, 2, 2, 2]},
        ],
        "categories": [{"id": 3, "name": "c3"}, {"id": 7, "name": "c7"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    source = CocoFolderSource(path, tmp_path)
    assert [source.annotations(i).image_id for i in range(3)] == [2, 5, 9]
    assert source.num_classes == 8
    record = source[2]
    np.testing.assert_array_equal(record.boxes, [[1, 2, 4, 6], [0, 0, 5, 5]])
    np.testing.assert_array_equal(record.labels, [7, 3])
    np.testing.assert_array_equal(record.is_crowd, [False, True])
    assert len(source[1].boxes) == 0  # image 5 has no annotations: kept
    gt = to_coco_dict(source)
    assert {a["image_id"] for a in gt["annotations"]} == {2, 9}
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 1


def test_coco_ground_truth_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    source = _small_synthetic(n=4)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(to_coco_dict(source)))
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [0, 1, 2, 3]
    boxes = [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[1]))]
    np.testing.assert_allclose(boxes, [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in source[1].boxes])


@pytest.fixture(scope="module")
def tfds_mock():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        yield


def test_tfds_coco_maps_labels_to_coco_ids(tfds_mock):
    from detr_jax.data.tfds_source import TfdsSource
    from detr_jax.data.transforms import clean_record

    source = TfdsSource("coco/2017", "train")
    assert len(source) == 6 and source.label_mapping == "coco"
    assert source.num_classes == 91 and set(source.category_names) == set(COCO_IDS)
    raw = source._source[0]
    record = source[0]
    h, w = record.image.shape[:2]
    assert record.orig_size == (h, w) and record.image_id == int(raw["image/id"])
    n = len(record.boxes)
    assert n > 0 and len(record.labels) == n == len(record.is_crowd)
    ymin, xmin, ymax, xmax = np.asarray(raw["objects"]["bbox"][:n]).T
    np.testing.assert_allclose(record.boxes, np.stack([xmin * w, ymin * h, xmax * w, ymax * h], 1), rtol=1e-6)
    np.testing.assert_array_equal(record.labels, np.array(COCO_IDS)[raw["objects"]["label"][:n]])
    # mock boxes are random (often inverted): cleaning must keep only proper ones
    for i in range(len(source)):
        boxes, labels, _ = clean_record(source[i])
        assert np.all(boxes[:, 2:] > boxes[:, :2]) and np.all(np.isin(labels, COCO_IDS))


def test_tfds_without_label_mapping_keeps_indices(tfds_mock):
    from detr_jax.data.tfds_source import TfdsSource

    source = TfdsSource("coco/2017", "train", label_mapping="none")
    assert source.num_classes == 80
    raw = source._source[1]
    n = len(source[1].labels)
    np.testing.assert_array_equal(source[1].labels, raw["objects"]["label"][:n])


def test_missing_tfds_gives_an_install_hint(monkeypatch):
    import sys

    from detr_jax.data.tfds_source import TfdsSource

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(ImportError, match=r"detr-jax\[tfds\]"):
        TfdsSource("coco/2017", "train")
