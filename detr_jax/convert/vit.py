"""ViT backbones: transformers' ViT/DeiT (`huggingface_vit`) and timm's VisionTransformer
(`timm_vit`) names, the ViT their tensors describe, a Hugging Face folder's ViT settings."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import numpy as np

from detr_jax.convert.errors import ConversionError
from detr_jax.convert.leaves import indices, shape
from detr_jax.convert.rules import IGNORED, Module, Path, first_match, unsupported
from detr_jax.models.vit import VITS, ViT

VIT = ("backbone",)


def _vit_block(i: str, *rest: str) -> tuple[str, ...]:
    return VIT + (f"blocks_{i}",) + rest


HF_VIT_PREFIX = r"(?:vit\.|deit\.)?"
_HF_QKV = {"query": "q", "key": "k", "value": "v", "q": "q", "k": "k", "v": "v"}


def huggingface_vit_module(name: str) -> Module | None:
    layer = HF_VIT_PREFIX + r"(?:encoder\.layer|layers)\.(\d+)\."
    rules = [
        (r"pooler(\..+)?|classifier|cls_classifier|distillation_classifier", lambda *_: IGNORED),
        (HF_VIT_PREFIX + r"embeddings\.patch_embeddings\.projection", lambda: Module(VIT + ("patch_embed",), "conv")),
        # saved (Hub) names, then transformers 5's in-memory names
        (layer + r"attention\.attention\.(query|key|value)",
         lambda i, p: Module(_vit_block(i, "attn", f"{_HF_QKV[p]}_proj"), "dense")),
        (layer + r"attention\.([qkv])_proj", lambda i, p: Module(_vit_block(i, "attn", f"{p}_proj"), "dense")),
        (layer + r"attention\.(?:output\.dense|o_proj)", lambda i: Module(_vit_block(i, "attn", "out_proj"), "dense")),
        (layer + r"layernorm_before", lambda i: Module(_vit_block(i, "norm1"), "layernorm")),
        (layer + r"layernorm_after", lambda i: Module(_vit_block(i, "norm2"), "layernorm")),
        (layer + r"(?:intermediate\.dense|mlp\.fc1)", lambda i: Module(_vit_block(i, "mlp", "fc1"), "dense")),
        (layer + r"(?:output\.dense|mlp\.fc2)", lambda i: Module(_vit_block(i, "mlp", "fc2"), "dense")),
        (HF_VIT_PREFIX + r"layernorm", lambda: Module(VIT + ("norm",), "layernorm")),
    ]
    return first_match(rules, name)


def huggingface_vit_parameter(key: str) -> Module | None:
    rules = [
        (HF_VIT_PREFIX + r"embeddings\.cls_token", lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 0)),
        (HF_VIT_PREFIX + r"embeddings\.distillation_token",
         lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 1)),
        (HF_VIT_PREFIX + r"embeddings\.position_embeddings", lambda: Module(VIT, "pos_embed")),
        (HF_VIT_PREFIX + r"embeddings\.mask_token", lambda: IGNORED),  # masked image modeling only
    ]
    return first_match(rules, key)


def timm_vit_module(name: str) -> Module | None:
    rules = [
        (r"head|head_dist|attn_pool(\..+)?", lambda *_: IGNORED),
        (r"patch_embed\.proj", lambda: Module(VIT + ("patch_embed",), "conv")),
        (r"blocks\.(\d+)\.norm([12])", lambda i, n: Module(_vit_block(i, f"norm{n}"), "layernorm")),
        (r"blocks\.(\d+)\.attn\.qkv", lambda i: Module(_vit_block(i, "attn"), "fused_qkv")),
        (r"blocks\.(\d+)\.attn\.proj", lambda i: Module(_vit_block(i, "attn", "out_proj"), "dense")),
        (r"blocks\.(\d+)\.mlp\.fc([12])", lambda i, n: Module(_vit_block(i, "mlp", f"fc{n}"), "dense")),
        (r"norm", lambda: Module(VIT + ("norm",), "layernorm")),
        (r"blocks\.(\d+)\.ls[12]", unsupported("layer scale (timm init_values): the ViT has none")),
        (r"blocks\.(\d+)\.attn\.[qk]_norm", unsupported("qk-norm: the ViT has none")),
        (r"fc_norm", unsupported("fc_norm (a norm after pooling, with `norm` an Identity): the ViT's "
                                  "features take the final `norm`, which this model lacks")),
        (r"norm_pre", unsupported("norm_pre (a LayerNorm before the blocks, CLIP-style): the ViT has none")),
    ]
    return first_match(rules, name)


def timm_vit_parameter(key: str) -> Module | None:
    rules = [
        (r"cls_token", lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 0)),
        (r"dist_token", lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 1)),
        (r"reg_token", lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 2)),
        (r"pos_embed", lambda: Module(VIT, "pos_embed")),
    ]
    return first_match(rules, key)


VIT_WEIGHT_FIELDS = ("pos_grid", "num_prefix_tokens", "mlp_ratio")
# ... and those a Hugging Face model directory's config files give.
VIT_FILE_FIELDS = ("layer_norm_eps", "pixel_mean", "pixel_std")
VIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ViT) if f.default is not dataclasses.MISSING}


def infer_vit(leaves: Mapping[Path, np.ndarray]) -> tuple[str | None, dict[str, Any], str]:
    """(name in VITS or None, {ViT field: value} the tensors give, a description such as
    "ViT with width 32, depth 2, patch size 8"). The fields: width, depth, patch_size and
    VIT_WEIGHT_FIELDS (absent tensors leave theirs out)."""
    vit = ("params",) + VIT
    fields: dict[str, Any] = {"depth": len(indices(leaves, vit, r"blocks_(\d+)"))}
    patch = shape(leaves, *vit, "patch_embed", "kernel")
    if patch is not None and len(patch) == 4:
        fields["patch_size"], fields["width"] = patch[0], patch[-1]
    grid = shape(leaves, *vit, "pos_embed")
    if grid is not None:
        fields["pos_grid"] = tuple(grid[:2])
    tokens = shape(leaves, *vit, "prefix_tokens")
    fields["num_prefix_tokens"] = 0 if tokens is None else tokens[0]
    hidden = shape(leaves, *vit, "blocks_0", "mlp", "fc1", "kernel")
    if hidden is not None and "width" in fields:
        fields["mlp_ratio"] = hidden[-1] / fields["width"]
    description = (f"ViT with width {fields.get('width')}, depth {fields['depth']}, "
                   f"patch size {fields.get('patch_size')}")
    for name, spec in VITS.items():
        if (spec.width, spec.depth, spec.patch_size) == (fields.get("width"), fields["depth"], fields.get("patch_size")):
            return name, fields, description
    return None, fields, description


def vit_backbone_args(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT fields among VIT_WEIGHT_FIELDS + VIT_FILE_FIELDS that differ from the defaults."""
    return {k: fields[k] for k in VIT_WEIGHT_FIELDS + VIT_FILE_FIELDS
            if k in fields and fields[k] != VIT_DEFAULTS[k]}


def hf_vit_settings(directory: pathlib.Path) -> dict[str, Any]:
    """ViT fields (VIT_FILE_FIELDS) a Hugging Face model directory gives beside its weights,
    where they are not the ViT defaults: pixel_mean/pixel_std from preprocessor_config.json
    (image_mean/image_std; Google's ViTs: 0.5) and layer_norm_eps from config.json (Google's
    ViTs: 1e-12). Absent files give nothing."""
    settings: dict[str, Any] = {}
    for name, fields in (("config.json", {"layer_norm_eps": "layer_norm_eps"}),
                         ("preprocessor_config.json", {"image_mean": "pixel_mean", "image_std": "pixel_std"})):
        try:
            content = json.loads((directory / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise ConversionError(f"{directory / name}: cannot be read as JSON: {e}") from e
        for key, field in fields.items():
            value = content.get(key) if isinstance(content, dict) else None
            if isinstance(value, list):
                value = tuple(float(v) for v in value)
            if value is not None and value != VIT_DEFAULTS[field]:
                settings[field] = value
    return settings


def vit_mismatches(fields: Mapping[str, Any], name: str | None, description: str, model_config,
                    vit: ViT | None) -> list[str]:
    """Lines for a ViT checkpoint whose fields (infer_vit's, plus those read from the model
    directory) differ from `vit`, the config's ViT backbone (None: the config's is no ViT)."""
    if vit is None:
        shown = repr(name) if name else f"an unknown {description}"
        return [f"model.backbone: checkpoint has {shown}, config has {model_config.backbone!r} (not a ViT)"]
    lines = []
    shape = [k for k in ("width", "depth", "patch_size") if k in fields and fields[k] != getattr(vit, k)]
    if shape:
        shown = repr(name) if name else f"an unknown {description}"
        have = ", ".join(f"{k} {getattr(vit, k)}" for k in shape)
        line = f"model.backbone: checkpoint has {shown}, config has {model_config.backbone!r} ({have})"
        if name is None:
            line += (": set model.backbone_args width/depth/patch_size (and num_heads, which the weights "
                     "do not give) on a ViT variant")
        lines.append(line)
    differing = {k: fields[k] for k in VIT_WEIGHT_FIELDS + VIT_FILE_FIELDS if k in fields and fields[k] != getattr(vit, k)}
    if differing:
        args = {**dict(model_config.backbone_args), **differing}
        have = ", ".join(f"{k}={getattr(vit, k)!r}" for k in differing)
        want = ", ".join(f"{k}={v!r}" for k, v in differing.items())
        lines.append(f"model.backbone_args: checkpoint has {want}, config has {have}: "
                     f"set model.backbone_args={args!r}")
    return lines
