"""`detr-jax export`: each artifact, reloaded in its own runtime without detr-jax, gives the
Predictor's detections; a bad request is a clear error.

Tolerance 1e-4 (float32): the exports run the same float32 program through another
compiler (XLA for StableHLO and TF's XlaCallModule; onnxruntime's kernels for ONNX),
measured to differ by at most ~1e-7 in scores and ~1e-5 in boxes of tens of pixels.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from conftest import tiny_config
from test_inference import random_variables

from detr_jax.checkpoints.checkpointer import save_variables
from detr_jax.cli.main import main
from detr_jax.serving.export import METADATA_FILE, ExportError, ExportedDetector, export_detector, serving_function
from detr_jax.serving.predictor import Predictor
from detr_jax.models import build_model
from detr_jax.models.resnet import PointwiseConv
from detr_jax.models.transformer import MultiHeadAttention

TOLERANCE = 1e-4
# Eval resize to 64 on the shorter side, at most 96 on the longer, buckets every 32 px:
# images of these sizes land in the buckets 64x96 and 64x64.
IMAGE_SIZES = ((48, 70), (100, 100), (64, 96))


@pytest.fixture(scope="module")
def config():
    return tiny_config(**{"model.dilation": False, "data.eval_scale": 64, "data.eval_max_size": 96,
                          "data.bucket_step": 32, "data.bucket_shapes": ()})


@pytest.fixture(scope="module")
def variables(config):
    return random_variables(build_model(config.model), seed=3)


def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]


def reload_raw(fmt: str, directory):
    """The artifact loaded by its own runtime, no detr-jax: fn(image, mask, orig_size) ->
    (scores, labels, boxes) numpy arrays."""
    meta = json.loads((directory / METADATA_FILE).read_text())
    artifact = directory / meta["artifact"]
    if fmt == "stablehlo":
        exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
        return lambda *xs: tuple(np.asarray(v) for v in exported.call(*xs))
    if fmt == "savedmodel":
        import tensorflow as tf

        serve = tf.saved_model.load(str(artifact)).signatures["serving_default"]
        return lambda image, mask, orig_size: tuple(
            serve(image=tf.constant(image), mask=tf.constant(mask), orig_size=tf.constant(orig_size))[k].numpy()
            for k in ("scores", "labels", "boxes"))
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    return lambda image, mask, orig_size: tuple(session.run(
        ["scores", "labels", "boxes"], {"image": image, "mask": mask, "orig_size": orig_size}))


# ONNX needs a fixed image size: the bucket 64x96, which every test image fits.
@pytest.mark.parametrize("fmt,size", [("stablehlo", None), ("savedmodel", None), ("onnx", (64, 96))])
def test_each_artifact_in_its_own_runtime_gives_the_predictors_detections(fmt, size, config, variables, tmp_path):
    out = export_detector(config, variables, tmp_path / fmt, fmt, batch="dynamic", size=size)
    run = reload_raw(fmt, out)
    arrays = images()
    if size:  # every image padded to the export's size, as a server with one fixed shape does
        config = config.copy_and_resolve_references()
        config.data.bucket_shapes = (size,)
    for batch_size in (1, 3):  # one symbolic batch dimension serves both
        predictor = Predictor(config, variables, batch_size=batch_size)
        expected = predictor.predict_queries(arrays)
        for indices, batch in predictor.batches(arrays):
            scores, labels, boxes = run(batch["image"], batch["mask"], batch["orig_size"])
            assert scores.shape == (batch_size, config.model.num_queries)
            for row, i in enumerate(indices):
                np.testing.assert_allclose(scores[row], expected[i]["scores"], atol=TOLERANCE, rtol=0)
                np.testing.assert_array_equal(labels[row], expected[i]["labels"])
                np.testing.assert_allclose(boxes[row], expected[i]["boxes"], atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def stablehlo_export(config, variables, tmp_path_factory):
    return ExportedDetector(export_detector(config, variables, tmp_path_factory.mktemp("e") / "x", "stablehlo"))


def test_a_dynamic_export_serves_several_image_sizes(stablehlo_export, config, variables):
    reference = jax.jit(serving_function(build_model(config.model), variables))
    rng = np.random.default_rng(1)
    for b, h, w in ((2, 64, 64), (1, 96, 64), (1, 128, 96)):
        image = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
        mask = np.ones((b, h, w), bool)
        mask[-1, h // 2 :] = False
        orig_size = np.full((b, 2), (h * 3, w * 3))  # int64: any integer dtype is accepted
        got = stablehlo_export(image, mask, orig_size)
        for name, want in zip(("scores", "labels", "boxes"), reference(image, mask, orig_size.astype(np.int32))):
            np.testing.assert_allclose(got[name], np.asarray(want), atol=TOLERANCE, rtol=0)


def test_bad_requests_name_the_input_and_the_problem(stablehlo_export):
    image, mask, size = np.zeros((2, 64, 64, 3), np.uint8), np.ones((2, 64, 64), bool), np.full((2, 2), 64)
    cases = [
        ((image[0], mask, size), "input image has shape (64, 64, 3), expected rank 4 [?, ?, ?, 3]"),
        ((image.astype(np.float32), mask, size), "input image has dtype float32, expected uint8 (RGB pixels"),
        ((image, mask.astype(np.float32), size), "input mask has dtype float32, expected bool"),
        ((image[..., :1], mask, size), "expected [?, ?, ?, 3]"),
        ((image, mask[:1], size), "inputs disagree on the batch size"),
        ((image, mask[:, :32], size), "inputs disagree on the image size"),
        ((image[:, :48], mask[:, :48], size), "image size 48x64 is not a multiple of 32"),
        ((image, mask, size.astype(np.float32)), "input orig_size has dtype float32, expected int32"),
    ]
    for args, message in cases:
        with pytest.raises(ExportError, match="x \\(stablehlo\\): ") as error:
            stablehlo_export(*args)
        assert message in str(error.value)


def test_a_fixed_size_export_rejects_other_sizes(config, variables, tmp_path):
    detector = ExportedDetector(export_detector(config, variables, tmp_path / "fixed", "onnx", batch=2, size="64x96"))
    assert detector.metadata["inputs"]["image"]["shape"] == [2, 64, 96, 3]
    with pytest.raises(ExportError, match=r"input image has shape \(2, 64, 64, 3\), expected \[2, 64, 96, 3\]"):
        detector(np.zeros((2, 64, 64, 3), np.uint8), np.ones((2, 64, 64), bool), np.full((2, 2), 64))
    with pytest.raises(ExportError, match=r"expected \[2, 64, 96, 3\]"):
        detector(np.zeros((3, 64, 96, 3), np.uint8), np.ones((3, 64, 96), bool), np.full((3, 2), 64))


def test_bfloat16_export_is_close_to_the_float32_model(stablehlo_export, config, variables, tmp_path):
    detector = ExportedDetector(export_detector(config, variables, tmp_path / "bf16", "stablehlo", dtype="bfloat16"))
    assert detector.metadata["dtype"] == "bfloat16"
    rng = np.random.default_rng(2)
    image, mask, size = rng.integers(0, 256, (2, 64, 96, 3), dtype=np.uint8), np.ones((2, 64, 96), bool), np.full((2, 2), 64)
    got, want = detector(image, mask, size), stablehlo_export(image, mask, size)
    assert got["scores"].dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: scores within a few hundredths of float32's.
    assert np.abs(got["scores"] - want["scores"]).max() < 0.05


def test_export_refuses_what_it_cannot_write(config, variables, tmp_path):
    with pytest.raises(ExportError, match="ONNX export needs a fixed image size"):
        export_detector(config, variables, tmp_path / "a", "onnx")
    with pytest.raises(ExportError, match="ONNX export is float32 only"):
        export_detector(config, variables, tmp_path / "b", "onnx", size=(64, 64), dtype="bfloat16")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not an empty directory"):
        export_detector(config, variables, tmp_path / "full", "stablehlo")
    with pytest.raises(ExportError, match="not a detr-jax export"):
        ExportedDetector(tmp_path / "full")
    damaged = export_detector(config, variables, tmp_path / "damaged", "stablehlo")
    artifact = damaged / "model.stablehlo"
    artifact.write_bytes(artifact.read_bytes()[:100])
    with pytest.raises(ExportError, match="model.stablehlo: unreadable as stablehlo"):
        ExportedDetector(damaged)


@pytest.fixture(scope="module")
def checkpoint(config, variables, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_variables(variables, path, {"contents": "detr", "model": config.model.to_dict()})
    return path


def test_export_command(checkpoint, tmp_path, capsys):
    out = tmp_path / "served"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "stablehlo", "--out", str(out),
                 "--batch", "4", "--size", "64x96"]) == 0
    assert "exported stablehlo (float32)" in capsys.readouterr().out
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["inputs"]["mask"] == {"shape": [4, 64, 96], "dtype": "bool"}
    assert meta["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["class_names"]["1"] == "rectangle"
    assert (out / "model.stablehlo").stat().st_size > 0

    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "o"),
                 "--size", "64by96"]) == 1
    assert "size '64by96': expected HxW" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "o")]) == 1
    assert "ONNX export needs a fixed image size" in capsys.readouterr().err


def _attention_by_einsum(params, query, key, num_heads, key_mask):
    """MultiHeadAttention as it was written before the export issue, with jnp.einsum."""
    def proj(name, x):
        return x @ params[name]["kernel"] + params[name]["bias"]

    b, lq, e = query.shape
    q = proj("q_proj", query).reshape(b, lq, num_heads, e // num_heads) * jnp.asarray((e // num_heads) ** -0.5)
    k = proj("k_proj", key).reshape(b, key.shape[1], num_heads, e // num_heads)
    v = proj("v_proj", key).reshape(b, key.shape[1], num_heads, e // num_heads)
    logits = jnp.where(key_mask[:, None, None, :], jnp.einsum("bqhd,bkhd->bhqk", q, k), jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, lq, e)
    return proj("out_proj", out)


def test_the_ops_written_for_onnx_are_the_einsums_bit_for_bit():
    """The 1x1 convolution is a matmul and the attention logits a dot_general, so that ONNX
    converters emit MatMul (onnxruntime's Einsum was half of DETR-R50's time there): the
    same XLA dot as the einsums they replace, so values AND gradients are bitwise equal."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 7, 16)), jnp.float32)
    conv = PointwiseConv(24)
    conv_params = conv.init(jax.random.key(0), x)
    kernel = conv_params["params"]["kernel"][0, 0]
    ours = jax.jit(jax.value_and_grad(lambda x, k: conv.apply({"params": {"kernel": k[None, None]}}, x).sum(), (0, 1)))
    einsum = jax.jit(jax.value_and_grad(lambda x, k: jnp.einsum("bhwc,co->bhwo", x, k).sum(), (0, 1)))
    for a, b in zip(jax.tree.leaves(ours(x, kernel)), jax.tree.leaves(einsum(x, kernel))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    query = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
    key = jnp.asarray(rng.normal(size=(2, 9, 32)), jnp.float32)
    key_mask = jnp.asarray(np.arange(9)[None, :] < np.array([[9], [5]]))
    attention = MultiHeadAttention(num_heads=4)
    params = attention.init(jax.random.key(1), query, key, key, key_mask)["params"]
    ours = jax.jit(jax.value_and_grad(lambda p, q: attention.apply({"params": p}, q, key, key, key_mask).sum(), (0, 1)))
    einsum = jax.jit(jax.value_and_grad(lambda p, q: _attention_by_einsum(p, q, key, 4, key_mask).sum(), (0, 1)))
    for a, b in zip(jax.tree.leaves(ours(params, query)), jax.tree.leaves(einsum(params, query))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_runs_an_exported_model(checkpoint, config, variables, tmp_path, capsys):
    """`detr-jax predict --checkpoint EXPORT` runs the export in its runtime with the
    Predictor's resize, padding and post-processing: the same detections."""
    arrays = images()
    # (A params checkpoint has the default, COCO-size evaluation resize: so does its export.)
    expected = Predictor.from_checkpoint(checkpoint).predict(arrays, score_threshold=0.0)
    exported = tmp_path / "hlo"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "stablehlo", "--out", str(exported)]) == 0
    for got, want in zip(Predictor.from_checkpoint(exported).predict(arrays, score_threshold=0.0), expected):
        np.testing.assert_array_equal(got.queries, want.queries)
        np.testing.assert_allclose(got.scores, want.scores, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=TOLERANCE, rtol=0)
        assert got.names == want.names

    # A fixed-size ONNX export pads every image to its size, as the compiled model does
    # with that one bucket.
    fixed = config.copy_and_resolve_references()
    fixed.data.bucket_shapes = ((64, 96),)
    expected = Predictor(fixed, variables).predict(arrays, score_threshold=0.0)
    onnx_dir = export_detector(config, variables, tmp_path / "onnx", "onnx", batch=2, size=(64, 96))
    predictor = Predictor.from_export(onnx_dir)
    assert predictor.batch_size == 2 and predictor.dtype == "float32"
    for got, want in zip(predictor.predict(arrays, score_threshold=0.0), expected):
        np.testing.assert_allclose(got.scores, want.scores, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=TOLERANCE, rtol=0)
    with pytest.raises(ExportError, match="exported for batches of 2, not 4"):
        Predictor.from_export(onnx_dir, batch_size=4)

    folder = tmp_path / "images"
    folder.mkdir()
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i}.png")
    assert main(["predict", "--checkpoint", str(onnx_dir), str(folder), "--out", str(tmp_path / "out"),
                 "--no_draw", "--no_progress"]) == 0
    assert len(json.loads((tmp_path / "out" / "detections.json").read_text())["images"]) == 3
    assert main(["predict", "--checkpoint", str(onnx_dir), str(folder), "--out", str(tmp_path / "out2"),
                 "--config.model.num_queries=7"]) == 1
    assert "an exported model has its config built in" in capsys.readouterr().err


def test_a_version_1_export_with_normalized_float_input_still_serves_pixels(stablehlo_export, config, variables,
                                                                              tmp_path):
    """Exports before format version 2 took normalized float32 images; ExportedDetector (and
    so `Predictor.from_export`) normalizes uint8 requests for them on the host."""
    old = tmp_path / "v1"
    old.mkdir()
    specs = (jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32), jax.ShapeDtypeStruct((2, 64, 96), jnp.bool_),
             jax.ShapeDtypeStruct((2, 2), jnp.int32))
    fn = jax.jit(serving_function(build_model(config.model), variables))
    (old / "model.stablehlo").write_bytes(jax.export.export(fn)(*specs).serialize())
    meta = dict(stablehlo_export.metadata, format_version=1, size=[64, 96], size_multiple=None)
    meta["inputs"] = {"image": {"shape": [2, 64, 96, 3], "dtype": "float32"},
                      "mask": {"shape": [2, 64, 96], "dtype": "bool"}, "orig_size": {"shape": [2, 2], "dtype": "int32"}}
    (old / METADATA_FILE).write_text(json.dumps(meta))
    pixels = np.random.default_rng(4).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    mask, size = np.ones((2, 64, 96), bool), np.full((2, 2), 64)
    got, want = ExportedDetector(old)(pixels, mask, size), stablehlo_export(pixels, mask, size)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=TOLERANCE, rtol=0)
