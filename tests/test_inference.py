"""Predictor (batching, buckets, compile count, dtypes), checkpoints, image loading and
`detr-jax predict` on a folder. A random-weight tiny DETR on 64-96 px images."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from detr_jax.serving import predictor as inference
from detr_jax.checkpoints import restore
from detr_jax.checkpoints.checkpointer import CheckpointError, save_variables
from detr_jax.cli.predict import predict_main
from detr_jax.config import load_config
from detr_jax.data import batching
from detr_jax.data.records import ImageLoadError
from detr_jax.data.transforms import resized_size
from detr_jax.data.pipeline import buckets_for
from detr_jax.models import build_model
from detr_jax.models.detr import init_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
    """Eval resize: shorter side 64, longer at most 96; buckets every 32 px."""
    return load_config(
        os.path.join(REPO, "configs", "synthetic_tiny.py"),
        {
            "model.hidden_dim": 32, "model.num_heads": 4, "model.num_encoder_layers": 1,
            "model.num_decoder_layers": 2, "model.dim_feedforward": 64, "model.num_queries": 5,
            "model.dilation": False,  # the measured padding effects below are for stride 32
            "model.backbone_norm": "frozen_bn",  # GroupNorm statistics would see the padding
            "data.eval_scale": 64, "data.eval_max_size": 96, "data.bucket_step": 32, "data.bucket_shapes": (),
            "eval.batch_size": 4,
        },
    )


@pytest.fixture(scope="module")
def config():
    return tiny_config()


def random_variables(model, seed: int = 0) -> dict:
    """Random variables for `model`, drawn with numpy (jax's `model.init` of even the tiny
    model takes ~10-30 s to compile on 2 CPU cores): kernels N(0, 1 / fan_in), biases 0,
    LayerNorm scales 1, query embeddings N(0, 1), and frozen BatchNorm statistics like a
    trained network's (freshly initialized BN, bias 0 and mean 0, keeps zero padding exactly
    zero through the backbone, which would hide every padding effect)."""
    shapes = jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))
    rng = np.random.default_rng(seed)
    bn_ranges = {"bias": (-0.3, 0.3), "mean": (-0.3, 0.3), "scale": (0.5, 1.5), "var": (0.5, 2.0)}

    def draw(path, leaf):
        name = path[-1].key
        if path[0].key == "frozen_bn":
            value = rng.uniform(*bn_ranges[name], leaf.shape)
        elif name == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        elif name == "query_embed":
            value = rng.normal(0.0, 1.0, leaf.shape)
        else:
            value = np.full(leaf.shape, 1.0 if name == "scale" else 0.0)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def variables(config):
    return random_variables(build_model(config.model))


@pytest.fixture(scope="module")
def predictor(config, variables):
    return inference.Predictor(config, variables)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    image[h // 4 : h // 2, w // 4 : w // 2] = (250, 20, 20)  # some structure
    return image


def _bucket(config, h, w):
    rh, rw = resized_size(h, w, config.data.eval_scale, config.data.eval_max_size)
    return batching.choose_bucket(buckets_for(config.data), rh, rw, config.data.bucket_step)[0]


def _max_diff(a, b):
    return (float(np.abs(a["boxes"] - b["boxes"]).max()), float(np.abs(a["scores"] - b["scores"]).max()))


# ---------------------------------------------------------------------------------------
# Batching and padding


def test_one_image_alone_and_in_a_batch_give_the_same_result(predictor, config):
    """Grouped by bucket, an image is padded exactly as when alone, whatever else is in the
    list (here a larger image of its bucket, and images of larger buckets). Measured: bitwise
    equal on CPU; 1e-4 px / 1e-6 tolerance in case a backend orders batched sums differently."""
    image = _image(60, 80)
    others = [_image(66, 92, 1), _image(200, 150, 2), _image(90, 90, 3), _image(61, 79, 4)]
    assert _bucket(config, 66, 92) == _bucket(config, 60, 80) != _bucket(config, 200, 150)
    alone = predictor.predict_queries([image])[0]
    batched = predictor.predict_queries([others[0], others[1], image, others[2], others[3]])[2]
    boxes_diff, scores_diff = _max_diff(alone, batched)
    print(f"alone vs batched: boxes {boxes_diff:.3g} px, scores {scores_diff:.3g}")
    assert boxes_diff <= 1e-4 and scores_diff <= 1e-6
    np.testing.assert_array_equal(alone["labels"], batched["labels"])


def test_padding_to_a_larger_bucket_changes_results_only_slightly(predictor, config):
    """Without grouping, a batch is padded to the bucket of its largest image (as the eval
    pipeline does). A 64x85 image padded to 96x96 instead of 64x96: the border convolutions
    see the padding. Measured with this random-weight model: boxes move by 0.009 px (the
    image is 80 px wide), scores by 1.2e-4; bounded here by 0.5 px and 5e-3, and required
    to be non-zero (the padding does reach the output, so the exactness of the grouped
    test above is not vacuous)."""
    image, tall = _image(60, 80), _image(150, 90, 3)  # resized: 64x85 and 96x58
    assert _bucket(config, 60, 80) == (64, 96) and _bucket(config, 150, 90) == (96, 64)
    alone = predictor.predict_queries([image])[0]
    predictor.group_by_bucket = False
    try:
        padded = predictor.predict_queries([tall, image])[1]  # batch bucket: 96x96
    finally:
        predictor.group_by_bucket = True
    boxes_diff, scores_diff = _max_diff(alone, padded)
    print(f"padding 64x96 -> 96x96: boxes {boxes_diff:.3g} px, scores {scores_diff:.3g}")
    assert 0 < boxes_diff < 0.5 and scores_diff < 5e-3


def test_compilations_are_bounded_by_the_bucket_count(predictor, config):
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(30, 400, 2)) for _ in range(20)]
    before = set(predictor.compiled_shapes)
    predictor.predict([_image(h, w, i) for i, (h, w) in enumerate(sizes)], score_threshold=0.0)
    expected = {_bucket(config, h, w) for h, w in sizes}
    assert set(predictor.compiled_shapes) == before | expected
    assert predictor.num_compilations == len(before | expected) <= len(buckets_for(config.data))
    assert len(expected) < len(set(sizes))
    # New sizes in buckets already compiled: nothing new is compiled.
    count = predictor.num_compilations
    predictor.predict([_image(h + 1, w + 2) for h, w in sizes[:6]])
    assert predictor.num_compilations == count


def test_predict_output_format_and_filters(predictor):
    image = _image(70, 90)
    everything = predictor.predict([image], score_threshold=0.0, top_k=None)[0]
    assert len(everything) == 5  # every query
    assert np.all(np.diff(everything.scores) <= 0)
    assert everything.boxes.dtype == np.float32 and everything.boxes.shape == (5, 4)
    assert np.all(everything.boxes >= 0) and np.all(everything.boxes[:, [0, 2]] <= 90)
    assert np.all(everything.boxes[:, [1, 3]] <= 70) and everything.image_size == (70, 90)
    assert set(everything.names) <= {"rectangle", "ellipse", "triangle", "class 0"}
    top2 = predictor.predict([image], score_threshold=0.0, top_k=2)[0]
    np.testing.assert_array_equal(top2.queries, everything.queries[:2])
    middle = float(np.median(everything.scores))
    assert np.all(predictor.predict([image], score_threshold=middle)[0].scores >= middle)


def test_files_pil_images_and_arrays_give_the_same_detections(predictor, tmp_path):
    image = _image(64, 80)
    Image.fromarray(image).save(tmp_path / "a.png")
    from_array, from_pil, from_file = predictor.predict(
        [image, Image.fromarray(image), str(tmp_path / "a.png")], score_threshold=0.0)
    np.testing.assert_array_equal(from_array.boxes, from_pil.boxes)
    np.testing.assert_array_equal(from_array.boxes, from_file.boxes)


def test_bfloat16_inference_is_close_to_float32(predictor, config, variables):
    """bfloat16 compute (8-bit mantissa, relative error ~4e-3 per op) through a 2-layer
    decoder: measured boxes within 0.2-0.4 px of float32 on 60-90 px images and scores
    within 0.01, so 2 px and 0.05 bounds; parameters and outputs stay float32."""
    images = [_image(60, 80), _image(66, 90, 1)]  # one bucket: one bfloat16 compilation
    assert predictor.dtype == "float32"
    f32 = predictor.predict_queries(images)
    bf16_predictor = inference.Predictor(config, variables, dtype="bfloat16")
    bf16 = bf16_predictor.predict_queries(images)
    assert bf16_predictor.dtype == "bfloat16" and bf16[0]["boxes"].dtype == np.float32
    assert jax.tree.leaves(bf16_predictor._variables)[0].dtype == np.float32
    for a, b in zip(f32, bf16):
        boxes_diff, scores_diff = _max_diff(a, b)
        print(f"bfloat16 vs float32: boxes {boxes_diff:.3g} px, scores {scores_diff:.3g}")
        assert 0 < boxes_diff < 2.0 and scores_diff < 0.05


# ---------------------------------------------------------------------------------------
# Images


def test_load_image_accepts_common_array_layouts():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(inference.load_image(gray), np.stack([gray] * 3, -1))
    rgba = np.zeros((3, 4, 4), np.uint8)
    assert inference.load_image(rgba).shape == (3, 4, 3)
    with pytest.raises(TypeError, match="uint8"):
        inference.load_image(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        inference.load_image(np.zeros((3, 4, 5), np.uint8))


def test_load_image_applies_exif_orientation(tmp_path):
    image = _image(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(image).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert inference.load_image(tmp_path / "rotated.jpg").shape == (40, 20, 3)
    assert inference.load_image(tmp_path / "rotated.jpg", exif_transpose=False).shape == (20, 40, 3)


def test_load_image_names_an_unreadable_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        inference.load_image(tmp_path / "bad.jpg")


# ---------------------------------------------------------------------------------------
# Checkpoints and `detr-jax predict`


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, config, variables):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_variables(variables, path, {"contents": "detr", "model": config.model.to_dict()})
    return path


def test_checkpoint_without_config_takes_the_model_from_its_metadata(checkpoint, config):
    loaded, loaded_config = restore.load_checkpoint(checkpoint)
    assert loaded_config.model.to_dict() == config.model.to_dict()
    assert loaded_config.data.eval_scale == 800  # the defaults: COCO-size evaluation
    assert jax.tree.structure(loaded) == jax.tree.structure(jax.tree.map(np.asarray, dict(loaded)))


def test_checkpoint_that_does_not_fit_the_config_is_rejected(checkpoint, config, variables, tmp_path):
    other = tiny_config()
    other.model.num_heads = 2  # same tensor shapes, different model: must be caught
    with pytest.raises(CheckpointError, match="model.num_heads"):
        restore.load_checkpoint(checkpoint, other)
    partial = {"params": dict(variables["params"]), "frozen_bn": variables["frozen_bn"]}
    del partial["params"]["query_embed"]
    with pytest.raises(CheckpointError, match="missing.*\n.*query_embed"):
        restore.check_variables_fit(build_model(config.model), partial)
    backbone = tmp_path / "backbone"
    save_variables({"frozen_bn": variables["frozen_bn"]}, backbone, {"contents": "backbone"})
    with pytest.raises(CheckpointError, match="only a backbone"):
        restore.load_checkpoint(backbone, config)


def test_predict_folder_with_a_corrupt_image(checkpoint, config, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(64, 80), (70, 90), (66, 96)]):
        Image.fromarray(_image(h, w, i)).save(images / f"img{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"

    status = predict_main(checkpoint, [images], out, config=config, score_threshold=0.0, top_k=3)

    assert status == 0
    summary = json.loads((out / "detections.json").read_text())
    assert [os.path.basename(r["file"]) for r in summary["images"]] == ["img0.png", "img1.png", "img2.png"]
    assert [os.path.basename(f["file"]) for f in summary["failed"]] == ["broken.jpg"]
    assert "cannot decode" in summary["failed"][0]["error"]
    for i, size in enumerate([(64, 80), (70, 90), (66, 96)]):
        record = json.loads((out / f"img{i}.json").read_text())
        assert (record["height"], record["width"]) == size and len(record["detections"]) == 3
        assert set(record["detections"][0]) == {"label", "name", "score", "box_xyxy"}
        assert Image.open(out / f"img{i}.png").size == size[::-1]
    assert not (out / "broken.json").exists()
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 image(s) failed" in err


def test_predict_fails_when_every_image_fails(checkpoint, config, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"garbage")
    status = predict_main(checkpoint, [tmp_path / "a.jpg", tmp_path / "missing.png"],
                          tmp_path / "out", config=config)
    assert status == 1
    err = capsys.readouterr().err
    assert "a.jpg" in err and "missing.png: no such file or directory" in err
    assert len(json.loads((tmp_path / "out" / "detections.json").read_text())["failed"]) == 2
