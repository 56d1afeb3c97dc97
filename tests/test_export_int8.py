"""`detr-jax export --quantize int8`: the int8 ONNX export loads, runs, and costs at most
AP_DROP of the float32 model's AP on the built-in data.

The model is the tests' tiny DETR trained in the test until it has learned the built-in
data's 8 evaluation images (250 steps on them as one batch; AP ~0.88 measured), so that
its AP is far from 0 and a drop shows. The float32 reference is the jit Predictor (each
float32 export equals it within 1e-4: tests/test_export.py).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config

from detr_jax.checkpoints.checkpointer import save_variables
from detr_jax.cli.main import main
from detr_jax.data import make_source
from detr_jax.data.coco_export import to_coco_dict
from detr_jax.data.pipeline import make_eval_iterator
from detr_jax.evaluation.coco_metrics import coco_evaluate, to_coco_results
from detr_jax.runtime.sharding import global_batch, make_mesh
from detr_jax.serving.export import METADATA_FILE, ExportError, export_detector
from detr_jax.serving.predictor import Predictor
from detr_jax.serving.quantize import calibration_feeds
from detr_jax.train.optim import OFFICIAL_PARAM_RULES
from detr_jax.train.trainer import assemble

# The largest AP (and AP50) the int8 export may lose against the float32 model, absolute
# (measured: 0.877 -> 0.874 AP, AP50 0.979 both).
AP_DROP = 0.05
STEPS = 250
SIZE = (64, 64)  # the tests' one bucket


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, variables, eval images, their ids, the ground truth) of the tiny DETR
    trained on the eval images."""
    config = tiny_config(**{"model.dropout": 0.0, "train.lr": 1e-3, "train.param_rules": OFFICIAL_PARAM_RULES[:1]})
    mesh = make_mesh()
    source = make_source(config.data, "eval")
    batch = next(make_eval_iterator(config.data, len(source), 0, 1))
    run = assemble(config, mesh, 1000)
    state = run.initial_state(config)
    batch = global_batch({k: batch[k] for k in ("image", "mask", "labels", "boxes", "valid")}, mesh)
    for _ in range(STEPS):
        state, _ = run.step(state, batch)
    variables = jax.tree.map(np.asarray, state.variables)
    images = [source[i].image for i in range(len(source))]
    ids = np.array([source.annotations(i).image_id for i in range(len(source))])
    return config, variables, images, ids, to_coco_dict(source)


def box_ap(predictor: Predictor, images, ids, ground_truth) -> dict:
    queries = predictor.predict_queries(images)
    results = to_coco_results(ids, np.stack([q["scores"] for q in queries]), np.stack([q["labels"] for q in queries]),
                              np.stack([q["boxes"] for q in queries]))
    return coco_evaluate(ground_truth, results, image_ids=ids).metrics


def test_int8_export_runs_and_keeps_the_ap(trained, tmp_path, capsys):
    config, variables, images, ids, ground_truth = trained
    float32 = box_ap(Predictor(config, variables, batch_size=4), images, ids, ground_truth)
    assert float32["AP"] > 0.5, float32  # learned: a drop can show

    checkpoint = tmp_path / "tiny"
    save_variables(variables, checkpoint, {"contents": "detr", "model": config.model.to_dict()})
    out = tmp_path / "int8"
    # A params checkpoint has COCO's evaluation resize: the tests' one is given.
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--size", "64x64",
                 "--quantize", "int8", "--config.data.eval_scale=64", "--config.data.eval_max_size=64"]) == 0
    assert "exported onnx (float32, int8 convolutions)" in capsys.readouterr().out
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["quantization"]["type"] == "int8" and meta["quantization"]["quantized_ops"] == ["Conv"]
    assert meta["onnxruntime"]["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert not (out / "model.onnx.data").exists()  # one self-contained file

    int8 = box_ap(Predictor.from_export(out, batch_size=4), images, ids, ground_truth)
    for metric in ("AP", "AP50"):
        assert int8[metric] >= float32[metric] - AP_DROP, (metric, float32, int8)


def test_int8_is_refused_where_it_cannot_be_made(trained, tmp_path, capsys):
    config, variables, _, _, _ = trained
    with pytest.raises(ExportError, match="--quantize int8 is for the onnx format"):
        export_detector(config, variables, tmp_path / "a", "stablehlo", quantize="int8")
    with pytest.raises(ExportError, match="quantize 'int4': expected one of int8"):
        export_detector(config, variables, tmp_path / "b", "onnx", size=SIZE, quantize="int4")
    with pytest.raises(ValueError, match="calibration image 1 has dtype float32 and shape"):
        calibration_feeds(config, SIZE, None, [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)])
    assert main(["export", "--checkpoint", "unused", "--format", "onnx", "--out", str(tmp_path / "c"),
                 "--calibration_images", str(tmp_path)]) == 1
    assert "--calibration_images calibrate --quantize int8" in capsys.readouterr().err
    assert main(["export", "--checkpoint", "unused", "--format", "onnx", "--out", str(tmp_path / "d"),
                 "--quantize", "int8", "--calibration_images", str(tmp_path / "missing.png")]) == 1
    assert "missing.png: no such file or directory" in capsys.readouterr().err


def test_calibration_images_are_resized_and_padded_as_the_predictor_pads():
    config = tiny_config()
    big = np.full((300, 150, 3), 200, np.uint8)  # taller than the export after the eval resize
    (feed,) = calibration_feeds(config, SIZE, 2, [big])
    assert feed["image"].shape == (2, 64, 64, 3) and feed["mask"].shape == (2, 64, 64)
    rows = feed["mask"][0].any(1).sum()
    cols = feed["mask"][0].any(0).sum()
    assert rows == 64 and cols == 32  # shrunk to fit, aspect kept, padded right
    assert (feed["image"][0][~feed["mask"][0]] == 0).all()
    np.testing.assert_array_equal(feed["orig_size"], [[300, 150], [300, 150]])
