"""Deformable DETR against Hugging Face transformers' `DeformableDetrForObjectDetection`.

Three tiny HF models (native ResNet res3..res5 + one extra level, width 32, 2 heads, 1
encoder and 2 decoder layers, 7 queries): plain, with_box_refine and two-stage (which HF,
as the official code, only allows with box refinement). Each is built offline with random
weights (test_parity_hf's `randomize_hf_detr_`, plus its GroupNorms and level embedding),
converted with `detr_jax.convert` and run on the same padded batch of two images of
different sizes (HF gets the zero-padded pixels and the pixel mask, ours noise in the
padding). Compared: logits and boxes of every decoder layer (HF's own per-layer heads,
applied as its forward does), for two-stage also the encoder proposals (the `enc` branch:
logits, boxes) and the top-k positions chosen; the set loss of every layer against
transformers' loss function; the gradient of that loss (box refinement's detached
references); conversions from saved files (ours, and transformers' own save_pretrained,
which stores tied heads once); the config errors of bad settings; two training steps of
the synthetic config through the command line.

What transformers does not give, and how the tests deal with it:
- Its loss has no `enc` branch: `DeformableDetrForObjectDetectionLoss` ignores the
  two-stage proposals (so in HF nothing trains the proposal heads, enc_output and
  enc_output_norm). The reference for our `enc` terms is the official criterion's rule
  (fundamentalvision/Deformable-DETR `SetCriterion`: the proposals of every position,
  matched and trained against the targets with every label 0) computed with transformers'
  own `DeformableDetrHungarianMatcher` and `DeformableDetrImageLoss`.
- A fresh transformers 5 model with `with_box_refine=True, two_stage=False` ties its class
  heads (`_tied_weights_keys`: class_embed.{i} -> class_embed.0) while the box heads are
  per layer; official Deformable DETR clones both (and transformers keeps them apart when
  it loads such a checkpoint). The box-refine reference here gets untied class heads, as
  the official model and its checkpoints have; transformers' own tied model is converted
  too (`test_a_box_refine_model_saved_by_transformers_converts`).

Tolerances as test_parity_conditional: predictions within 1e-4 absolute, loss terms within
1e-5 relative; gradients as test_parity_dab, 1e-4 relative to their largest entry.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from test_parity_conditional import LOSS_RTOL, SIZES, TINY, hf_loss, member_config  # noqa: E402
from test_parity_hf import (  # noqa: E402
    TINY_RESNET,
    TOLERANCE,
    assert_same_predictions,
    hf_state_dict_numpy,
    make_targets,
    padded_batch,
    randomize_hf_detr_,
    to_hf_inputs,
)
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig  # noqa: E402
from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher, DeformableDetrImageLoss  # noqa: E402
from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid  # noqa: E402

from detr_jax import convert  # noqa: E402
from detr_jax.criterion.losses import SetCriterion  # noqa: E402
from detr_jax.models import build_class_convention, build_model  # noqa: E402
from detr_jax.models import deformable_transformer  # noqa: E402

CONFIG = REPO / "configs" / "synthetic_deformable_tiny.py"
GRAD_RTOL = 1e-4
# The recipe's matching costs (transformers' defaults are class 1 / L1 5 / GIoU 2).
COSTS = dict(class_cost=2, bbox_cost=5, giou_cost=2)
VARIANTS = {
    "plain": {"with_box_refine": False, "two_stage": False},
    "box_refine": {"with_box_refine": True, "two_stage": False},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}


def build_hf_deformable(with_box_refine: bool, two_stage: bool) -> DeformableDetrForObjectDetection:
    """The tiny HF Deformable DETR, native ResNet (resnet_tiny, stages res3..res5), eval mode;
    box refinement with untied class heads (module docstring)."""
    config = DeformableDetrConfig(
        use_timm_backbone=False, d_model=32,
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"], **TINY_RESNET), auxiliary_loss=False, attn_implementation="eager", with_box_refine=with_box_refine,
        two_stage=two_stage, two_stage_num_proposals=TINY["num_queries"], **COSTS, **TINY)
    model = DeformableDetrForObjectDetection(config).eval()
    if with_box_refine and not two_stage:
        model.class_embed = torch.nn.ModuleList(
            [torch.nn.Linear(config.d_model, config.num_labels) for _ in model.class_embed])
    return model


def randomize_rest_(model) -> None:
    """GroupNorm scale N(1, 0.2) and bias N(0, 0.2), level embedding N(0, 1) (randomize_hf_detr_
    leaves the former at 1 and 0)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)):
            norm.weight.normal_(1.0, 0.2, generator=generator)
            norm.bias.normal_(0.0, 0.2, generator=generator)
        model.model.level_embed.normal_(0.0, 1.0, generator=generator)


@torch.no_grad()
def hf_predictions(model, pixel_values, pixel_mask) -> dict[str, np.ndarray]:
    """HF's per-layer predictions, its forward's heads applied to every layer: logits [L, B,
    Q, K], boxes [L, B, Q, 4]; two-stage also enc_logits [B, S, K], enc_boxes [B, S, 4]
    (sigmoid of its coordinate logits: the official criterion's proposals) and indices [B,
    Q] (its top-k)."""
    out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    logits, boxes = [], []
    for level in range(out.intermediate_hidden_states.shape[1]):
        reference = out.init_reference_points if level == 0 else out.intermediate_reference_points[:, level - 1]
        reference = inverse_sigmoid(reference)
        hidden = out.intermediate_hidden_states[:, level]
        delta = model.bbox_embed[level](hidden)
        delta[..., :reference.shape[-1]] += reference
        logits.append(model.class_embed[level](hidden))
        boxes.append(delta.sigmoid())
    logits, boxes = torch.stack(logits), torch.stack(boxes)
    torch.testing.assert_close(logits[-1], out.logits, rtol=0, atol=0)
    torch.testing.assert_close(boxes[-1], out.pred_boxes, rtol=0, atol=0)
    result = {"logits": logits.numpy(), "boxes": boxes.numpy()}
    if model.config.two_stage:
        result.update(enc_logits=out.enc_outputs_class.numpy(),
                      enc_boxes=out.enc_outputs_coord_logits.sigmoid().numpy(),
                      indices=torch.topk(out.enc_outputs_class[..., 0], model.config.two_stage_num_proposals,
                                         dim=1)[1].numpy())
    return result


@functools.lru_cache(maxsize=None)
def jitted_apply(model_json: str):
    """The jitted apply of the model of a `model` config section (as JSON: one compilation
    per model, however many configs describe it)."""
    model = build_model(ml_collections.ConfigDict(json.loads(model_json)))
    return jax.jit(functools.partial(model.apply, intermediates=True))


def run_ours(config, variables, images, mask) -> dict[str, np.ndarray]:
    """Our outputs as numpy: logits, boxes, and two-stage enc_logits, enc_boxes, indices."""
    out = jitted_apply(config.model.to_json(sort_keys=True))(variables, images, mask)
    result = {"logits": np.asarray(out["pred_logits"]), "boxes": np.asarray(out["pred_boxes"])}
    if "enc" in out:
        result.update(enc_logits=np.asarray(out["enc"]["pred_logits"][0]),
                      enc_boxes=np.asarray(out["enc"]["pred_boxes"][0]), indices=np.asarray(out["proposal_indices"]))
    return result


@functools.lru_cache(maxsize=None)
def comparison(variant: str):
    """(HF model, our config, our variables, our outputs, HF's) of one variant."""
    model = build_hf_deformable(**VARIANTS[variant])
    images, noisy, mask = padded_batch(sizes=SIZES)
    pixel_values, pixel_mask = to_hf_inputs(images, mask)
    randomize_hf_detr_(model, pixel_values, pixel_mask)
    randomize_rest_(model)
    reference = hf_predictions(model, pixel_values, pixel_mask)
    config = member_config(CONFIG, model.config, **{"transformer_args": VARIANTS[variant]})
    variables, metadata = convert.convert_state_dict(hf_state_dict_numpy(model), config.model)
    assert metadata["inferred_model"]["transformer_args"] == {**VARIANTS[variant], "num_feature_levels": 4}
    return model, config, variables, run_ours(config, variables, noisy, mask), reference


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_decoder_layer_matches_hf(variant):
    _, _, _, ours, reference = comparison(variant)
    assert reference["logits"].shape == (2, 2, 7, 5)
    assert_same_predictions(f"deformable {variant}", (ours["logits"], ours["boxes"]),
                            (reference["logits"], reference["boxes"]))
    # Not vacuous: the layers differ, the logits are O(1), the boxes spread and are refined.
    assert np.abs(reference["logits"][0] - reference["logits"][1]).max() > 0.1
    assert 0.3 < reference["logits"].std() < 10 and reference["boxes"].std() > 0.05
    if variant != "plain":
        assert np.abs(reference["boxes"][0] - reference["boxes"][1]).max() > 0.01


def test_two_stage_proposals_and_their_top_k_match_hf():
    _, _, _, ours, reference = comparison("two_stage")
    for key in ("enc_logits", "enc_boxes"):
        diff = float(np.abs(ours[key] - reference[key]).max())
        print(f"deformable two_stage {key} max |diff| {diff:.2e}")
        assert ours[key].shape == reference[key].shape and diff <= TOLERANCE, key
    # Proposals off the image (padding, too close to the border) have coordinates +inf, box 1.
    assert (reference["enc_boxes"] == 1).all(-1).any() and ((reference["enc_boxes"] < 1).all(-1)).any()
    # The same positions, best first; where HF's and ours differ the scores must tie (the
    # positions with the same features, such as padding, score alike).
    scores = reference["enc_logits"][..., 0]
    same = ours["indices"] == reference["indices"]
    tied = np.take_along_axis(scores, ours["indices"], 1) == np.take_along_axis(scores, reference["indices"], 1)
    assert (same | tied).all(), (ours["indices"], reference["indices"])


def test_a_deliberate_mistake_fails_the_parity(monkeypatch):
    """The decoder's reference points not scaled by the levels' valid ratios."""
    _, config, variables, _, reference = comparison("plain")
    _, noisy, mask = padded_batch(sizes=SIZES)
    right = deformable_transformer.scale_references
    monkeypatch.setattr(deformable_transformer, "scale_references", lambda r, v: right(r, jnp.ones_like(v)))
    jitted_apply.cache_clear()
    try:
        wrong = run_ours(config, variables, noisy, mask)
    finally:
        jitted_apply.cache_clear()
    assert np.abs(wrong["logits"] - reference["logits"]).max() > 100 * TOLERANCE


@functools.lru_cache(maxsize=None)
def jitted_criterion():
    """(Our SetCriterion of the config's loss section and the variants' class convention, its
    jitted call): one for every variant, so that equal shapes compile once."""
    config = comparison("plain")[1]
    criterion = SetCriterion.from_config(config.loss, config.model.num_classes, classes=build_class_convention(config))
    return criterion, jax.jit(criterion.__call__)


def hf_enc_loss(model, reference, hf_labels) -> dict[str, float]:
    """The official criterion's enc terms (module docstring) from transformers' matcher and loss."""
    matcher = DeformableDetrHungarianMatcher(**COSTS)
    criterion = DeformableDetrImageLoss(matcher, model.config.num_labels, model.config.focal_alpha,
                                        ["labels", "boxes", "cardinality"])
    binary = [{"class_labels": torch.zeros_like(t["class_labels"]), "boxes": t["boxes"]} for t in hf_labels]
    outputs = {"logits": torch.from_numpy(reference["enc_logits"]),
               "pred_boxes": torch.from_numpy(reference["enc_boxes"])}
    return {f"{k}_enc": float(v) for k, v in criterion(outputs, binary).items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_set_loss_matches_transformers_every_layer(variant):
    """Every term of every layer (and two-stage, of the enc branch) equals transformers'
    (LOSS_RTOL); so does the total, given that transformers weighs loss_ce by 1 whatever
    the config says (ours: loss.class_coef, 2 as official Deformable DETR)."""
    model, config, _, ours, reference = comparison(variant)
    hf_labels, targets = make_targets(model.config.num_labels)
    hf_total, hf_terms = hf_loss(model, (reference["logits"], reference["boxes"]), hf_labels)
    outputs = {"pred_logits": ours["logits"], "pred_boxes": ours["boxes"]}
    if variant == "two_stage":
        outputs["enc"] = {"pred_logits": ours["enc_logits"][None], "pred_boxes": ours["enc_boxes"][None],
                          "class_agnostic": np.asarray(True)}
        hf_terms.update(hf_enc_loss(model, reference, hf_labels))
    _, loss_fn = jitted_criterion()
    total, terms = loss_fn(outputs, targets)
    terms = {k: float(v) for k, v in terms.items()}
    layers = model.config.decoder_layers
    expected = {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou")
                for s in ["", *(f"_{i}" for i in range(layers - 1))]} | {"cardinality_error"}
    if variant == "two_stage":
        expected |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "cardinality_error_enc"}
    assert expected <= set(hf_terms), sorted(hf_terms)
    worst = 0.0
    for key in sorted(expected):
        np.testing.assert_allclose(terms[key], hf_terms[key], rtol=LOSS_RTOL, atol=1e-6, err_msg=key)
        worst = max(worst, abs(terms[key] - hf_terms[key]) / max(abs(hf_terms[key]), 1e-12))
    assert config.loss.class_coef == 2.0
    enc = sum(w * hf_terms[f"{k}_enc"] for k, w in (("loss_ce", 2), ("loss_bbox", 5), ("loss_giou", 2))
              if f"{k}_enc" in hf_terms)
    ce = sum(v for k, v in hf_terms.items() if k.startswith("loss_ce") and not k.endswith("_enc"))
    np.testing.assert_allclose(float(total), hf_total + ce + enc, rtol=LOSS_RTOL)
    if variant == "two_stage":
        # Trained with the real labels, the enc branch's loss_ce differs (by ~5e-4 relative:
        # only the few matched positions' targets change, among 256 x 5 focal terms).
        plain_enc = {**outputs, "enc": {k: v for k, v in outputs["enc"].items() if k != "class_agnostic"}}
        _, wrong = loss_fn(plain_enc, targets)
        assert abs(float(wrong["loss_ce_enc"]) - hf_terms["loss_ce_enc"]) > 10 * LOSS_RTOL * hf_terms["loss_ce_enc"]
    print(f"deformable {variant} loss: ours {float(total):.6f}, HF {hf_total:.6f} (+ ce, enc), "
          f"worst relative term difference {worst:.1e}")


def gradients(variables, config, targets, noisy, mask):
    """Our loss's gradient (loss_ce weighted 1, as transformers) for the first layer's box
    head and the reference-point head (only those: no backward pass through the encoder
    and backbone to compile)."""
    model = build_model(config.model)
    loss_config = copy.deepcopy(config.loss)
    loss_config.class_coef = 1.0
    criterion = SetCriterion.from_config(loss_config, config.model.num_classes, classes=build_class_convention(config))
    names = ("bbox_embed_0", "reference_points")

    def loss(some):
        out = model.apply({**variables, "params": {**variables["params"], **some}}, noisy, mask)
        return criterion(out, {k: jnp.asarray(v) for k, v in targets.items()})[0]

    grads = jax.jit(jax.grad(loss))({name: variables["params"][name] for name in names})
    return np.asarray(grads["bbox_embed_0"]["layers_2"]["kernel"]), np.asarray(grads["reference_points"]["kernel"])


def test_gradients_match_autograd_and_an_undetached_reference_fails(monkeypatch):
    """Box refinement: the next layer reads each layer's boxes detached, which no forward
    value shows; the gradient of transformers' loss (PyTorch autograd) does."""
    model, config, variables, _, _ = comparison("box_refine")
    hf_labels, targets = make_targets(model.config.num_labels)
    images, noisy, mask = padded_batch(sizes=SIZES)
    pixel_values, pixel_mask = to_hf_inputs(images, mask)
    hf = copy.deepcopy(model)
    hf.config.auxiliary_loss = True
    hf.zero_grad()
    hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=hf_labels).loss.backward()
    want = (hf.bbox_embed[0].layers[2].weight.grad.numpy().T, hf.model.reference_points.weight.grad.numpy().T)
    got = gradients(variables, config, targets, noisy, mask)
    for name, a, b in zip(("bbox_embed_0/layers_2", "reference_points"), got, want):
        diff = float(np.abs(a - b).max() / np.abs(b).max())
        print(f"gradient {name}: max |diff| / max |grad| {diff:.1e}")
        assert diff <= GRAD_RTOL, name
    # The mistake: the next layer reads the refined boxes undetached.
    monkeypatch.setattr(deformable_transformer, "jax", types.SimpleNamespace(lax=types.SimpleNamespace(
        stop_gradient=lambda x: x)))
    wrong = gradients(variables, config, targets, noisy, mask)
    assert np.abs(wrong[0] - want[0]).max() > 100 * GRAD_RTOL * np.abs(want[0]).max()


def test_convert_file_infers_the_model_and_round_trips(tmp_path):
    """`convert_file` on the saved box-refine model infers it (arch, neck, sizes,
    transformer_args) and reproduces our predictions; the tied copies of the heads
    (model.decoder.bbox_embed) are recognized as such."""
    from safetensors.torch import save_file

    model, config, _, ours, _ = comparison("box_refine")
    path = tmp_path / "model.safetensors"
    # Copies: safetensors refuses tensors that share storage (tied weights).
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    variables, metadata = convert.convert_file(path, overrides={"model.num_heads": 2})
    assert metadata["layout"] == "huggingface_deformable_detr_box_refine"
    inferred = metadata["inferred_model"]
    assert {k: inferred[k] for k in ("arch", "backbone", "neck", "hidden_dim", "num_classes", "num_queries",
                                     "num_encoder_layers", "num_decoder_layers", "dim_feedforward",
                                     "transformer_args")} == dict(
        arch="deformable_detr", backbone="resnet_tiny", neck="channel_mapper", hidden_dim=32, num_classes=5,
        num_queries=7, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
        transformer_args={"with_box_refine": True, "two_stage": False, "num_feature_levels": 4})
    assert any(k.startswith("model.decoder.bbox_embed.") for k in metadata["ignored_keys"])
    _, noisy, mask = padded_batch(sizes=SIZES)
    np.testing.assert_array_equal(run_ours(config, variables, noisy, mask)["boxes"], ours["boxes"])
    # A head that is not a tied copy of the one already mapped is an error, not dropped.
    state_dict = hf_state_dict_numpy(model)
    state_dict["model.decoder.bbox_embed.1.layers.0.weight"] = state_dict["bbox_embed.1.layers.0.weight"] + 1
    with pytest.raises(convert.ConversionError, match="already given by"):
        convert.convert_state_dict(state_dict, config.model)


def test_a_box_refine_model_saved_by_transformers_converts(tmp_path):
    """transformers 5's own box-refine model ties its class heads and saves them once
    (class_embed.0; the box heads under model.decoder.bbox_embed): the conversion restores
    the tied copies and reproduces its predictions."""
    config = build_hf_deformable(with_box_refine=True, two_stage=False).config
    model = DeformableDetrForObjectDetection(config).eval()  # transformers' own: class heads tied
    assert model.class_embed[1].weight.data_ptr() == model.class_embed[0].weight.data_ptr()
    images, noisy, mask = padded_batch(sizes=SIZES)
    pixel_values, pixel_mask = to_hf_inputs(images, mask)
    randomize_hf_detr_(model, pixel_values, pixel_mask)
    randomize_rest_(model)
    reference = hf_predictions(model, pixel_values, pixel_mask)
    model.save_pretrained(tmp_path)
    variables, metadata = convert.convert_file(tmp_path / "model.safetensors", overrides={"model.num_heads": 2})
    assert metadata["layout"] == "huggingface_deformable_detr_box_refine"
    assert any("class_embed.1.weight = class_embed.0.weight" in note for note in metadata["notes"])
    config = comparison("box_refine")[1]  # the same model
    ours = run_ours(config, variables, noisy, mask)
    assert_same_predictions("deformable box_refine (transformers' save)", (ours["logits"], ours["boxes"]),
                            (reference["logits"], reference["boxes"]))


@pytest.mark.parametrize("overrides, message", [
    ({"model.transformer_args": {"with_box_refine": True, "two_stages": True}},
     "two_stages not among this detector's settings"),
    ({"model.transformer_args": {"two_stage": True}}, "two_stage=True needs with_box_refine=True"),
    ({"model.transformer_args": {"num_feature_levels": 0}}, "num_feature_levels=0: expected an integer >= 1"),
    ({"model.neck": "input_proj"}, "needs a multi-level neck"),
    ({"model.neck_args": {"num_levels": 3}}, "sets it from model.transformer_args num_feature_levels"),
])
def test_bad_settings_are_config_errors(overrides, message):
    from detr_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_config(CONFIG, overrides)
    assert "model." in str(error.value)
