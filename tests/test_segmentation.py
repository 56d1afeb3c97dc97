"""The mask head (detr_jax.models.segmentation): Hugging Face's `DetrForSegmentation` with
random weights, converted from its own names and from official DETR's, gives the same
pred_masks; the switch, its config checks and the conversion's inference of it.

Tolerance: max |difference| <= 1e-4 in float32 on mask logits of O(1-10) (the detector
part is held to the same bound in test_parity_hf.py, where both implementations differ
from float64 by ~5e-6); a wrong kernel layout, softmax axis, upsampling or group count
gives differences of O(1).
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import DetrConfig, DetrForSegmentation, ResNetConfig  # noqa: E402

from conftest import tiny_config  # noqa: E402
from detr_jax import convert  # noqa: E402
from detr_jax.config import ConfigError  # noqa: E402
from detr_jax.models import DETRSegm, build_model  # noqa: E402
from detr_jax.checkpoints.checkpointer import load_variables  # noqa: E402
from detr_jax.cli.convert import convert_main  # noqa: E402
from detr_jax.config import load_config  # noqa: E402
from test_convert import official_state_dict, write_config  # noqa: E402
from test_parity_hf import (  # noqa: E402
    OFFICIAL_LOSS, TINY_RESNET, hf_state_dict_numpy, our_model_config, padded_batch, randomize_hf_detr_,
    to_hf_inputs,
)

TOLERANCE = 1e-4
# TINY_DETR of test_parity_hf with 8 heads: the mask head's first GroupNorm (8 groups) needs
# hidden_dim + heads divisible by 8.
TINY_SEGM = dict(num_labels=5, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, encoder_attention_heads=8, decoder_attention_heads=8, num_queries=5)
# transformers 5 names of the mask head -> official DETR's (which transformers 4 used too).
OFFICIAL_HEAD = [(r"mask_head\.conv([12])\.conv", r"mask_head.lay\1"), (r"mask_head\.conv([12])\.norm", r"mask_head.gn\1"),
                 (r"mask_head\.fpn_stages\.0\.refine\.conv", "mask_head.lay3"),
                 (r"mask_head\.fpn_stages\.1\.refine\.conv", "mask_head.lay4"),
                 (r"mask_head\.fpn_stages\.2\.refine\.conv", "mask_head.lay5"),
                 (r"mask_head\.fpn_stages\.0\.refine\.norm", "mask_head.gn3"),
                 (r"mask_head\.fpn_stages\.1\.refine\.norm", "mask_head.gn4"),
                 (r"mask_head\.fpn_stages\.2\.refine\.norm", "mask_head.gn5"),
                 (r"mask_head\.fpn_stages\.(\d)\.fpn_adapter", lambda m: f"mask_head.adapter{int(m[1]) + 1}"),
                 (r"mask_head\.output_conv", "mask_head.out_lay"), (r"bbox_attention\.([qk])_proj", r"bbox_attention.\1_linear")]


def official_segm_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF DetrForSegmentation state dict in official DETRsegm's names."""
    detector = official_state_dict({k[len("detr."):]: v for k, v in hf.items() if k.startswith("detr.")})
    official = {"detr." + k: v for k, v in detector.items()}
    for key, value in hf.items():
        if not key.startswith("detr."):
            for pattern, new in OFFICIAL_HEAD:
                key = re.sub(pattern, new, key)
            official[key] = value
    return official


@functools.lru_cache(maxsize=None)
def hf_segmentation():
    """(HF DetrForSegmentation with random weights, its pred_masks and logits, our inputs)."""
    backbone = ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **TINY_RESNET)
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, auxiliary_loss=False,
                        attn_implementation="eager", **OFFICIAL_LOSS, **TINY_SEGM)
    model = DetrForSegmentation(config).eval()
    images, noisy, mask = padded_batch()
    pixel_values, pixel_mask = to_hf_inputs(images, mask)
    with torch.no_grad():
        randomize_hf_detr_(model, pixel_values, pixel_mask)
        gen = torch.Generator().manual_seed(1)
        for module in model.mask_head.modules():  # HF initializes GroupNorm to 1 and 0
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2, generator=gen)
                module.bias.normal_(0.0, 0.2, generator=gen)
        # The attention maps sum to 1 over ~1500 positions and heads: at random weights their
        # entries are ~1e-3 and the masks would hardly depend on the query. Sharper maps and
        # a larger weight on them in the first conv make every query's mask its own.
        model.bbox_attention.q_proj.weight.mul_(4.0)
        model.mask_head.conv1.conv.weight[:, config.d_model:].mul_(300.0)
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return model, out.pred_masks.numpy(), out.logits.numpy(), noisy, mask


def our_config(model):
    config = our_model_config(model, "resnet_tiny")
    config.masks = True
    return config


@pytest.mark.parametrize("names", ["huggingface", "official"])
def test_converted_segmentation_model_reproduces_hf_masks(names):
    model, masks, logits, noisy, mask = hf_segmentation()
    state = hf_state_dict_numpy(model)
    if names == "official":
        state = {k: v.numpy() for k, v in official_segm_state_dict(model.state_dict()).items()}
    config = our_config(model)
    variables, report = convert.convert_state_dict(state, config)
    assert report["layout"] == names
    ours = jax.jit(build_model(config).apply)(variables, noisy, mask)  # noise in the padding: ignored
    assert ours["pred_masks"].shape == masks.shape == (2, TINY_SEGM["num_queries"], 50, 60)  # stride 4 of 200x240
    diff = float(np.abs(np.asarray(ours["pred_masks"]) - masks).max())
    print(f"{names}: pred_masks max |diff| {diff:.2e}, logits {np.abs(ours['pred_logits'][-1] - logits).max():.2e}")
    assert diff <= TOLERANCE
    assert float(np.abs(np.asarray(ours["pred_logits"][-1]) - logits).max()) <= TOLERANCE
    # Not vacuous: masks vary over queries and pixels at the scale of O(1).
    assert masks.std() > 0.3 and np.abs(masks[:, 0] - masks[:, 1]).max() > 0.1


def test_official_panoptic_file_converts_for_a_masks_config(tmp_path):
    model, masks, _, noisy, mask = hf_segmentation()
    path = tmp_path / "detr-tiny-panoptic.pth"
    torch.save({"model": official_segm_state_dict(model.state_dict())}, path)  # as the model zoo's files
    config_path = write_config(tmp_path, num_heads=8, num_encoder_layers=1, num_decoder_layers=2, num_queries=5,
                               masks=True)
    convert_main(path, tmp_path / "out", config=config_path)
    config = load_config(config_path)
    ours = jax.jit(build_model(config.model).apply)(load_variables(tmp_path / "out"), noisy, mask)
    assert float(np.abs(np.asarray(ours["pred_masks"]) - masks).max()) <= TOLERANCE


def test_conversion_infers_the_mask_head():
    model, *_ = hf_segmentation()
    config = our_config(model)
    config.masks = False
    with pytest.raises(convert.ConversionError, match=r"model.masks: checkpoint has True, config has False"):
        convert.convert_state_dict(hf_state_dict_numpy(model), config)


def test_masks_switch_wraps_the_detector_and_keeps_its_parameter_paths():
    config = tiny_config(**{"model.num_heads": 8, "model.masks": True})
    model = build_model(config.model)
    assert isinstance(model, DETRSegm)
    plain = jax.eval_shape(build_model(tiny_config(**{"model.num_heads": 8}).model).init, jax.random.PRNGKey(0),
                           np.zeros((1, 64, 64, 3), np.uint8), np.ones((1, 64, 64), bool))
    segm = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.uint8),
                          np.ones((1, 64, 64), bool))
    # The detector's parameters where a detection checkpoint has them, plus the two heads.
    assert set(segm["params"]) == set(plain["params"]) | {"bbox_attention", "mask_head"}
    assert jax.tree.map(lambda x: x.shape, segm["params"]["backbone"]) == \
        jax.tree.map(lambda x: x.shape, plain["params"]["backbone"])


def test_masks_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"model.masks=True needs a ResNet backbone .* model.backbone='vit_ti16"):
        tiny_config(**{"model.masks": True, "model.backbone": "vit_ti16"})
    with pytest.raises(ConfigError, match=r"hidden_dim \+ model.num_heads divisible by 8 .* got 32 \+ 2"):
        tiny_config(**{"model.masks": True})


def test_training_a_mask_head_without_the_masks_loss_is_refused(tmp_path):
    from detr_jax.train.trainer import TrainingError, train

    with pytest.raises(TrainingError, match=r"model.masks=True: add 'masks' to loss.losses"):
        train(tiny_config(**{"model.num_heads": 8, "model.masks": True}), tmp_path)
    with pytest.raises(ConfigError, match=r"the 'masks' term needs a mask head and mask targets .* model.masks=False"):
        tiny_config(**{"loss.losses": ("labels", "boxes", "masks"), "data.masks": True})
