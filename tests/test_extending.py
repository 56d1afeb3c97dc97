"""A variant is one module plus a switch: a new backbone, loss term, matcher and detector,
defined and registered in this file alone (no edit under detr_jax/), selected from a
config, trained for two steps, evaluated, used for prediction and exported.

This is the worked example of docs/EXTENDING.md.
"""

import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from conftest import REPO, tiny_config
from detr_jax.criterion.losses import LOSSES, LossTerm
from detr_jax.criterion.matcher import MATCHERS, Matching, matching_cost
from detr_jax.ops.image_statistics import normalize
from detr_jax.models import BACKBONES, DETECTORS, Detector
from detr_jax.models.resnet import BackboneOutput, downsample_mask

# 1. A backbone: any module (images [B, H, W, 3], mask [B, H, W], train) -> BackboneOutput.
class TwoConvBackbone(nn.Module):
    """Two strided 4x4 convolutions: a stride-16 feature map of `width` channels."""

    width: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, mask, train=False):
        x = nn.relu(nn.Conv(self.width // 2, (4, 4), strides=4, dtype=self.dtype, name="conv_0")(images))
        x = nn.relu(nn.Conv(self.width, (4, 4), strides=4, dtype=self.dtype, name="conv_1")(x))
        return BackboneOutput(x, downsample_mask(mask, x.shape[1], x.shape[2]), {"stride16": x})


BACKBONES["two_conv"] = lambda model_config, dtype: TwoConvBackbone(dtype=dtype)


# 2. A loss term: fn(outputs, targets, matching, num_boxes, ctx) -> {name: [L] or scalar},
# plus the weights it reads from the loss config (here a fixed weight).
def loss_l2_boxes(outputs, targets, matching, num_boxes, ctx):
    """Squared distance of matched (cxcywh) boxes, summed over pairs / num_boxes, per layer."""
    t2q = matching.target_to_query  # [L, B, M]
    pred = jnp.take_along_axis(outputs["pred_boxes"], jnp.maximum(t2q, 0)[..., None], axis=2)
    sq = jnp.where(t2q[..., None] >= 0, (pred - targets["boxes"][None]) ** 2, 0.0).sum((-1, -2, -3))
    if ctx.axis_name is not None:
        sq = jax.lax.psum(sq, ctx.axis_name)
    return {"loss_l2": sq / num_boxes}


LOSSES["l2_boxes"] = LossTerm(loss_l2_boxes, lambda loss_config: {"loss_l2": 3.0})


# 3. A matcher: (pred_logits [L, B, Q, C], pred_boxes, labels, boxes, valid) -> Matching,
# on one device's shard (the training assembly runs it per device under the mesh); built
# from the loss config and the detector's class convention (which reads the logits).
class GreedyMatcher:
    """Each target in slot order takes the cheapest query still free: on device, no callback."""

    def __init__(self, loss_config, classes):
        # Its own settings come from loss.matcher_args, as HungarianMatcher's do.
        self.weights = dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, **loss_config.matcher_args, classes=classes)

    def __call__(self, pred_logits, pred_boxes, labels, boxes, valid):
        cost = matching_cost(pred_logits, pred_boxes, labels, boxes, **self.weights)  # [L, B, Q, M]
        num_layers, batch, num_queries, num_targets = cost.shape
        valid = jnp.broadcast_to(valid, (num_layers, batch, num_targets))

        taken = jnp.zeros(cost.shape[:3], bool)  # [L, B, Q]
        columns = []
        for m in range(num_targets):  # static and small (data.max_boxes)
            q = jnp.argmin(jnp.where(taken, jnp.inf, cost[..., m]), axis=-1)  # [L, B]
            q = jnp.where(valid[..., m], q, -1)
            taken = taken | (jnp.arange(num_queries) == q[..., None])
            columns.append(q)
        t2q = jnp.stack(columns, axis=-1)
        return Matching(target_to_query=t2q.astype(jnp.int32), solved=jnp.ones((num_layers, batch), bool),
                        nonfinite=jnp.zeros((num_layers, batch), jnp.int32))


MATCHERS["greedy"] = GreedyMatcher


# 4. A detector: a module called as (images, mask, train, intermediates, targets) that
# returns pred_logits [L, B, Q, C] and pred_boxes [L, B, Q, 4] (and any other output
# branch), plus a DETECTORS entry naming its builder and its class convention.
class ToyDetector(nn.Module):
    """Learned queries reading the masked mean of a backbone's features, refined twice by one
    shared layer (two "decoder layers", both supervised), sigmoid classes. In training a
    denoising branch: one query per target slot made from its noised box, matched to it by
    construction."""

    num_logits: int
    num_queries: int = 5
    width: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, mask, train=False, intermediates=False, targets=None):
        images = normalize(images) if jnp.issubdtype(images.dtype, jnp.integer) else images
        features = TwoConvBackbone(self.width, self.dtype, name="backbone")(images, mask, train)
        weights = features.mask[..., None].astype(jnp.float32)
        pooled = (features.features * weights).sum((1, 2)) / jnp.maximum(weights.sum((1, 2)), 1.0)  # [B, E]
        refine = nn.Dense(self.width, name="refine")
        class_head, box_head = nn.Dense(self.num_logits, name="class_head"), nn.Dense(4, name="box_head")

        def decode(queries):  # [B, N, E] -> predictions of both layers, [2, B, N, ...]
            states = [nn.relu(refine(queries + pooled[:, None]))]
            states.append(nn.relu(refine(states[0] + pooled[:, None])))
            hs = jnp.stack(states)
            return {"pred_logits": class_head(hs), "pred_boxes": jax.nn.sigmoid(box_head(hs))}

        queries = self.param("queries", nn.initializers.normal(1.0), (self.num_queries, self.width))
        out = decode(jnp.broadcast_to(queries, (images.shape[0],) + queries.shape))
        if targets is not None:
            noise = jax.random.uniform(self.make_rng("queries"), targets["boxes"].shape, minval=-0.05, maxval=0.05)
            boxes = jnp.where(targets["valid"][..., None], targets["boxes"], 0.5) + noise
            out["dn"] = {**decode(nn.Dense(self.width, name="dn_embed")(boxes)),
                         "target_to_query": jnp.broadcast_to(jnp.arange(boxes.shape[1]), targets["valid"].shape)}
        return out


DETECTORS["toy"] = Detector(build=lambda model_config, dtype, num_logits: ToyDetector(num_logits, dtype=dtype),
                            class_convention="sigmoid_focal")


# the variants, by name, on the shared tiny config; evaluation after the last step
VARIANT = {
    "model.backbone": "two_conv", "loss.matcher": "greedy",
    "loss.losses": ("labels", "boxes", "l2_boxes", "cardinality"),
    "data.synthetic_train_examples": 16, "data.synthetic_eval_examples": 4,
    "train.num_steps": 2, "train.eval_every_epochs": 1, "eval.batch_size": 2, "eval.num_visualized": 2,
}


def run_variant(workdir: str) -> dict:
    """Trains, evaluates and predicts with the variants above (called in a 2-device process)."""
    from detr_jax.evaluation.evaluator import Evaluator, make_eval_fn
    from detr_jax.serving.predictor import Predictor
    from detr_jax.models import build_model
    from detr_jax.checkpoints.restore import load_checkpoint
    from detr_jax.train.trainer import train

    assert jax.device_count() == 2, jax.devices()
    config = tiny_config(**VARIANT)
    metrics = train(config, workdir, eval_fn=make_eval_fn(config, workdir), show_progress=False)

    variables, saved = load_checkpoint(workdir)
    evaluated = Evaluator(build_model(saved.model), saved)(variables).metrics
    predictor = Predictor.from_checkpoint(workdir, batch_size=2)
    images = [np.full((64, 48, 3), 200, np.uint8), np.zeros((40, 64, 3), np.uint8)]
    detections = predictor.predict(images, score_threshold=0.0, top_k=3)
    return {
        "train": {k: metrics[k] for k in ("loss", "loss_l2", "loss_l2_0", "loss_ce", "eval_AP50")},
        "eval_AP50": evaluated["AP50"],
        "backbone_params": sorted(variables["params"]["backbone"]),
        "detections": [len(d) for d in detections],
        "boxes_inside": all(bool((np.asarray(d.boxes) >= -1e-3).all()) for d in detections),
    }


def test_new_backbone_loss_and_matcher_from_config(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_extending; "
            f"print('RESULT', json.dumps(test_extending.run_variant({str(tmp_path / 'run')!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT", 1)[1])
    train = out["train"]
    # the new loss term is in the total, with its aux-layer suffix, and weighted 3.0
    assert np.isfinite(train["loss"]) and train["loss_l2"] > 0 and train["loss_l2_0"] > 0
    assert out["backbone_params"] == ["conv_0", "conv_1"]
    assert 0.0 <= train["eval_AP50"] <= 1.0 and 0.0 <= out["eval_AP50"] <= 1.0
    assert out["detections"] == [3, 3] and out["boxes_inside"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss_l2" in r] == [1, 2]


def test_greedy_matcher_and_l2_term_are_what_the_criterion_runs():
    """The registered matcher and term are the ones used: the loss equals a hand computation."""
    from detr_jax.criterion.losses import SetCriterion

    config = tiny_config(**VARIANT)
    criterion = SetCriterion.from_config(config.loss, config.model.num_classes)
    assert isinstance(criterion.matcher, GreedyMatcher) and criterion.weight_dict["loss_l2"] == 3.0
    # one layer, one image, two queries, one target closest to query 1
    logits = jnp.zeros((1, 1, 2, config.model.num_classes + 1))
    pred_boxes = jnp.asarray([[[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]]])
    targets = {"labels": jnp.asarray([[1]]), "boxes": jnp.asarray([[[0.5, 0.6, 0.2, 0.2]]]),
               "valid": jnp.asarray([[True]])}
    _, metrics = criterion({"pred_logits": logits, "pred_boxes": pred_boxes}, targets)
    np.testing.assert_allclose(metrics["loss_l2"], 0.1**2, rtol=1e-5)  # query 1 matched: (0.6 - 0.5)^2
    np.testing.assert_allclose(metrics["loss_bbox"], 0.1, rtol=1e-5)


def test_new_detector_trains_evaluates_predicts_and_exports(tmp_path):
    """The toy detector, selected by model.arch alone: its class convention (sigmoid focal)
    and its denoising branch reach the loss; evaluation, the Predictor and an export rank
    (query, class) pairs as its convention says."""
    from detr_jax.evaluation.evaluator import make_eval_fn
    from detr_jax.serving.export import ExportedDetector, export_detector
    from detr_jax.serving.predictor import Predictor
    from detr_jax.models import build_class_convention, build_model
    from detr_jax.evaluation.postprocess import make_predict_fn
    from detr_jax.checkpoints.restore import load_checkpoint
    from detr_jax.runtime.sharding import make_mesh
    from detr_jax.train.trainer import train

    config = tiny_config(**{"model.arch": "toy", "data.synthetic_train_examples": 8, "data.synthetic_eval_examples": 4,
                            "train.num_steps": 2, "train.eval_every_epochs": 1, "eval.batch_size": 2,
                            "eval.num_visualized": 0})
    workdir = tmp_path / "run"
    metrics = train(config, workdir, eval_fn=make_eval_fn(config, workdir), show_progress=False)
    for key in ("loss_ce", "loss_ce_0", "loss_bbox_dn", "loss_giou_dn_0"):  # both layers of both branches
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    assert 0.0 <= metrics["eval_AP50"] <= 1.0

    variables, saved = load_checkpoint(workdir)
    assert sorted(variables["params"]) == ["backbone", "box_head", "class_head", "dn_embed", "queries", "refine"]
    predictor = Predictor.from_checkpoint(workdir, batch_size=2)
    images = [np.full((64, 48, 3), 200, np.uint8), np.zeros((40, 64, 3), np.uint8)]
    # 5 queries x 4 classes: 20 (query, class) pairs per image, all kept by the top-k
    ranked = predictor.predict_queries(images)
    assert [r["scores"].shape for r in ranked] == [(20,), (20,)]
    assert all((np.diff(r["scores"]) <= 0).all() for r in ranked)  # best first
    detections = predictor.predict(images, score_threshold=0.0, top_k=7)
    assert [len(d) for d in detections] == [7, 7]
    assert set(np.concatenate([d.queries for d in detections])) <= set(range(5))

    exported = export_detector(saved, variables, tmp_path / "export", "stablehlo", batch=2, size=(64, 64))
    served = ExportedDetector(exported)
    image = np.zeros((2, 64, 64, 3), np.uint8)
    image[:, :40, :48] = 200
    mask = np.zeros((2, 64, 64), bool)
    mask[:, :40, :48] = True
    orig_size = np.array([[40, 48], [40, 48]], np.int32)
    out = served(image, mask, orig_size)
    assert out["scores"].shape == (2, 20) and out["boxes"].shape == (2, 20, 4)
    reference = make_predict_fn(build_model(saved.model), make_mesh(jax.local_devices()[:1]),
                                build_class_convention(saved))(variables, image, mask, orig_size)
    np.testing.assert_allclose(out["scores"], reference["scores"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["boxes"], reference["boxes"], rtol=1e-4, atol=1e-3)
