"""Faults a run meets at its start or in its middle: category ids beyond the class head,
more boxes than data.max_boxes, unreadable evaluation images, an evaluation that fails
after training steps, and model.num_classes="auto"."""

import json
import logging

import numpy as np
import pytest

from conftest import tiny_config
from detr_jax.data import DataError, SyntheticShapesSource, make_source, write_coco_folder
from detr_jax.data.checks import check_max_boxes
from detr_jax.evaluation.evaluator import make_eval_fn
from detr_jax.checkpoints.restore import load_checkpoint
from detr_jax.train.trainer import train


@pytest.fixture()
def coco_dir(tmp_path):
    """A COCO-format folder of 8 synthetic 64x64 images (category ids 1..3, up to 3 boxes)."""
    source = SyntheticShapesSource(8, seed=0, image_size=(64, 64), num_objects=(1, 3))
    write_coco_folder(source, tmp_path / "coco", split="train")
    return tmp_path / "coco"


def folder_config(coco_dir, **overrides):
    return tiny_config(**{"data.dataset": "coco_folder", "data.coco_dir": str(coco_dir),
                          "data.train_split": "train", "data.eval_split": "train", **overrides})


@pytest.mark.parametrize("num_classes", [3, 2])
def test_category_ids_beyond_the_head_are_an_error_at_start(coco_dir, tmp_path, num_classes):
    """Id 3 with num_classes=3 would be trained as "no object"; id 3 with 2 makes the loss NaN."""
    config = folder_config(coco_dir, **{"model.num_classes": num_classes})
    annotation_file = str(coco_dir / "annotations" / "instances_train.json")
    expected = rf"{annotation_file}: category ids go up to 3, but model.num_classes={num_classes}"
    with pytest.raises(DataError, match=expected) as error:
        train(config, tmp_path / "run", show_progress=False)
    assert "model.num_classes=4" in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written
    with pytest.raises(DataError, match=expected):
        make_eval_fn(config, tmp_path / "run")


def test_evaluation_images_are_checked_at_start_naming_every_bad_one(coco_dir, tmp_path):
    (coco_dir / "train" / "000000000002.png").write_bytes(b"not an image")
    (coco_dir / "train" / "000000000005.png").unlink()
    config = folder_config(coco_dir)
    with pytest.raises(DataError, match="2 of 8 images cannot be read") as error:
        make_eval_fn(config, tmp_path / "run")
    message = str(error.value)
    assert "000000000002.png: cannot decode image" in message
    assert "000000000005.png: file not found" in message


def test_more_boxes_than_max_boxes_is_a_warning_with_the_largest_count(coco_dir, caplog):
    source = make_source(folder_config(coco_dir).data, "train")
    largest = int(source.box_counts().max())
    assert largest == 3
    with caplog.at_level(logging.WARNING):
        assert check_max_boxes(source, 3) == 3
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        check_max_boxes(source, 1)
    (record,) = caplog.records
    assert "instances_train.json" in record.getMessage() and "data.max_boxes=1" in record.getMessage()
    assert "(up to 3)" in record.getMessage()


def test_auto_num_classes_and_a_checkpoint_before_a_failing_evaluation(coco_dir, tmp_path, caplog):
    """num_classes="auto" becomes 4 (ids 1..3) and is stored with the run; the step that is
    evaluated is checkpointed first, so an evaluation that fails loses no training."""
    config = folder_config(coco_dir, **{"model.num_classes": "auto", "train.num_steps": 2,
                                        "train.eval_every_epochs": 1, "train.checkpoint_every_steps": 100,
                                        "data.max_boxes": 2})

    def failing_eval(variables, step):
        raise RuntimeError(f"evaluation failed at step {step}")

    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="evaluation failed at step 2"):
        train(config, tmp_path / "run", eval_fn=failing_eval, show_progress=False)
    assert any("data.max_boxes=2" in r.getMessage() and "(up to 3)" in r.getMessage() for r in caplog.records)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["step"] == 2 and meta["config"]["model"]["num_classes"] == 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["num_classes"] == 4
    variables, restored = load_checkpoint(tmp_path / "run")
    assert restored.model.num_classes == 4
    assert np.shape(variables["params"]["class_embed"]["kernel"])[-1] == 5  # 4 classes + "no object"
    # A config that still says "auto" (eval --config finetune_...) takes the run's number.
    _, given = load_checkpoint(tmp_path / "run", folder_config(coco_dir, **{"model.num_classes": "auto"}))
    assert given.model.num_classes == 4
