"""ViT/DeiT checkpoints -> our ViT backbone: Hugging Face and timm layouts, parity, refusals.

Tiny random Hugging Face ViTModel / DeiTModel (width 32, 2 blocks, 8-pixel patches, a
4x4 pretraining grid) are converted and must compute HF's last_hidden_state (patch
tokens) at the native size and, with `interpolate_pos_encoding=True`, at a non-square size
(which checks our bicubic resampling of the position embeddings against torch's).

The timm layout is tested on a state dict built here from timm's documented key names
(`cls_token`, `pos_embed`, `blocks.{i}.attn.qkv`, ...), not from timm itself: timm needs
torchvision, and torchvision 0.28.0 does not import with the CPU torch 2.13 we pin.
"""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402  (tests/ is on sys.path under pytest)

from detr_jax import convert  # noqa: E402
from detr_jax.checkpoints.checkpointer import load_variables  # noqa: E402
from detr_jax.cli.convert import convert_main  # noqa: E402
from detr_jax.ops.image_statistics import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from detr_jax.models import BACKBONES, build_model  # noqa: E402
from detr_jax.train.trainer import initial_variables  # noqa: E402

# float32 on both sides; the only differences are summation orders (attention, LayerNorm,
# the bicubic resampling as a matrix product): a few 1e-6 on O(1) features, so 1e-4 leaves
# a wide margin while still catching any wrong mapping (those are O(0.1) or more).
ATOL = 1e-4
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                image_size=32, patch_size=8)


def vit_args(num_prefix_tokens: int, **extra) -> dict:
    """Our backbone_args for the tiny HF models (vit_ti8 with its shape changed)."""
    return {**dict(width=32, depth=2, num_heads=2, patch_size=8, pos_grid=(4, 4), num_prefix_tokens=num_prefix_tokens),
            **extra}


def config_for(num_prefix_tokens: int, **extra):
    return tiny_config(**{"model.backbone": "vit_ti8", "model.backbone_args": vit_args(num_prefix_tokens, **extra)})


@functools.lru_cache(maxsize=None)
def hf_model(kind: str, layer_norm_eps: float = 1e-6):
    """A tiny random HF ViTModel or DeiTModel, every parameter perturbed (LayerNorms too)."""
    torch.manual_seed({"vit": 0, "deit": 1}[kind])
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT, layer_norm_eps=layer_norm_eps))
    else:
        model = transformers.DeiTModel(transformers.DeiTConfig(**TINY_VIT, layer_norm_eps=layer_norm_eps))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_patch_features(model, images: np.ndarray, num_prefix_tokens: int, interpolate: bool) -> np.ndarray:
    """HF's last_hidden_state without the prefix tokens, as [B, h, w, E]."""
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), interpolate_pos_encoding=interpolate)
    b, h, w = images.shape[0], images.shape[1] // 8, images.shape[2] // 8
    return out.last_hidden_state[:, num_prefix_tokens:].numpy().reshape(b, h, w, -1)


def our_features(model_config, backbone_params, images: np.ndarray) -> np.ndarray:
    vit = BACKBONES[model_config.backbone](model_config, jnp.float32)
    mask = np.ones(images.shape[:3], bool)
    return np.asarray(vit.apply({"params": backbone_params}, jnp.asarray(images), jnp.asarray(mask)).features)


def timm_state_dict(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An HF ViT/DeiT state dict (transformers 5 in-memory names) in timm's
    VisionTransformer names: q, k, v fused into qkv ([3E, E], q rows first), with a head."""
    renames = [(r"embeddings\.cls_token", "cls_token"), (r"embeddings\.distillation_token", "dist_token"),
               (r"embeddings\.position_embeddings", "pos_embed"),
               (r"embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
               (r"layers\.(\d+)\.layernorm_before\.(\w+)", r"blocks.\1.norm1.\2"),
               (r"layers\.(\d+)\.layernorm_after\.(\w+)", r"blocks.\1.norm2.\2"),
               (r"layers\.(\d+)\.attention\.o_proj\.(\w+)", r"blocks.\1.attn.proj.\2"),
               (r"layers\.(\d+)\.mlp\.fc([12])\.(\w+)", r"blocks.\1.mlp.fc\2.\3"),
               (r"layernorm\.(\w+)", r"norm.\1")]
    timm = {}
    for key, value in hf.items():
        if key.startswith("pooler.") or re.search(r"\.[qkv]_proj\.", key):
            continue
        for pattern, new in renames:
            if re.fullmatch(pattern, key):
                timm[re.sub(pattern, new, key)] = value
                break
        else:
            raise AssertionError(f"no timm name for {key}")
    depth = 1 + max(int(k.split(".")[1]) for k in hf if k.startswith("layers."))
    for i in range(depth):
        for param in ("weight", "bias"):
            timm[f"blocks.{i}.attn.qkv.{param}"] = np.concatenate(
                [hf[f"layers.{i}.attention.{p}_proj.{param}"] for p in "qkv"])
    timm["head.weight"], timm["head.bias"] = np.ones((10, 32), np.float32), np.zeros(10, np.float32)
    return timm


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, num_prefix_tokens", [("vit", 1), ("deit", 2)])
def test_converted_hf_vit_reproduces_its_features(kind, num_prefix_tokens):
    model = hf_model(kind)
    config = config_for(num_prefix_tokens)
    variables, metadata = convert.convert_state_dict(numpy_state_dict(model), config.model)
    assert metadata["layout"] == "huggingface_vit" and metadata["contents"] == "backbone"
    assert list(variables) == ["params"] and list(variables["params"]) == ["backbone"]
    assert "pooler.dense.weight" in metadata["ignored_keys"]
    params = variables["params"]["backbone"]
    assert params["prefix_tokens"].shape == (num_prefix_tokens, 32) and params["pos_embed"].shape == (4, 4, 32)

    rng = np.random.default_rng(0)
    for size, interpolate in (((32, 32), False), ((48, 64), True)):  # native; non-native, non-square
        images = rng.normal(size=(2, *size, 3)).astype(np.float32)  # already normalized, fed to both
        ours = our_features(config.model, params, images)
        theirs = hf_patch_features(model, images, num_prefix_tokens, interpolate)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0, err_msg=f"{kind} at {size}")


@pytest.mark.parametrize("kind, num_prefix_tokens", [("vit", 1), ("deit", 2)])
def test_timm_layout_converts_to_the_same_variables(kind, num_prefix_tokens):
    hf = numpy_state_dict(hf_model(kind))
    config = config_for(num_prefix_tokens)
    from_hf, _ = convert.convert_state_dict(hf, config.model)
    from_timm, metadata = convert.convert_state_dict(timm_state_dict(hf), config.model)
    assert metadata["layout"] == "timm_vit" and {"head.weight", "head.bias"} <= set(metadata["ignored_keys"])
    assert jax.tree.structure(from_timm) == jax.tree.structure(from_hf)
    jax.tree.map(np.testing.assert_array_equal, from_timm, from_hf)


def test_standard_variant_and_backbone_args_are_inferred():
    """A ViT-Ti/16 shape (12 blocks of width 192) with a 2x2 grid and a class token: the
    config inferred from the weights alone is vit_ti16 with pos_grid and num_prefix_tokens;
    no backbone_norm check (that is for ResNets' BatchNorm)."""
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
        image_size=32, patch_size=16))
    state_dict = numpy_state_dict(model)
    config = convert.target_config(state_dict, None, {"model.backbone_norm": "group_norm"}, "vit-ti.safetensors")
    assert config.model.backbone == "vit_ti16"
    assert dict(config.model.backbone_args) == {"pos_grid": (2, 2), "num_prefix_tokens": 1}
    _, metadata = convert.convert_state_dict(state_dict, config.model)
    assert metadata["inferred_model"] == {"backbone": "vit_ti16",
                                          "backbone_args": {"pos_grid": (2, 2), "num_prefix_tokens": 1}}
    # A plain vit_ti16 config: the message says what to set.
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_state_dict(state_dict, tiny_config(**{"model.backbone": "vit_ti16"}).model, source="vit-ti.bin")
    assert ("model.backbone_args: checkpoint has pos_grid=(2, 2), config has pos_grid=(14, 14): "
            "set model.backbone_args={'pos_grid': (2, 2)}") in str(error.value)
    # A config without prefix tokens (ViTDet's choice, needed for windowed attention): the
    # class token and its position embedding are dropped, with a note.
    windowed = tiny_config(**{"model.backbone": "vit_ti16", "model.backbone_args": {"pos_grid": (2, 2), "window_size": 2}})
    variables, metadata = convert.convert_state_dict(state_dict, windowed.model)
    assert "prefix_tokens" not in variables["params"]["backbone"]
    assert "prefix_pos_embed" not in variables["params"]["backbone"]
    assert any("1 class/distillation/register token(s) and their position embeddings dropped" in note
               for note in metadata["notes"])


def test_conversion_problems_are_listed_at_once():
    timm = timm_state_dict(numpy_state_dict(hf_model("vit")))
    del timm["blocks.1.mlp.fc2.bias"]
    timm["blocks.0.ls1.gamma"] = np.ones(32, np.float32)
    timm["blocks.0.attn.q_norm.weight"] = np.ones(16, np.float32)
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_state_dict(timm, config_for(1, depth=3).model, source="vit-tiny.pth")
    message = str(error.value)
    for expected in [
        "vit-tiny.pth: cannot convert this timm_vit checkpoint",
        "model.backbone: checkpoint has an unknown ViT with width 32, depth 2, patch size 8, "
        "config has 'vit_ti8' (depth 3)",
        "blocks.0.ls1.gamma: layer scale (timm init_values): the ViT has none",
        "blocks.0.attn.q_norm.weight: qk-norm: the ViT has none",
        "model variables missing from the checkpoint (",
        "params/backbone/blocks_1/mlp/fc2/bias",
    ]:
        assert expected in message, f"{expected!r} not in:\n{message}"

    # Position embeddings that are not prefix tokens + a square grid name the key.
    timm = timm_state_dict(numpy_state_dict(hf_model("vit")))
    timm["pos_embed"] = np.zeros((1, 1 + 12, 32), np.float32)
    with pytest.raises(convert.ConversionError, match=r"pos_embed: 13 positions are not 1 prefix tokens \+ a square"):
        convert.convert_state_dict(timm, config_for(1).model)


def test_cli_converts_a_saved_hf_directory_for_init_from(tmp_path):
    """`detr-jax convert` on a save_pretrained folder of a Google-style ViT (LayerNorm eps
    1e-12, inputs normalized with mean = std = 0.5): the config files' settings go into
    backbone_args, and the checkpoint initializes a ViT DETR's backbone through
    train.init_from, computing HF's features from ImageNet-normalized images."""
    model = hf_model("vit", layer_norm_eps=1e-12)
    model.save_pretrained(tmp_path / "hf_vit")  # model.safetensors + config.json
    (tmp_path / "hf_vit" / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "ViTImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    google = dict(layer_norm_eps=1e-12, pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3)

    with pytest.raises(convert.ConversionError) as error:  # the files' settings are checked
        convert_main(tmp_path / "hf_vit", tmp_path / "refused", config=config_for(1))
    assert "layer_norm_eps=1e-12, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5)" in str(error.value)
    assert str(tmp_path / "hf_vit" / "model.safetensors") in str(error.value)

    metadata = convert_main(tmp_path / "hf_vit", tmp_path / "converted", config=config_for(1, **google))
    assert metadata["layout"] == "huggingface_vit" and metadata["contents"] == "backbone"
    assert metadata["inferred_model"]["backbone_args"] == {"pos_grid": (4, 4), "num_prefix_tokens": 1, **google}
    assert any("pixel_mean=(0.5, 0.5, 0.5)" in note for note in metadata["notes"])

    config = tiny_config(**{"model.backbone": "vit_ti8", "model.backbone_args": vit_args(1, **google),
                            "train.init_from": str(tmp_path / "converted")})
    start = initial_variables(config, build_model(config.model), jax.random.PRNGKey(0))
    converted = load_variables(tmp_path / "converted")
    jax.tree.map(np.testing.assert_array_equal, start["params"]["backbone"], converted["params"]["backbone"])

    pixels = np.random.default_rng(1).uniform(size=(1, 32, 32, 3)).astype(np.float32)
    imagenet = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    ours = our_features(config.model, start["params"]["backbone"], imagenet)
    theirs = hf_patch_features(model, (pixels - 0.5) / 0.5, 1, False)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
