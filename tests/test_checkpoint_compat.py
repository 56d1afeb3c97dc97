"""Checkpoints written before the composable-DETR restructuring still load and give the same
outputs: parameter paths are a contract (tests/fixtures/pre_composable/README.md)."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from detr_jax.checkpoints.checkpointer import CheckpointError
from detr_jax.serving.predictor import Predictor
from detr_jax.models import build_model
from detr_jax.checkpoints.restore import load_checkpoint

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "pre_composable"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE / "reference_outputs.npz"))


@pytest.mark.parametrize("checkpoint", ["train_run", "params"])
def test_old_checkpoint_gives_the_old_outputs(checkpoint, reference):
    variables, config = load_checkpoint(FIXTURE / checkpoint)
    model = build_model(config.model)
    outputs = jax.jit(model.apply)(variables, reference["image"], reference["mask"])
    # The reference was computed eagerly by the old code; eager today reproduces it bitwise,
    # jit fuses the float32 sums in another order: 1e-5 absolute on O(1) logits and boxes.
    for key in ("pred_logits", "pred_boxes"):
        np.testing.assert_allclose(np.asarray(outputs[key]), reference[key], atol=1e-5, err_msg=key)


def test_old_training_run_predicts(reference):
    predictor = Predictor.from_checkpoint(FIXTURE / "train_run", batch_size=1)
    image = np.zeros((64, 64, 3), np.uint8)
    detections = predictor.predict([image], score_threshold=0.0, top_k=2)
    assert len(detections) == 1 and len(detections[0]) == 2


def test_resuming_an_old_run_names_the_checkpoint(tmp_path):
    """An old run's optimizer state has the old group names: resuming it is refused with an
    error that names the checkpoint, never by silently starting from scratch."""
    from detr_jax.checkpoints.restore import checkpoint_config
    from detr_jax.train.trainer import train

    workdir = tmp_path / "run"
    shutil.copytree(FIXTURE / "train_run", workdir)
    config = checkpoint_config(workdir, {"train.num_steps": 3})
    with pytest.raises(CheckpointError, match="checkpoints"):
        train(config, workdir, show_progress=False)


def test_a_state_saved_before_batch_stats_and_ema_existed_restores(tmp_path):
    """A training checkpoint written before the train state had `batch_stats` and `ema` (a
    run of a model without trainable BatchNorm, no moving average) resumes: those fields come
    back empty, everything else bitwise."""
    from conftest import tiny_config

    from detr_jax.checkpoints.checkpointer import Checkpointer
    from detr_jax.runtime.sharding import make_mesh
    from detr_jax.train.trainer import assemble

    config = tiny_config()
    run = assemble(config, make_mesh(), 100)
    state = run.initial_state(config)
    old_fields = ("step", "params", "frozen_bn", "opt_state", "rng")  # the train state before the two fields
    writer = Checkpointer(tmp_path)
    writer.save(4, {name: getattr(state, name) for name in old_fields}, {"position": 4},
                {"step": 4, "epoch": 0, "config": config.to_dict()})
    writer.close()
    reader = Checkpointer(tmp_path)
    restored, data_state, meta = reader.restore_latest(run.abstract_state)
    reader.close()
    assert restored.batch_stats == {} and restored.ema == {} and meta["step"] == 4 and data_state == {"position": 4}
    for name in old_fields:
        jax.tree.map(np.testing.assert_array_equal, getattr(restored, name), getattr(state, name))
