"""`detr-jax export` of Deformable DETR (plain, and box refinement with two-stage
proposals): each artifact, reloaded in its own runtime, gives the Predictor's detections
within test_export's tolerance (1e-4, float32), as DETR's do.

The deformable attention's bilinear sampling is a gather over the flat value map (in a
checkpointed scan over levels; unrolled over levels in the ONNX export); the two-stage proposals a top-k and a gather over the
encoder positions: ops that DETR's exports do not contain.

Every format is exported at a fixed image size: the level shapes are static Python ints in
the flat multi-scale layout (`neck.flatten_levels`' level offsets, the attention's per-level
sizes and offsets), so a symbolic height and width cannot be traced; asking for one is an
ExportError that says to pass a size.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REFINE_TWO_STAGE, tiny_deformable_config
from test_export import TOLERANCE, images, reload_raw
from test_inference import random_variables

from detr_jax.models import build_model
from detr_jax.serving.export import ExportError, export_detector
from detr_jax.serving.predictor import Predictor

VARIANTS = {"plain": {}, "refine_two_stage": REFINE_TWO_STAGE}
# test_export's resize: images land in the buckets 64x96 and 64x64.
RESIZE = {"data.eval_scale": 64, "data.eval_max_size": 96, "data.bucket_step": 32, "data.bucket_shapes": ()}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request):
    config = tiny_deformable_config(VARIANTS[request.param], **RESIZE)
    return config, random_variables(build_model(config.model), seed=3)


# The bucket 64x96, which every test image fits.
SIZE = (64, 96)


# StableHLO with a symbolic batch; SavedModel and ONNX at a fixed one: TF 2.21's
# XlaCallModule cannot refine the shapes of lax.top_k's decomposition (stablehlo.dynamic_iota)
# under a symbolic batch, and the ONNX export is at a fixed size (as DETR's). The ONNX export
# unrolls the attention's levels (`ms_deform_attn_sample` formulated for onnxruntime).
@pytest.mark.parametrize("fmt,batch", [("stablehlo", "dynamic"), ("savedmodel", 3), ("onnx", 3)])
def test_each_artifact_in_its_own_runtime_gives_the_predictors_detections(fmt, batch, model, tmp_path):
    config, variables = model
    out = export_detector(config, variables, tmp_path / fmt, fmt, batch=batch, size=SIZE)
    run = reload_raw(fmt, out)
    arrays = images()
    # Every image padded to the export's size, as a server with one fixed shape does.
    config = config.copy_and_resolve_references()
    config.data.bucket_shapes = (SIZE,)
    worst = {"scores": 0.0, "boxes": 0.0}
    for batch_size in (1, 3) if batch == "dynamic" else (batch,):  # a symbolic batch serves both
        predictor = Predictor(config, variables, batch_size=batch_size)
        expected = predictor.predict_queries(arrays)
        for indices, batch in predictor.batches(arrays):
            scores, labels, boxes = run(batch["image"], batch["mask"], batch["orig_size"])
            assert scores.shape[0] == batch_size
            for row, i in enumerate(indices):
                np.testing.assert_allclose(scores[row], expected[i]["scores"], atol=TOLERANCE, rtol=0)
                np.testing.assert_array_equal(labels[row], expected[i]["labels"])
                np.testing.assert_allclose(boxes[row], expected[i]["boxes"], atol=TOLERANCE, rtol=0)
                for name, got in (("scores", scores[row]), ("boxes", boxes[row])):
                    worst[name] = max(worst[name], float(np.abs(got - expected[i][name]).max()))
    print(f"{fmt}: max |export - Predictor| scores {worst['scores']:.2e}, boxes {worst['boxes']:.2e}")


def test_a_dynamic_image_size_is_refused_with_the_way_out(model, tmp_path):
    config, variables = model
    with pytest.raises(ExportError, match=r"(?s)cannot be exported with a dynamic image size .*pass a fixed size"):
        export_detector(config, variables, tmp_path / "dynamic", "stablehlo")
    assert not (tmp_path / "dynamic").exists()  # nothing half-written
