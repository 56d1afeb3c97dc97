"""DINO against the official IDEA-Research/DINO, through a fixture.

scripts/make_dino_fixture.py runs the official code (its deformable attention's pure
PyTorch path; the stubs and patches are listed in its docstring) on a tiny random-weight
DINO-4scale: our resnet_tiny in torchvision's layout (FrozenBatchNorm), width 32, 2 heads, 1
encoder and 2 decoder layers, FFN 64, 2 sampling points, 10 queries, 5 classes, dn_number
50, on two images (64x64 and 48x56, padded to 64x64; ours gets noise in the padding), with
3 and 2 objects. It stores the weights (float16-exact), the inputs, the denoising draws in
our layout, and the official outputs and losses with denoising off (eval mode, no targets)
and on (training mode, dropout 0, the stored draws fed to `prepare_for_cdn`).

Where the official denoising and ours (`models.denoising`: fixed shapes) could differ, the
data makes them coincide: the official pads its groups to the batch's largest target count
and makes 2 * dn_number // (2 * that count) groups; ours pads to data.max_boxes and makes
dn_number // data.max_boxes. With data.max_boxes = 3 = the largest count and dn_number = 50
both give 16 groups of 6 slots (image 1's third slot padded in both: content zeros, box
logit 0), so every dn query has the same place, noise and mask.

Compared: logits and boxes of every decoder layer (the matching queries and, with
denoising, the dn queries) and of the `enc` branch (the official interm_outputs: the
selected proposals) within 1e-4 absolute; every loss term (main, aux layers, `_dn`,
`_dn_{i}`, `_interm` = our `_enc`) and the weighted total within 1e-5 relative.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from detr_jax import convert
from detr_jax.config.loading import load_config
from detr_jax.criterion.losses import SetCriterion
from detr_jax.models import build_class_convention, build_model
from detr_jax.models.denoising import DenoisingNoise

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "dino_tiny.npz"
CONFIG = REPO / "configs" / "synthetic_dino_tiny.py"
TOLERANCE = 1e-4
LOSS_RTOL = 1e-5
OVERRIDES = {
    "model.backbone": "resnet_tiny", "model.backbone_norm": "frozen_bn", "model.dilation": False,
    "model.hidden_dim": 32, "model.num_heads": 2, "model.num_encoder_layers": 1, "model.num_decoder_layers": 2,
    "model.dim_feedforward": 64, "model.num_queries": 10, "model.num_classes": 5,
    "model.transformer_args": {"num_feature_levels": 4, "encoder_n_points": 2, "decoder_n_points": 2,
                               "dn_number": 50, "dn_label_noise_ratio": 0.5, "dn_box_noise_scale": 1.0},
    "data.max_boxes": 3,
}


@functools.lru_cache(maxsize=None)
def fixture():
    data = np.load(FIXTURE)
    return {k: data[k] for k in data.files}


def official_state_dict() -> dict[str, np.ndarray]:
    """The fixture's official DINO weights by their official names (float32)."""
    return {k.removeprefix("weight:"): v.astype(np.float32) if v.dtype == np.float16 else v
            for k, v in fixture().items() if k.startswith("weight:")}


@functools.lru_cache(maxsize=None)
def converted():
    """(config, variables, conversion metadata)."""
    config = load_config(CONFIG, OVERRIDES)
    variables, metadata = convert.convert_state_dict(official_state_dict(), config.model)
    return config, variables, metadata


def inputs():
    data = fixture()
    images = data["images"].astype(np.float32)
    mask = data["mask"]
    noisy = np.where(mask[..., None], images, np.random.default_rng(1).normal(0, 3, images.shape).astype(np.float32))
    targets = {"labels": jnp.asarray(data["labels"]), "boxes": jnp.asarray(data["boxes"]),
               "valid": jnp.asarray(data["valid"])}
    noise = DenoisingNoise(**{k: jnp.asarray(data[f"noise_{k}"])
                              for k in ("label_uniform", "new_labels", "box_sign", "box_part")})
    return jnp.asarray(noisy), jnp.asarray(mask), targets, noise


@functools.lru_cache(maxsize=None)
def run(denoising: bool):
    config, variables, _ = converted()
    model = build_model(config.model)
    images, mask, targets, noise = inputs()
    if denoising:
        return model.apply(variables, images, mask, train=True, targets=targets, denoising_noise=noise,
                           rngs={"dropout": jax.random.PRNGKey(0)})
    return model.apply(variables, images, mask)


def assert_close(name, ours, reference):
    ours = np.asarray(ours)
    assert ours.shape == reference.shape, (name, ours.shape, reference.shape)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, reference)]
    print(f"{name} max |diff| per layer: " + ", ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) <= TOLERANCE, (name, diffs)


def test_conversion_infers_dino_and_maps_every_key():
    config, _, metadata = converted()
    assert metadata["layout"] == "official_dino"
    inferred = metadata["inferred_model"]
    assert inferred["arch"] == "dino" and inferred["num_queries"] == 10 and inferred["num_classes"] == 5
    assert inferred["transformer_args"] == {"num_feature_levels": 4}
    # Only tied copies are dropped: the shared heads once per layer, the decoder's copies.
    for key in metadata.get("ignored", []):
        assert "embed" in key or key.endswith("num_batches_tracked"), key


@pytest.mark.parametrize("denoising", [False, True], ids=["dn_off", "dn_on"])
def test_every_decoder_layer_and_the_enc_branch_match_official_dino(denoising):
    data, out = fixture(), run(denoising)
    prefix = "on_" if denoising else "off_"
    assert_close(f"{prefix}logits", out["pred_logits"], data[f"{prefix}logits"])
    assert_close(f"{prefix}boxes", out["pred_boxes"], data[f"{prefix}boxes"])
    assert_close(f"{prefix}enc_logits", out["enc"]["pred_logits"][0], data[f"{prefix}enc_logits"])
    assert_close(f"{prefix}enc_boxes", out["enc"]["pred_boxes"][0], data[f"{prefix}enc_boxes"])
    # Not vacuous: the layers differ, the logits are O(1), the boxes spread and are refined.
    reference = data[f"{prefix}logits"]
    assert np.abs(reference[0] - reference[1]).max() > 0.1 and 0.3 < reference.std() < 10
    assert np.abs(data[f"{prefix}boxes"][0] - data[f"{prefix}boxes"][1]).max() > 0.01
    if denoising:
        assert_close("dn_logits", out["dn"]["pred_logits"], data["on_dn_logits"])
        assert_close("dn_boxes", out["dn"]["pred_boxes"], data["on_dn_boxes"])
    else:
        assert "dn" not in out


def our_criterion(config):
    classes = build_class_convention(config)
    return SetCriterion.from_config(config.loss, config.model.num_classes, classes=classes)


def official_name(name: str) -> str:
    return name.replace("_enc", "_interm")


@pytest.mark.parametrize("denoising", [False, True], ids=["dn_off", "dn_on"])
def test_every_loss_term_matches_official_dino(denoising):
    config, _, _ = converted()
    data, out = fixture(), run(denoising)
    _, targets, _ = inputs()[1:]
    total, metrics = our_criterion(config)({k: v for k, v in out.items()}, targets)
    prefix = "on_" if denoising else "off_"
    reference = {k[len(prefix) + 5:]: float(v) for k, v in data.items() if k.startswith(prefix + "loss:")}
    if not denoising:  # the official reports zeros for the dn terms it does not compute
        assert all(v == 0 for k, v in reference.items() if "_dn" in k)
        reference = {k: v for k, v in reference.items() if "_dn" not in k}
    ours = {official_name(k): float(v) for k, v in metrics.items()
            if k.startswith(("loss_ce", "loss_bbox", "loss_giou"))}
    assert set(ours) == set(reference), (sorted(ours), sorted(reference))
    for key, value in reference.items():
        print(f"{key}: ours {ours[key]:.6f} official {value:.6f}")
        np.testing.assert_allclose(ours[key], value, rtol=LOSS_RTOL, err_msg=key)
    np.testing.assert_allclose(float(total), float(data[prefix + "loss"]), rtol=LOSS_RTOL)
    assert float(metrics["nonfinite_cost"]) == 0
