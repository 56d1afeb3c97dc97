"""Conditional DETR against Hugging Face transformers' `ConditionalDetrForObjectDetection`.

A tiny HF model (native ResNet, width 32, 2 heads, 1 encoder and 2 decoder layers) is built
offline with random weights (test_parity_hf's `randomize_hf_detr_`), converted with
`detr_jax.convert` and run on the same padded batch of two images of different sizes
(HF gets the zero-padded pixels and the pixel mask, ours noise in the padding). Compared:
logits and boxes of every decoder layer, the set loss of every layer against
transformers' own loss function, a conversion from a saved file, and two training steps.

Every decoder layer, as the reference computes it: HF's `auxiliary_loss=True` feeds each
layer the NORMALIZED output of the previous one (and query_scale reads it), while the
official Conditional DETR (and HF with `auxiliary_loss=False`, its inference) feeds the
raw output and normalizes only the copy the heads read. The reference per-layer
predictions are therefore taken as in test_parity_hf: each decoder layer's raw output
(forward hook, auxiliary_loss=False) through HF's own decoder LayerNorm, class head and
box head (offsets from the reference point); the last layer must equal HF's own output.

Tolerances: predictions within 1e-4 absolute (logits O(1); float32 with other summation
orders gives ~1e-6, a real mistake 1e-2 or more; see test_parity_hf); loss terms within
1e-5 relative (float32 sums of a few hundred O(1) terms, a few ulps).
"""

from __future__ import annotations

import copy
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import REPO, TINY_OVERRIDES  # noqa: E402
from test_parity_hf import (  # noqa: E402
    TINY_RESNET,
    TOLERANCE,
    assert_same_predictions,
    hf_decoder_layer_outputs,
    hf_state_dict_numpy,
    make_targets,
    padded_batch,
    randomize_hf_detr_,
    to_hf_inputs,
)
from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig  # noqa: E402
from transformers.models.conditional_detr.modeling_conditional_detr import inverse_sigmoid  # noqa: E402

from detr_jax import convert  # noqa: E402
from detr_jax.config import load_config  # noqa: E402
from detr_jax.criterion.losses import SetCriterion  # noqa: E402
from detr_jax.models import build_class_convention, build_model  # noqa: E402
from detr_jax.models import conditional_decoder  # noqa: E402

LOSS_RTOL = 1e-5
SIZES = [(96, 128), (64, 96)]  # padded to 96x128: feature maps 3x4, the second image 2x3 of it
TINY = dict(num_labels=5, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            encoder_attention_heads=2, decoder_attention_heads=2, num_queries=7)
CONFIG = REPO / "configs" / "synthetic_conditional_tiny.py"


def build_hf_conditional() -> ConditionalDetrForObjectDetection:
    """The tiny HF Conditional DETR, native ResNet (resnet_tiny), eval mode, HF's loss defaults."""
    config = ConditionalDetrConfig(
        use_timm_backbone=False, backbone_config=ResNetConfig(out_features=["stage4"], **TINY_RESNET), d_model=32,
        auxiliary_loss=False, attn_implementation="eager", **TINY)
    return ConditionalDetrForObjectDetection(config).eval()


def member_config(config_file, hf_config, **model):
    """The member's config file with synthetic_tiny's tiny test data, and the `model`
    fields of the HF model (`model`: the member's own extra fields)."""
    fields = {"model.backbone": "resnet_tiny", "model.dilation": False, "model.hidden_dim": 32, "model.num_heads": 2,
              "model.num_encoder_layers": hf_config.encoder_layers, "model.num_decoder_layers": hf_config.decoder_layers,
              "model.dim_feedforward": hf_config.encoder_ffn_dim, "model.num_queries": hf_config.num_queries,
              "model.num_classes": hf_config.num_labels, **{f"model.{k}": v for k, v in model.items()}}
    return load_config(config_file, {**TINY_OVERRIDES, **fields})


@torch.no_grad()
def hf_conditional_predictions(model, pixel_values, pixel_mask) -> tuple[np.ndarray, np.ndarray]:
    """The official per-layer predictions from HF modules (module docstring): logits
    [L, B, Q, K], boxes [L, B, Q, 4]."""
    raw, final = hf_decoder_layer_outputs(model, pixel_values, pixel_mask)
    decoder = model.model.decoder
    hidden = decoder.layernorm(raw)
    reference = decoder.ref_point_head(model.model.query_position_embeddings.weight).sigmoid()  # [Q, 2]
    logits = model.class_labels_classifier(hidden)
    boxes = model.bbox_predictor(hidden)
    boxes[..., :2] += inverse_sigmoid(reference)
    boxes = boxes.sigmoid()
    torch.testing.assert_close(logits[-1], final.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes[-1], final.pred_boxes, rtol=0, atol=1e-6)
    return logits.numpy(), boxes.numpy()


def run_model(config, variables, images, mask):
    """Our per-layer (logits, boxes) as numpy; traced afresh (a monkeypatched part is seen)."""
    model = build_model(config.model)
    out = jax.jit(lambda v, x, m: model.apply(v, x, m))(variables, images, mask)
    return np.asarray(out["pred_logits"]), np.asarray(out["pred_boxes"])


def compare(model, config_file, predictions, randomize_more=lambda model: None):
    """Randomizes the HF `model` (randomize_hf_detr_, then `randomize_more(model)`), takes
    its per-layer `predictions(model, pixel_values, pixel_mask)`, converts it for the
    member's config and runs ours. Returns (HF model, our config, our variables, our
    predictions, HF's predictions)."""
    images, noisy, mask = padded_batch(sizes=SIZES)
    pixel_values, pixel_mask = to_hf_inputs(images, mask)
    randomize_hf_detr_(model, pixel_values, pixel_mask)
    randomize_more(model)
    reference = predictions(model, pixel_values, pixel_mask)
    config = member_config(config_file, model.config)
    variables, _ = convert.convert_state_dict(hf_state_dict_numpy(model), config.model)
    return model, config, variables, run_model(config, variables, noisy, mask), reference


@functools.lru_cache(maxsize=None)
def comparison():
    """compare() of the tiny Conditional DETR."""
    return compare(build_hf_conditional(), CONFIG, hf_conditional_predictions)


def test_every_decoder_layer_matches_hf():
    _, _, _, ours, reference = comparison()
    assert reference[0].shape == (2, 2, 7, 5)
    assert_same_predictions("conditional", ours, reference)
    # Not vacuous: the layers differ, the logits are O(1), the boxes spread.
    assert np.abs(reference[0][0] - reference[0][1]).max() > 0.1
    assert 0.3 < reference[0].std() < 10 and reference[1].std() > 0.05


def test_a_deliberate_mistake_fails_the_parity(monkeypatch):
    """The reference point's sine embedding in (x, y) order instead of DETR's (y, x)."""
    _, config, variables, _, reference = comparison()
    _, noisy, mask = padded_batch(sizes=SIZES)
    right = conditional_decoder.sine_embedding
    monkeypatch.setattr(conditional_decoder, "sine_embedding", lambda c, *a, **k: right(c[..., [1, 0]], *a, **k))
    wrong = run_model(config, variables, noisy, mask)
    assert np.abs(wrong[0] - reference[0]).max() > 100 * TOLERANCE


def hf_loss(model, predictions, hf_labels):
    """transformers' own loss for the model (its `loss_function`, auxiliary_loss=True) on
    per-layer predictions: (total, {term: value})."""
    config = copy.deepcopy(model.config)
    config.auxiliary_loss = True
    logits, boxes = (torch.from_numpy(np.asarray(p)) for p in predictions)
    loss, loss_dict, _ = model.loss_function(logits[-1], hf_labels, "cpu", boxes[-1], config, logits, boxes)
    return float(loss), {k: float(v) for k, v in loss_dict.items()}


def our_loss(config, predictions, targets, **loss_overrides):
    """Our SetCriterion from the config's loss section and the model's class convention."""
    config = copy.deepcopy(config)
    config.loss.update(loss_overrides)
    criterion = SetCriterion.from_config(config.loss, config.model.num_classes, classes=build_class_convention(config))
    logits, boxes = predictions
    loss, metrics = jax.jit(criterion.__call__)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def check_loss(model, config, ours, reference):
    """Every term of every layer equals transformers' (LOSS_RTOL); so does the total, given
    that transformers weighs loss_ce by 1 whatever `cls_loss_coefficient` says (ours:
    loss.class_coef, 2 as official Conditional DETR and DAB-DETR). Returns the worst
    relative difference."""
    hf_labels, targets = make_targets(model.config.num_labels)
    hf_total, hf_terms = hf_loss(model, reference, hf_labels)
    total, terms = our_loss(config, ours, targets)
    layers = model.config.decoder_layers
    expected = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ["", *(f"_{i}" for i in range(layers - 1))]}
    assert expected | {"cardinality_error"} <= set(hf_terms), sorted(hf_terms)
    worst = 0.0
    for key in sorted(expected | {"cardinality_error"}):
        np.testing.assert_allclose(terms[key], hf_terms[key], rtol=LOSS_RTOL, atol=1e-6, err_msg=key)
        worst = max(worst, abs(terms[key] - hf_terms[key]) / max(abs(hf_terms[key]), 1e-12))
    assert config.loss.class_coef == 2.0
    ce = sum(v for k, v in hf_terms.items() if k.startswith("loss_ce"))
    np.testing.assert_allclose(total, hf_total + (config.loss.class_coef - 1) * ce, rtol=LOSS_RTOL)
    # A swapped focal alpha fails it.
    _, swapped = our_loss(config, ours, targets, focal_alpha=0.75)
    assert abs(swapped["loss_ce"] - hf_terms["loss_ce"]) > 100 * LOSS_RTOL * abs(hf_terms["loss_ce"])
    print(f"loss: ours {total:.6f}, HF {hf_total:.6f} (+ ce), worst relative term difference {worst:.1e}")
    return worst


def test_set_loss_matches_transformers_every_layer():
    model, config, _, ours, reference = comparison()
    check_loss(model, config, ours, reference)


def check_convert_file(comparison_result, layout: str, arch: str, tmp_path) -> dict:
    """`convert_file` on the HF model saved as safetensors infers the member's model (arch
    and sizes) and gives the variables that reproduce our predictions; `detr-jax convert`
    writes a checkpoint of that model. Returns the metadata."""
    from safetensors.torch import save_file

    from detr_jax.checkpoints.checkpointer import load_metadata, load_variables
    from detr_jax.cli.convert import convert_main

    model, config, _, ours, _ = comparison_result
    path = tmp_path / "model.safetensors"
    # Copies: safetensors refuses tensors that share storage (tied weights).
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    variables, metadata = convert.convert_file(path, overrides={"model.num_heads": 2})
    assert metadata["layout"] == layout
    inferred = metadata["inferred_model"]
    assert {k: inferred[k] for k in ("arch", "backbone", "hidden_dim", "num_classes", "num_queries",
                                     "num_encoder_layers", "num_decoder_layers", "dim_feedforward")} == dict(
        arch=arch, backbone="resnet_tiny", hidden_dim=32, num_classes=5, num_queries=7,
        num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64)
    _, noisy, mask = padded_batch(sizes=SIZES)
    np.testing.assert_array_equal(run_model(config, variables, noisy, mask)[1], ours[1])
    convert_main(path, tmp_path / "converted", overrides={"model.num_heads": 2})
    assert load_metadata(tmp_path / "converted")["model"]["arch"] == arch
    saved = load_variables(tmp_path / "converted")
    np.testing.assert_array_equal(saved["params"]["class_embed"]["kernel"], variables["params"]["class_embed"]["kernel"])
    return metadata


def test_convert_file_infers_the_model_and_round_trips(tmp_path):
    check_convert_file(comparison(), "huggingface_conditional_detr", "conditional_detr", tmp_path)


def train_two_steps(config_file, tmp_path) -> dict:
    """`detr_jax.train.trainer.train` for 2 steps of a member's config (tiny overrides), then an evaluation."""
    from detr_jax.evaluation.evaluator import make_eval_fn
    from detr_jax.train.trainer import train

    config = load_config(config_file, {**TINY_OVERRIDES, "data.synthetic_train_examples": 8,
                                       "data.synthetic_eval_examples": 4, "train.num_steps": 2,
                                       "train.eval_every_epochs": 1, "eval.batch_size": 2, "eval.num_visualized": 0})
    metrics = train(config, tmp_path / "run", eval_fn=make_eval_fn(config, tmp_path / "run"), show_progress=False)
    for key in ("loss", "loss_ce", "loss_ce_0", "loss_bbox", "loss_giou_0"):
        assert np.isfinite(metrics[key]), key
    assert np.isfinite(metrics["eval_AP"]) and 0.0 <= metrics["eval_AP"] <= 1.0
    return metrics


def test_config_trains_two_steps_and_evaluates(tmp_path):
    train_two_steps(CONFIG, tmp_path)
