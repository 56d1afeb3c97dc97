"""Bad input: unreadable or odd images, malformed annotation files, degenerate boxes."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from detr_jax.data import (
    CocoFolderSource,
    CocoPanopticSource,
    DataError,
    DatasetFormatError,
    ImageLoadError,
    SyntheticShapesSource,
    make_eval_iterator,
    make_train_iterator,
    write_coco_folder,
)
from detr_jax.data.config import data_config
from detr_jax.data.images import decode_image


def _tiny_data(**overrides):
    data = data_config()
    data.update(
        dict(
            train_scales=(48, 64), train_max_size=96, crop_scales=(48,), crop_size=(32, 48),
            eval_scale=64, eval_max_size=96, bucket_step=32, max_boxes=6, num_threads=0,
        )
    )
    data.update(overrides)
    return data


# --- images -------------------------------------------------------------------------


def _jpeg_bytes(image, **kw):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kw)
    return buffer.getvalue()


def test_corrupt_truncated_and_missing_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"definitely not an image" * 10)
    truncated = tmp_path / "truncated.jpg"
    data = _jpeg_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    truncated.write_bytes(data[: len(data) // 2])
    for path, reason in ((corrupt, "cannot decode"), (truncated, "cannot decode"), (tmp_path / "missing.jpg", "not found")):
        with pytest.raises(ImageLoadError) as info:
            decode_image(path)
        assert str(path) in str(info.value) and reason in str(info.value)
        assert info.value.path == str(path)


def test_image_modes_are_converted_to_rgb(tmp_path):
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    out = decode_image(tmp_path / "gray.png")
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))

    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "rgba.png")[0, 0], [200, 0, 0])

    Image.new("CMYK", (8, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    cmyk = decode_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (4, 8, 3)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "palette.png")[0, 0], [10, 20, 30])

    deep = np.full((3, 3), 65535, np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "deep.png"), 255)


def _exif_rotated_jpeg(path):
    """Stored 20 high x 40 wide with a red top-left corner, EXIF orientation 6 (90 CW)."""
    image = np.zeros((20, 40, 3), np.uint8)
    image[:5, :5] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).save(path, exif=exif, quality=95)


def test_exif_orientation_follows_the_annotation_size(tmp_path):
    path = tmp_path / "rotated.jpg"
    _exif_rotated_jpeg(path)
    stored = decode_image(path, expected_size=(20, 40))  # COCO's convention: stored pixels
    assert stored.shape == (20, 40, 3) and stored[2, 2, 0] > 200
    assert decode_image(path).shape == (20, 40, 3)  # no size known: stored, as official DETR
    displayed = decode_image(path, expected_size=(40, 20))  # annotated on the displayed image
    assert displayed.shape == (40, 20, 3)
    assert displayed[2, 17, 0] > 200 and displayed[2, 2, 0] < 50  # top-left went top-right
    with pytest.raises(ImageLoadError, match="differs from the annotation"):
        decode_image(path, expected_size=(30, 30))


# --- annotation files ---------------------------------------------------------------


def _write(tmp_path, data, name="instances.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _coco(annotations, images=None, categories=None):
    return {
        "images": images if images is not None else [{"id": 1, "file_name": "a.png", "height": 10, "width": 20}],
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 1, "name": "thing"}],
    }


def test_unknown_category_names_file_annotation_and_category(tmp_path):
    path = _write(tmp_path, _coco([{"id": 17, "image_id": 1, "category_id": 99, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(DatasetFormatError) as info:
        CocoFolderSource(path, tmp_path)
    message = str(info.value)
    assert str(path) in message and "annotation 17" in message and "category id 99" in message


@pytest.mark.parametrize(
    "content,expected",
    [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level is a list"),
        (json.dumps({"annotations": [], "categories": []}), "missing 'images'"),
        (json.dumps({"images": [], "annotations": []}), "missing 'categories'"),
        (json.dumps(_coco([{"id": 3, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]}])), "unknown image id 5"),
        (json.dumps(_coco([{"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}])), "'bbox' must be"),
        (json.dumps(_coco([{"id": 5, "image_id": 1, "bbox": [0, 0, 1, 1]}])), "needs 'image_id', 'category_id'"),
        (json.dumps(_coco([], images=[{"id": 1}])), "images[0] needs 'id' and 'file_name'"),
    ],
)
def test_malformed_annotation_files_give_clear_errors(tmp_path, content, expected):
    path = _write(tmp_path, content)
    with pytest.raises(DatasetFormatError) as info:
        CocoFolderSource(path, tmp_path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_an_annotation_file_that_is_not_utf8_is_named_with_the_byte(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b"\xff\xfe{")
    expected = re.escape(f"{path}: not UTF-8 text (byte 0: b'\\xff', invalid start byte)")
    with pytest.raises(DatasetFormatError, match=expected):
        CocoFolderSource(path, tmp_path)
    with pytest.raises(DatasetFormatError, match=expected):
        CocoPanopticSource(path, tmp_path, tmp_path)


def test_missing_annotation_file_and_dataset_without_images(tmp_path):
    with pytest.raises(DatasetFormatError, match="not found"):
        CocoFolderSource(tmp_path / "nope.json", tmp_path)
    with pytest.raises(DatasetFormatError, match=re.escape(str(tmp_path)) + ": is a directory.*COCO instances JSON"):
        CocoFolderSource(tmp_path, tmp_path)
    path = _write(tmp_path, {"images": [], "annotations": [], "categories": []})
    assert len(CocoFolderSource(path, tmp_path)) == 0
    data = _tiny_data(dataset="coco_folder", train_annotation_file=str(path), train_image_dir=str(tmp_path))
    with pytest.raises(DataError, match="no examples"):
        make_train_iterator(data, 2, seed=0, shard_index=0, shard_count=1)


def test_degenerate_boxes_are_clipped_dropped_and_counted(tmp_path):
    Image.new("RGB", (20, 10), (90, 90, 90)).save(tmp_path / "a.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-5, 2, 10, 5]},  # partly outside
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [3, 3, 0, 4]},  # zero width
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [3, 3, -2, 4]},  # negative width
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [25, 0, 5, 5]},  # outside
    ]
    path = _write(tmp_path, _coco(anns))
    source = CocoFolderSource(path, tmp_path)
    assert source.num_degenerate_boxes == 3
    data = _tiny_data(
        dataset="coco_folder", train_annotation_file=str(path), train_image_dir=str(tmp_path),
        hflip_prob=0.0, crop_prob=0.0,
    )
    it = make_train_iterator(data, 2, seed=0, shard_index=0, shard_count=1, source=source)
    batch = next(it)
    assert batch["valid"].sum(1).tolist() == [1, 1]
    # [-5, 2, 5, 7] clipped to [0, 2, 5, 7] in a 20x10 image -> cxcywh relative
    np.testing.assert_allclose(batch["boxes"][0, 0], [2.5 / 20, 4.5 / 10, 5 / 20, 5 / 10], atol=1e-6)
    assert it.stats.degenerate_boxes == 6  # 3 per example, 2 examples


# --- unreadable images inside the pipeline ------------------------------------------


@pytest.fixture()
def coco_with_bad_images(tmp_path):
    source = SyntheticShapesSource(6, seed=0, image_size=(40, 56))
    annotation_file, image_dir = write_coco_folder(source, tmp_path, split="train")
    # Three consecutive unreadable files: example 2 also meets 3 and 4, example 3 meets 4.
    (tmp_path / "train" / "000000000002.png").write_bytes(b"garbage")
    (tmp_path / "train" / "000000000003.png").write_bytes(b"")
    (tmp_path / "train" / "000000000004.png").unlink()
    return _tiny_data(dataset="coco_folder", coco_dir=str(tmp_path), train_split="train", eval_split="train")


def test_training_skips_unreadable_images_and_counts_them(coco_with_bad_images, caplog):
    it = make_train_iterator(coco_with_bad_images, 2, seed=0, shard_index=0, shard_count=1)
    ids = []
    with caplog.at_level("WARNING"):
        for _ in range(9):  # three epochs
            batch = next(it)
            assert batch["image"].shape[0] == 2 and batch["is_real"].all()
            ids.extend(batch["image_id"].tolist())
    assert not {2, 3, 4} & set(ids) and ids.count(5) == 12  # 5 stands in for 2, 3 and 4
    # distinct bad files, not failed reads (3 + 2 + 1 per epoch)
    bad = {str(coco_with_bad_images.coco_dir + f"/train/00000000000{i}.png") for i in (2, 3, 4)}
    assert it.stats.skipped_images == 3 and it.stats.as_dict()["skipped_images"] == 3
    assert it.stats.unreadable_files == bad
    assert it.stats.examples == 18
    logged = [name for name in bad for record in caplog.records if name in record.getMessage()]
    assert logged and len(logged) == len(set(logged))  # each file logged once, not at every read


def test_training_without_skipping_and_evaluation_fail_naming_the_file(coco_with_bad_images):
    coco_with_bad_images.skip_bad_images = False
    it = make_train_iterator(coco_with_bad_images, 6, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ImageLoadError, match=r"00000000000[234]\.png"):
        next(it)
    evaluation = make_eval_iterator(coco_with_bad_images, 2, shard_index=0, shard_count=1)
    next(evaluation)  # images 0 and 1 are fine
    with pytest.raises(ImageLoadError, match=r"000000000002\.png: cannot decode"):
        next(evaluation)
