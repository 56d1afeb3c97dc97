"""Post-processing and COCO evaluation: hand-computed values, AP of known predictions,
agreement with a direct pycocotools run, and data-parallel evaluation (8 devices, 2 hosts).

Run as a script (`python tests/test_evaluate.py MODE ...`) this file is the worker of the
multi-device tests: XLA_FLAGS / jax.distributed must be set up before jax computes anything,
so those runs happen in subprocesses with a timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detr_jax.evaluation import coco_metrics
from detr_jax.evaluation import evaluator as evaluate
from detr_jax.config import ConfigError, load_config
from detr_jax.data import SyntheticShapesSource, to_coco_dict
from detr_jax.data.transforms import to_normalized_cxcywh
from detr_jax.cli.eval import eval_main
from detr_jax.evaluation.coco_metrics import METRIC_NAMES
from detr_jax.evaluation.evaluator import Evaluator
from detr_jax.evaluation.postprocess import postprocess, select_detections
from detr_jax.runtime.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TIMEOUT_S = 300

# ---------------------------------------------------------------------------------------
# Shared helpers (also used by the worker processes)


def tiny_config(num_eval: int = 20, batch_size: int = 8):
    """synthetic_tiny shrunk: a 1+1-layer width-32 model, 64-96 px eval images."""
    return load_config(
        os.path.join(REPO, "configs", "synthetic_tiny.py"),
        {
            "model.hidden_dim": 32, "model.num_heads": 4, "model.num_encoder_layers": 1,
            "model.num_decoder_layers": 1, "model.dim_feedforward": 64, "model.num_queries": 5,
            "data.synthetic_eval_examples": num_eval, "data.synthetic_image_size": (64, 96),
            "data.eval_scale": 64, "data.eval_max_size": 96, "data.num_threads": 1,
            "eval.batch_size": batch_size,
        },
    )


class IndexedSource:
    """An eval source whose image `i` carries `i` in the red channel of a 16x16 top-left
    block, so that `OracleModel` can tell which example it is looking at."""

    def __init__(self, source):
        self.source = source
        self.category_names = source.category_names

    @property
    def num_classes(self):
        return self.source.num_classes

    def __len__(self):
        return len(self.source)

    def annotations(self, index):
        return self.source.annotations(index)

    def __getitem__(self, index):
        assert index < 256
        record = self.source[index]
        record.image = record.image.copy()
        record.image[:16, :16] = (index, 0, 0)
        return record


class OracleModel:
    """Stands in for DETR in `Evaluator`: reads the example index painted by IndexedSource
    (pixel (2, 2), well inside the block after the eval resize) and returns that example's
    row of the prediction table in `variables` ({"logits" [N, Q, K+1], "boxes" [N, Q, 4]})."""

    def apply(self, variables, images, mask, train=False):
        del mask, train
        value = images[:, 2, 2, 0].astype(jnp.float32)  # the Evaluator hands the model uint8 pixels
        index = jnp.clip(jnp.round(value).astype(jnp.int32), 0, variables["boxes"].shape[0] - 1)
        return {"pred_logits": variables["logits"][index][None], "pred_boxes": variables["boxes"][index][None]}


def oracle_table(source, num_queries: int, num_classes: int, noise: float, seed: int = 0):
    """Predictions for every example: the ground truth (boxes jittered by `noise`, in
    normalized units, and random confidences when noise > 0) then "no object" queries
    (or, with noise, a few confident false positives)."""
    rng = np.random.default_rng(seed)
    n = len(source)
    logits = np.zeros((n, num_queries, num_classes + 1), np.float32)
    logits[:, :, -1] = 10.0
    boxes = np.full((n, num_queries, 4), 0.5, np.float32)
    for i in range(n):
        record = source.annotations(i)
        h, w = record.orig_size
        k = len(record.labels)
        boxes[i, :k] = to_normalized_cxcywh(record.boxes, h, w)
        logits[i, np.arange(k), -1] = 0.0
        logits[i, np.arange(k), record.labels] = 10.0 if noise == 0 else rng.uniform(1, 5, k)
        if noise:
            boxes[i, :k] += rng.normal(0, noise, (k, 4))
            fp = rng.random(num_queries - k) < 0.5  # some false positives
            logits[i, k:][fp, -1] = 0.0
            logits[i, k:][fp, rng.integers(1, num_classes, fp.sum())] = rng.uniform(0, 5, fp.sum())
            boxes[i, k:] = rng.uniform(0.2, 0.8, (num_queries - k, 4))
    return {"logits": logits, "boxes": np.clip(boxes, 0.01, 0.99)}


def _result_json(result):
    dets = result.detections
    return {
        "metrics": result.metrics,
        "per_class_ap": {str(k): v for k, v in result.per_class_ap.items()},
        "num_images": result.num_images,
        "image_id": None if dets is None else dets["image_id"].tolist(),
        "boxes": None if dets is None else dets["boxes"].tolist(),
        "scores": None if dets is None else dets["scores"].tolist(),
        "labels": None if dets is None else dets["labels"].tolist(),
    }


def run_oracle(config, mesh=None, noise=0.02, max_batches=None):
    source = IndexedSource(SyntheticShapesSource(
        config.data.synthetic_eval_examples, seed=0, split="validation",
        image_size=tuple(config.data.synthetic_image_size), num_objects=(1, 3)))
    table = oracle_table(source, config.model.num_queries, config.model.num_classes, noise)
    evaluator = Evaluator(OracleModel(), config, mesh=mesh, source=source)
    return evaluator(table, max_batches=max_batches)


def run_tiny_detr(config, meshes):
    """Evaluations of one random-weight tiny DETR on each mesh."""
    from detr_jax.models import build_model
    from test_inference import random_variables

    model = build_model(config.model)
    variables = random_variables(model)
    return [Evaluator(model, config, mesh=mesh)(variables) for mesh in meshes]


# ---------------------------------------------------------------------------------------
# Post-processing


def test_postprocess_matches_hand_computed_values():
    """Tolerance 1e-6: float32 softmax of small logits and exact box arithmetic."""
    # Query 0: probs (1, 2, 1) / 4 -> class 1 with 0.5. Query 1: probs (3, 1, 6) / 10 ->
    # "no object" is the largest but is dropped: class 0 with 0.3.
    logits = np.log(np.array([[[1.0, 2.0, 1.0], [3.0, 1.0, 6.0]], [[1.0, 1.0, 2.0], [1.0, 4.0, 5.0]]], np.float32))
    boxes = np.array(
        [[[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.2, 0.2]], [[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.5, 0.5]]],
        np.float32,
    )
    orig_size = np.array([[100, 200], [50, 40]], np.int32)  # (h, w)
    out = jax.jit(postprocess)(logits, boxes, orig_size)
    np.testing.assert_allclose(out["scores"], [[0.5, 0.3], [0.25, 0.4]], rtol=1e-6)
    np.testing.assert_array_equal(out["labels"], [[1, 0], [0, 1]])
    # (cx, cy, w, h) * (W, H) -> corners: image 0 is 200 wide, 100 high; image 1 40 x 50.
    expected = [[[80, 30, 120, 70], [0, 10, 40, 30]], [[0, 0, 40, 50], [0, 25, 20, 50]]]
    np.testing.assert_allclose(out["boxes"], expected, rtol=1e-6, atol=1e-5)
    assert out["labels"].dtype == jnp.int32 and out["boxes"].dtype == jnp.float32


def test_select_detections_thresholds_sorts_clips_and_names():
    scores = np.array([0.2, 0.9, 0.5, 0.7], np.float32)
    labels = np.array([1, 2, 3, 1], np.int32)
    boxes = np.array([[0, 0, 1, 1], [-5, 2, 30, 8], [1, 1, 2, 2], [3, 3, 4, 4]], np.float32)
    dets = select_detections(scores, labels, boxes, (10, 20), score_threshold=0.5, top_k=2,
                             class_names={1: "cat", 2: "dog"})
    np.testing.assert_array_equal(dets.queries, [1, 3])  # 0.9, 0.7 (0.5 is third: top_k)
    np.testing.assert_array_equal(dets.scores, scores[[1, 3]])
    np.testing.assert_array_equal(dets.boxes[0], [0, 2, 20, 8])  # clipped to w=20, h=10
    assert dets.names == ["dog", "cat"]
    everything = select_detections(scores, labels, boxes, (10, 20), class_names={1: "cat"})
    assert len(everything) == 4 and everything.names == ["class 2", "cat", "class 3", "cat"]
    assert json.loads(json.dumps(dets.to_json()))["detections"][0]["box_xyxy"] == [0.0, 2.0, 20.0, 8.0]


# ---------------------------------------------------------------------------------------
# COCO metrics of known predictions


@pytest.fixture(scope="module")
def ground_truth():
    source = SyntheticShapesSource(40, seed=3, split="validation", image_size=(64, 160), num_objects=(0, 4))
    return to_coco_dict(source)


def _predictions_from_gt(gt, num_queries=6, box_noise=0.0, seed=0):
    """[N] ids, [N, Q] scores and labels, [N, Q, 4] pixel xyxy: the ground truth first
    (score 0.9), low-score random boxes after it."""
    rng = np.random.default_rng(seed)
    ids = np.array([im["id"] for im in gt["images"]])
    scores = np.full((len(ids), num_queries), 0.01, np.float32)
    labels = rng.integers(1, 4, (len(ids), num_queries)).astype(np.int32)
    boxes = rng.uniform(0, 60, (len(ids), num_queries, 4)).astype(np.float32)
    boxes[..., 2:] += boxes[..., :2]
    row = {image_id: i for i, image_id in enumerate(ids)}
    filled = np.zeros(len(ids), int)
    for ann in gt["annotations"]:
        i = row[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        boxes[i, filled[i]] = np.array([x, y, x + w, y + h]) + rng.normal(0, box_noise, 4) * max(w, h)
        scores[i, filled[i]] = rng.uniform(0.3, 1.0) if box_noise else 0.9
        labels[i, filled[i]] = ann["category_id"]
        filled[i] += 1
    return ids, scores, labels, boxes


def test_perfect_predictions_give_ap_one(ground_truth):
    results = coco_metrics.to_coco_results(*_predictions_from_gt(ground_truth))
    metrics = coco_metrics.coco_evaluate(ground_truth, results).metrics
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name
    assert metrics["APs"] in (1.0, -1.0) and metrics["APm"] in (1.0, -1.0)


def test_shuffled_boxes_give_low_ap(ground_truth):
    ids, scores, labels, boxes = _predictions_from_gt(ground_truth)
    shuffled = np.roll(boxes, 1, axis=0)  # every image gets its neighbour's boxes
    metrics = coco_metrics.coco_evaluate(ground_truth, coco_metrics.to_coco_results(ids, scores, labels, shuffled)).metrics
    # Boxes land at random places: an accidental IoU >= 0.5 with a same-class object is rare.
    assert metrics["AP"] < 0.05 and metrics["AP50"] < 0.1


def test_partial_evaluation_counts_only_the_evaluated_images(ground_truth):
    ids, scores, labels, boxes = _predictions_from_gt(ground_truth)
    half = len(ids) // 2
    results = coco_metrics.to_coco_results(ids[:half], scores[:half], labels[:half], boxes[:half])
    assert coco_metrics.coco_evaluate(ground_truth, results, image_ids=ids[:half]).metrics["AP"] == pytest.approx(1.0)
    assert coco_metrics.coco_evaluate(ground_truth, results).metrics["AR100"] < 0.75  # the rest: missed


def test_metrics_equal_a_direct_pycocotools_run(ground_truth, tmp_path):
    """Ground truth and detections written as JSON files and evaluated by pycocotools
    directly: the 12 numbers, the printed table and each class's AP are identical (same
    algorithm on the same values; JSON keeps floats exactly)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = coco_metrics.to_coco_results(*_predictions_from_gt(ground_truth, box_noise=0.08, seed=1))
    ours = coco_metrics.coco_evaluate(ground_truth, results)
    assert 0.2 < ours.metrics["AP"] < 0.9  # a non-trivial case

    (tmp_path / "gt.json").write_text(json.dumps(ground_truth))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        direct = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        direct.evaluate()
        direct.accumulate()
        printed = io.StringIO()  # keep only summarize()'s table
        with contextlib.redirect_stdout(printed):
            direct.summarize()
    np.testing.assert_array_equal(ours.stats, direct.stats)
    assert coco_metrics.format_coco_summary(ours.stats) == printed.getvalue().rstrip("\n")
    assert list(ours.metrics) == list(METRIC_NAMES)

    for cat_id in sorted(ours.per_class_ap):  # a class alone: COCOeval restricted to it
        with contextlib.redirect_stdout(io.StringIO()):
            single = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
            single.params.catIds = [cat_id]
            single.evaluate()
            single.accumulate()
            single.summarize()
        assert ours.per_class_ap[cat_id] == pytest.approx(single.stats[0], abs=1e-12)


def test_empty_results_are_reported_as_undefined(ground_truth):
    metrics = coco_metrics.coco_evaluate(ground_truth, []).metrics
    assert set(metrics.values()) == {-1.0}


# ---------------------------------------------------------------------------------------
# Evaluator on one device


def test_evaluator_with_oracle_predictions_gives_ap_one():
    """The whole path (eval pipeline, sharded jit step, post-processing to original pixels,
    filler removal, COCO ground truth from the source) on perfect predictions."""
    config = tiny_config(num_eval=20, batch_size=8)  # 3 batches, the last with 4 fillers
    result = run_oracle(config, noise=0.0)
    assert result.num_images == 20
    assert result.metrics["AP"] == pytest.approx(1.0, abs=1e-12)
    assert result.detections["image_id"].tolist() == list(range(20))
    assert result.source_indices.tolist() == list(range(20))
    assert result.detections["boxes"].shape == (20, 5, 4)
    assert set(result.per_class_ap) == {1, 2, 3}


def test_evaluator_max_batches_evaluates_a_prefix():
    result = run_oracle(tiny_config(num_eval=20, batch_size=8), noise=0.0, max_batches=1)
    assert result.num_images == 8 and result.metrics["AP"] == pytest.approx(1.0)


def test_noisy_oracle_gives_intermediate_ap():
    result = run_oracle(tiny_config(), noise=0.02)
    assert 0.1 < result.metrics["AP"] < 0.9


def test_save_eval_samples_draws_a_grid(tmp_path):
    config = tiny_config(num_eval=6, batch_size=2)
    result = run_oracle(config, noise=0.0)
    source = SyntheticShapesSource(6, seed=0, split="validation", image_size=(64, 96), num_objects=(1, 3))
    path = evaluate.save_eval_samples(result, source, tmp_path, num=5)
    from PIL import Image

    grid = Image.open(path)
    assert grid.width > grid.height > 64  # two rows of at most four 64 px high images


def test_training_eval_fn_returns_metrics_and_saves_samples(tmp_path):
    config = tiny_config(num_eval=6, batch_size=2)
    source = IndexedSource(SyntheticShapesSource(6, seed=0, split="validation", image_size=(64, 96), num_objects=(1, 3)))
    table = oracle_table(source, config.model.num_queries, config.model.num_classes, noise=0.0)
    eval_fn = evaluate.make_eval_fn(config, tmp_path, model=OracleModel(), source=source)
    metrics = eval_fn(table, step=5)
    assert metrics["AP"] == pytest.approx(1.0)
    assert (tmp_path / "eval_samples" / "step_5.png").is_file()


def test_eval_main_prints_the_table_and_writes_metrics_and_samples(tmp_path, capsys):
    from detr_jax.checkpoints.checkpointer import save_variables
    from detr_jax.models import build_model
    from test_inference import random_variables

    config = tiny_config(num_eval=6, batch_size=4)
    config.data.synthetic_image_size = (64, 64)  # one bucket: one compilation
    variables = random_variables(build_model(config.model))
    save_variables(variables, tmp_path / "ckpt", {"contents": "detr", "model": config.model.to_dict()})

    metrics = eval_main(config, tmp_path / "ckpt", tmp_path / "out", num_visualized=3,
                        save_detections=True, progress=False)

    assert list(metrics) == list(METRIC_NAMES)
    printed = capsys.readouterr().out
    assert "on 6 images" in printed and coco_metrics.format_coco_summary(list(metrics.values())) in printed
    report = json.loads((tmp_path / "out" / "eval_metrics.json").read_text())
    assert report["metrics"] == metrics and report["num_images"] == 6
    assert [c["name"] for c in report["per_class_ap"]] == ["rectangle", "ellipse", "triangle"]
    detections = json.loads((tmp_path / "out" / "detections_coco.json").read_text())
    assert len(detections) == 6 * config.model.num_queries
    assert (tmp_path / "out" / "eval_samples.png").is_file()


# ---------------------------------------------------------------------------------------
# Data parallel: 8 devices in one process, 2 processes x 4 devices


def _run_worker(args, env_extra, timeout=WORKER_TIMEOUT_S):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result_of(proc, timeout=WORKER_TIMEOUT_S):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"evaluation worker did not finish within {timeout} s (deadlock?)")
    assert proc.returncode == 0, err[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out[-2000:] + err[-2000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.fixture(scope="module")
def eight_devices():
    return _result_of(_run_worker(["devices8"], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))


def test_eight_devices_give_the_same_metrics_as_one(eight_devices):
    """Oracle predictions with noise (AP ~0.5): the gathered detections are the same
    values in the same order, so the metrics are identical."""
    one, eight = eight_devices["oracle_1"], eight_devices["oracle_8"]
    assert eight_devices["num_devices"] == 8
    assert eight["image_id"] == one["image_id"] == list(range(20))
    assert eight["boxes"] == one["boxes"] and eight["scores"] == one["scores"]
    assert eight["metrics"] == one["metrics"] and eight["per_class_ap"] == one["per_class_ap"]
    assert 0.1 < one["metrics"]["AP"] < 0.9


def test_eight_devices_tiny_detr_matches_one_device(eight_devices):
    """A random-weight DETR: batch 8 on one device vs 1 image per device. Measured on CPU:
    boxes differ by up to 8e-6 px, scores by 1.5e-7 (XLA picks kernels per batch size, so
    float sums are ordered differently), hence 1e-3 px and 1e-5 tolerances; the metrics
    (~0 for random weights: the oracle test above covers non-trivial ones) are equal."""
    one, eight = eight_devices["detr_1"], eight_devices["detr_8"]
    assert eight["image_id"] == one["image_id"]
    np.testing.assert_allclose(eight["boxes"], one["boxes"], atol=1e-3)
    np.testing.assert_allclose(eight["scores"], one["scores"], atol=1e-5)
    assert eight["metrics"] == pytest.approx(one["metrics"], abs=1e-9)


def test_a_batch_size_the_devices_do_not_divide_is_a_config_error(eight_devices):
    assert "eval.batch_size=4 (global) must be a multiple of the 8 devices" in eight_devices["batch_4_error"]


def test_two_processes_give_the_same_metrics_as_one():
    """jax.distributed on 127.0.0.1 (gloo), 2 processes x 4 devices: each host reads half
    of the data; detections are gathered on process 0 and the metrics broadcast."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        _run_worker(["process", f"127.0.0.1:{port}", str(i)],
                    {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
        for i in range(2)
    ]
    host0, host1 = (_result_of(p) for p in procs)
    single = _result_json(run_oracle(tiny_config()))
    assert host0["image_id"] == single["image_id"] == list(range(20))
    assert host0["boxes"] == single["boxes"] and host0["scores"] == single["scores"]
    assert host0["metrics"] == single["metrics"] == host1["metrics"]
    assert host0["per_class_ap"] == single["per_class_ap"] == host1["per_class_ap"]
    assert host1["image_id"] is None  # detections only on process 0


def _worker(argv):
    mode = argv[0]
    if mode == "devices8":
        config = tiny_config()
        one = make_mesh(jax.devices()[:1])
        result = {"num_devices": jax.device_count()}
        result["oracle_1"] = _result_json(run_oracle(config, mesh=one))
        result["oracle_8"] = _result_json(run_oracle(config))
        config.data.synthetic_image_size = (64, 64)  # one bucket: one compilation per mesh
        detr_1, detr_8 = run_tiny_detr(config, [one, make_mesh()])
        result["detr_1"], result["detr_8"] = _result_json(detr_1), _result_json(detr_8)
        config.eval.batch_size = 4
        try:
            Evaluator(OracleModel(), config)
        except ConfigError as e:
            result["batch_4_error"] = str(e)
    elif mode == "process":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=argv[1], num_processes=2, process_id=int(argv[2]))
        result = _result_json(run_oracle(tiny_config()))
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1:])
