"""Panoptic evaluation and the two-stage mask-head recipe, end to end on tiny synthetic data."""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import traverse_util
from PIL import Image

from detr_jax.evaluation import segmentation_eval
from detr_jax.checkpoints.checkpointer import load_train_checkpoint
from detr_jax.cli.predict import predict_main
from detr_jax.data import make_source, to_coco_dict
from detr_jax.evaluation.evaluator import make_eval_fn
from detr_jax.serving.predictor import category_isthing_for
from detr_jax.models import build_model
from detr_jax.data.panoptic_png import rgb_to_id
from detr_jax.evaluation.segmentation_eval import (
    SEGMENTATION_METRIC_NAMES,
    SegmentationResults,
    panoptic_id_map,
    segmentation_metrics,
)
from detr_jax.train.trainer import initial_variables, train

# A mask head needs hidden_dim + heads divisible by 8 (its first GroupNorm).
PANOPTIC = {
    "model.num_heads": 8, "model.masks": True, "model.num_classes": 6, "data.masks": True,
    "data.synthetic_stuff": True, "data.max_boxes": 6, "loss.losses": ("labels", "boxes", "cardinality", "masks"),
}


def oracle_outputs(record, num_queries, num_classes, grid):
    """What a perfect model would output for one 64x64 image: the true class of every object
    with certainty, and mask logits that are the objects' 4x4-block coverage on the
    stride-4 grid, scaled to +-8 (so the bilinear upsampling blurs only the boundaries)."""
    n = len(record.labels)
    logits = np.full((num_queries, num_classes + 1), -10.0, np.float32)
    logits[np.arange(num_queries), num_classes] = 10.0  # no object
    logits[np.arange(n), num_classes] = -10.0
    logits[np.arange(n), record.labels] = 10.0
    masks = np.full((num_queries, grid, grid), -8.0, np.float32)
    coverage = record.masks.reshape(n, grid, 4, grid, 4).mean(axis=(2, 4))
    masks[:n] = (coverage - 0.5) * 16
    return logits, masks


def test_perfect_masks_score_full_panoptic_recognition():
    config = tiny_config(**PANOPTIC)
    source = make_source(config.data, "eval")
    assert source.num_classes == 6 and source.category_isthing[4] is False
    results = SegmentationResults(source.category_isthing)
    for i in range(len(source)):
        record = source.annotations(i)
        logits, masks = oracle_outputs(record, 6, 6, 16)
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        outputs = {"pred_logits": logits[None], "pred_masks": masks[None], "scores": probs[:, :-1].max(-1)[None],
                   "labels": probs[:, :-1].argmax(-1)[None]}
        results.add_batch(outputs, [record.image_id], [True], [(64, 64)], [record.orig_size])
    ground_truth = to_coco_dict(source)
    image_ids = [source.annotations(i).image_id for i in range(len(source))]
    metrics, summary = segmentation_metrics(ground_truth, results.panoptic, results.instances, image_ids)
    print(summary)
    assert set(metrics) == set(SEGMENTATION_METRIC_NAMES) and "panoptic quality" in summary
    # Every segment found (RQ 1, things and stuff); the 4x4 blocks cost a little IoU at edges.
    assert metrics["RQ"] == metrics["RQ_th"] == metrics["RQ_st"] == 1.0
    assert 0.8 < metrics["SQ"] < 1.0 and metrics["PQ"] == pytest.approx(metrics["SQ"])
    assert metrics["mask_AP50"] == 1.0
    # The drawn segments come back from the RLE results: the first image's map is the truth's.
    record = source.annotations(0)
    id_map, info = panoptic_id_map(results.panoptic, record.image_id, record.orig_size)
    truth = np.zeros(record.orig_size, np.int32)
    for k, mask in enumerate(record.masks, start=1):
        truth[mask] = k
    agreement = np.mean([(id_map == j) == (truth == k) for j, k in zip(range(1, len(info) + 1), range(1, 7))])
    assert agreement > 0.9 and sorted(s["category_id"] for s in info) == sorted(record.labels.tolist())


def test_two_stage_recipe_freezes_the_detector_and_trains_the_mask_head(tmp_path):
    """Stage 1 detects things and stuff; stage 2 starts from that run, with the mask head
    only (configs/synthetic_panoptic_tiny.py's param rules), and its evaluation adds PQ and
    mask AP to box AP and draws segments; best/ keeps the best PQ."""
    detection = {k: v for k, v in PANOPTIC.items() if k not in ("model.masks", "data.masks", "loss.losses")}
    train(tiny_config(**detection, **{"train.num_steps": 2, "train.eval_every_epochs": 0}), tmp_path / "detection")
    stage2 = tiny_config(**PANOPTIC, **{
        "train.num_steps": 2, "train.init_from": str(tmp_path / "detection"),
        "train.param_rules": (("(bbox_attention|mask_head)/.*", 1.0), (".*", None)),
        "eval.batch_size": 3, "eval.num_visualized": 2,  # 8 eval images: the last batch has fillers
    })
    metrics = train(stage2, tmp_path / "masks", eval_fn=make_eval_fn(stage2, tmp_path / "masks"))
    assert metrics["loss_mask"] > 0 and metrics["loss_dice"] > 0
    assert {f"eval_{k}" for k in (*SEGMENTATION_METRIC_NAMES, "AP")} <= set(metrics)
    assert all(-1.0 <= metrics[f"eval_{k}"] <= 1.0 for k in SEGMENTATION_METRIC_NAMES)
    assert (tmp_path / "masks" / "eval_samples" / "step_2.png").is_file()
    before = traverse_util.flatten_dict(load_train_checkpoint(tmp_path / "detection")[0]["params"])
    after = traverse_util.flatten_dict(load_train_checkpoint(tmp_path / "masks")[0]["params"])
    heads = {p for p in after if p[0] in ("bbox_attention", "mask_head")}
    assert heads and set(after) == set(before) | heads
    for path, value in before.items():  # the detector is frozen
        np.testing.assert_array_equal(after[path], value, err_msg="/".join(path))
    init_rng = jax.random.split(jax.random.PRNGKey(stage2.seed))[0]  # as create_train_state
    start = traverse_util.flatten_dict(initial_variables(stage2, build_model(stage2.model), init_rng)["params"])
    assert all(np.array_equal(start[p], v) for p, v in before.items())  # step 0: the detection run's detector
    assert any(not np.array_equal(after[p], start[p]) for p in heads)  # the mask head trained
    assert (tmp_path / "masks" / "best").is_dir()

    # `detr-jax predict` of the mask model: a COCO panoptic PNG + JSON per image, segments drawn.
    source = make_source(stage2.data, "eval")
    Image.fromarray(source[0].image).save(tmp_path / "a.png")
    assert predict_main(tmp_path / "masks", [tmp_path / "a.png"], tmp_path / "out", score_threshold=0.0,
                        progress=False) == 0
    record = json.loads((tmp_path / "out" / "a.json").read_text())
    ids = rgb_to_id(np.asarray(Image.open(tmp_path / "out" / record["panoptic_png"])))
    assert ids.shape == source[0].image.shape[:2]
    assert set(np.unique(ids)) - {0} == {s["id"] for s in record["segments_info"]}
    panoptic = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    assert panoptic["annotations"][0]["segments_info"] == record["segments_info"]
    assert {c["id"]: c["isthing"] for c in panoptic["categories"]} == {1: 1, 2: 1, 3: 1, 4: 0, 5: 0}
    assert (tmp_path / "out" / "a.png").is_file()


def test_things_and_stuff_of_a_config():
    """Panoptic post-processing merges stuff: which classes are stuff comes from the data,
    or for official DETR's 250-class COCO panoptic models from its rule (ids <= 90 things)."""
    assert category_isthing_for(tiny_config(**PANOPTIC)) == {1: True, 2: True, 3: True, 4: False, 5: False}
    coco = category_isthing_for(tiny_config(**{"model.num_classes": 250, "data.dataset": "tfds"}))
    assert coco[1] and coco[90] and not coco[92] and not coco[200] and len(coco) == 250
    assert all(category_isthing_for(tiny_config()).values())  # detection data: all things


def test_results_are_gathered_from_every_process_in_order(monkeypatch):
    """The JSON lists of several processes come back whole and in process order (a fake
    allgather plays process 0 beside a process 1 whose list is longer)."""
    mine = [{"image_id": 1, "category_id": 4, "segmentation": {"size": [2, 2], "counts": "04"}}]
    theirs = [{"image_id": 7, "category_id": 1}, {"image_id": 8, "category_id": 2, "note": "ü" * 40}]
    their_bytes = np.frombuffer(json.dumps(theirs).encode(), np.uint8)

    def allgather(x):
        x = np.asarray(x)
        if x.dtype == np.int32:  # the lengths
            return np.stack([x, np.array([len(their_bytes)], np.int32)])
        other = np.zeros_like(x)
        other[: len(their_bytes)] = their_bytes
        return np.stack([x, other])

    monkeypatch.setattr(segmentation_eval.jax, "process_count", lambda: 2)
    monkeypatch.setattr(segmentation_eval.multihost_utils, "process_allgather", allgather)
    assert segmentation_eval._gather_json(mine) == mine + theirs


def test_a_segment_of_a_class_the_data_lacks_is_left_out():
    results = SegmentationResults({1: True, 2: False})
    logits = np.full((2, 4), -10.0, np.float32)
    logits[0, 1] = logits[1, 0] = 10.0  # query 0: class 1; query 1: class 0, not a category of the data
    masks = np.full((2, 4, 4), -8.0, np.float32)
    masks[0, :, :2] = masks[1, :, 2:] = 8.0
    outputs = {"pred_logits": logits[None], "pred_masks": masks[None], "scores": np.ones((1, 2), np.float32),
               "labels": np.array([[1, 0]])}
    results.add_batch(outputs, [3], [True], [(16, 16)], [(16, 16)])
    assert [r["category_id"] for r in results.panoptic] == [1]
    id_map, _ = panoptic_id_map(results.panoptic, 3, (16, 16))
    assert (id_map[:, :8] == 1).all() and (id_map[:, 8:] == 0).all()  # the unknown class's pixels: void
