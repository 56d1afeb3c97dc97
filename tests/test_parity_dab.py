"""DAB-DETR against Hugging Face transformers' `DabDetrForObjectDetection` (its defaults).

As test_parity_conditional (whose helpers this reuses): a tiny HF model with random
weights (PReLU slopes too), converted and run on the same padded batch; every decoder
layer's logits and boxes, every loss term against transformers' own loss, a conversion
from a saved file, two training steps. HF's DAB-DETR computes every layer as the official
code does (raw outputs fed forward, normalized copies to the heads), so its own
`intermediate_hidden_states` and `reference_points` give the per-layer predictions.

Box refinement detaches each refined anchor before the next layer reads it, which no
forward value shows: the gradient of the loss with respect to the anchors and the box head
is compared with PyTorch's autograd of transformers' loss, and an undetached reference is
shown to fail that comparison. Tolerances: predictions 1e-4 absolute and loss terms 1e-5
relative (see test_parity_conditional); gradients 1e-4 relative to their largest entry
(float32 backward passes over the same matching; a missing detach changes them by 1e-2 or
more).
"""

from __future__ import annotations

import copy
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_parity_conditional import (  # noqa: E402
    SIZES,
    TINY,
    check_convert_file,
    check_loss,
    compare,
    train_two_steps,
)
from test_parity_hf import TINY_RESNET, assert_same_predictions, make_targets, padded_batch, to_hf_inputs  # noqa: E402
from transformers import DabDetrConfig, DabDetrForObjectDetection, ResNetConfig  # noqa: E402
from transformers.models.dab_detr.modeling_dab_detr import inverse_sigmoid  # noqa: E402

from conftest import REPO  # noqa: E402
from detr_jax.criterion.losses import SetCriterion  # noqa: E402
from detr_jax.models import build_class_convention, build_model  # noqa: E402
from detr_jax.models.detectors import dab_detr  # noqa: E402

CONFIG = REPO / "configs" / "synthetic_dab_tiny.py"
GRAD_RTOL = 1e-4


def build_hf_dab() -> DabDetrForObjectDetection:
    """The tiny HF DAB-DETR, native ResNet (resnet_tiny), eval mode, HF's defaults otherwise."""
    config = DabDetrConfig(
        use_timm_backbone=False, backbone_config=ResNetConfig(out_features=["stage4"], **TINY_RESNET), hidden_size=32,
        auxiliary_loss=False, attn_implementation="eager", **TINY)
    return DabDetrForObjectDetection(config).eval()


@torch.no_grad()
def hf_dab_predictions(model, pixel_values, pixel_mask) -> tuple[np.ndarray, np.ndarray]:
    """HF's per-layer predictions: logits [L, B, Q, K], boxes [L, B, Q, 4]."""
    out = model.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    logits = model.class_embed(out.intermediate_hidden_states)
    boxes = model.bbox_predictor(out.intermediate_hidden_states)
    boxes += inverse_sigmoid(out.reference_points)
    boxes = boxes.sigmoid()
    final = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    torch.testing.assert_close(logits[-1], final.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes[-1], final.pred_boxes, rtol=0, atol=1e-6)
    return logits.numpy(), boxes.numpy()


def randomize_prelu_(model) -> None:
    """PReLU slopes U(-0.5, 0.5) (randomize_hf_detr_ leaves them at 0.25)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prelu in (m for m in model.modules() if isinstance(m, torch.nn.PReLU)):
            prelu.weight.uniform_(-0.5, 0.5, generator=generator)


@functools.lru_cache(maxsize=None)
def comparison():
    """compare() of the tiny DAB-DETR (its decoder's box head is tied to bbox_predictor)."""
    result = compare(build_hf_dab(), CONFIG, hf_dab_predictions, randomize_prelu_)
    model = result[0]
    assert all(torch.equal(a, b) for a, b in zip(model.model.decoder.bbox_embed.parameters(),
                                                 model.bbox_predictor.parameters()))
    return result


def test_every_decoder_layer_matches_hf():
    _, _, _, ours, reference = comparison()
    assert reference[0].shape == (2, 2, 7, 5)
    assert_same_predictions("dab", ours, reference)
    assert np.abs(reference[0][0] - reference[0][1]).max() > 0.1
    assert np.abs(reference[1][0] - reference[1][1]).max() > 0.01  # the boxes are refined
    assert 0.3 < reference[0].std() < 10


def test_set_loss_matches_transformers_every_layer():
    model, config, _, ours, reference = comparison()
    check_loss(model, config, ours, reference)


def gradients(variables, config, targets, noisy, mask):
    """Our loss's gradient (loss_ce weighted 1, as transformers) for refpoint_embed and the box head."""
    model = build_model(config.model)
    loss_config = copy.deepcopy(config.loss)
    loss_config.class_coef = 1.0
    criterion = SetCriterion.from_config(loss_config, config.model.num_classes, classes=build_class_convention(config))

    def loss(params):
        out = model.apply({**variables, "params": params}, noisy, mask)
        return criterion(out, {k: jnp.asarray(v) for k, v in targets.items()})[0]

    grads = jax.jit(jax.grad(loss))(variables["params"])
    return np.asarray(grads["refpoint_embed"]), np.asarray(grads["decoder"]["bbox_embed"]["layers_2"]["kernel"])


def test_gradients_match_autograd_and_an_undetached_reference_fails(monkeypatch):
    model, config, variables, _, _ = comparison()
    hf_labels, targets = make_targets(model.config.num_labels)
    images, noisy, mask = padded_batch(sizes=SIZES)
    pixel_values, pixel_mask = to_hf_inputs(images, mask)
    hf = copy.deepcopy(model)
    hf.config.auxiliary_loss = True
    hf.zero_grad()
    hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=hf_labels).loss.backward()
    want = (hf.model.query_refpoint_embeddings.weight.grad.numpy(), hf.bbox_predictor.layers[2].weight.grad.numpy().T)
    got = gradients(variables, config, targets, noisy, mask)
    for name, a, b in zip(("refpoint_embed", "bbox_embed/layers_2"), got, want):
        diff = float(np.abs(a - b).max() / np.abs(b).max())
        print(f"gradient {name}: max |diff| / max |grad| {diff:.1e}")
        assert diff <= GRAD_RTOL, name
    # The mistake: the next layer reads the refined anchor undetached.
    monkeypatch.setattr(dab_detr, "jax", types.SimpleNamespace(nn=jax.nn, lax=types.SimpleNamespace(
        stop_gradient=lambda x: x)))
    wrong = gradients(variables, config, targets, noisy, mask)
    assert np.abs(wrong[0] - want[0]).max() > 100 * GRAD_RTOL * np.abs(want[0]).max()


def test_convert_file_infers_the_model_and_round_trips(tmp_path):
    metadata = check_convert_file(comparison(), "huggingface_dab_detr", "dab_detr", tmp_path)
    assert any(k.startswith("model.decoder.bbox_embed.") for k in metadata["ignored_keys"])


def test_config_trains_two_steps_and_evaluates(tmp_path):
    train_two_steps(CONFIG, tmp_path)
