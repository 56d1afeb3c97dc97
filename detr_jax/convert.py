"""PyTorch checkpoints -> Flax variables of `detr_jax.models.detr.DETR`.

These layouts are recognized from the key names:
  official     facebookresearch/detr (`detr-r50-e632da11.pth`, ...): {"model": state dict} with
               `backbone.0.body.*`, `transformer.*` (fused attention `in_proj_weight`),
               `class_embed`, `bbox_embed`, `query_embed`, `input_proj`, and for the learned
               position embedding `backbone.1.{row,col}_embed`.
  huggingface  transformers' DetrForObjectDetection: as saved by `save_pretrained` or on the
               Hub (`model.backbone.conv_encoder.model.*` with timm/torchvision backbone names
               or the native ResNet's `embedder`/`encoder.stages` names, `out_proj`, `fc1`), or
               as in memory in transformers 5 (`model.backbone.model.*`, `o_proj`, `mlp.fc1`).
  torchvision  an ImageNet ResNet-50/101 (`conv1.weight`, `layer1.0.conv1.weight`, `fc.*`
               ignored): converted to the backbone subtree only, to start training from.
  huggingface_vit  transformers' ViTModel / ViTForImageClassification / DeiTModel /
               DeiTForImageClassification(WithTeacher), with or without the `vit.`/`deit.`
               prefix, in the saved names (`encoder.layer.{i}.attention.attention.query`,
               `intermediate.dense`, ...) or transformers 5's in-memory ones (`layers.{i}.
               attention.q_proj`, `mlp.fc1`, ...); `pooler`, classifiers and `mask_token`
               ignored. A model directory's preprocessor_config.json (image_mean/std) and
               config.json (layer_norm_eps) are read too. Backbone subtree only.
  timm_vit     timm's VisionTransformer (and VisionTransformerDistilled): `cls_token`,
               `dist_token`, `reg_token` (registers: more prefix tokens), `pos_embed`,
               `patch_embed.proj`, `blocks.{i}.attn.qkv` (fused q/k/v), `norm`; `head`,
               `head_dist` ignored; layer scale, qk-norm, fc_norm and norm_pre are refused
               (the ViT has none). Backbone subtree only.
  huggingface_<member>  transformers' DETR-family members (ConditionalDetrForObjectDetection,
               ...): the layouts of `detr_jax.convert_hf_detr_family`, which names their
               modules and infers their model (model.arch included).

Tensors are mapped one by one: conv kernels OIHW -> HWIO, linear weights [out, in] ->
[in, out], the fused attention in_proj (timm: qkv) split into q/k/v, BatchNorm weight/bias/
running_mean/running_var -> frozen_bn scale/bias/mean/var (`num_batches_tracked` ignored),
LayerNorm weight/bias -> scale/bias; a ViT's class/distillation/register tokens become
`prefix_tokens` [P, E] and its [1, P + g*g, E] position embeddings `prefix_pos_embed` [P, E]
and the `pos_embed` grid [g, g, E]. The model shape is inferred from the tensors and
checked against the target config; every problem (config mismatch, unmapped key, missing
key, shape mismatch) is reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import pickle
import re
import zipfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

import detr_jax
from detr_jax import convert_hf_detr_family as hf_family
from detr_jax.checkpoints.checkpointer import compare_trees
from detr_jax.config import config_from_dict, load_config
from detr_jax.criterion.class_convention import CLASS_CONVENTIONS
from detr_jax.models import BACKBONES, build_model, class_convention_name, variable_shapes
from detr_jax.models.resnet import RESNETS
from detr_jax.models.transformer import torch_dense
from detr_jax.models.vit import VITS, ViT

LAYOUTS = ("official", "huggingface", "torchvision", "huggingface_vit", "timm_vit", *hf_family.LAYOUTS)
# Layouts that hold only an ImageNet backbone: converted to the backbone subtree.
BACKBONE_LAYOUTS = ("torchvision", "huggingface_vit", "timm_vit")
VIT_LAYOUTS = ("huggingface_vit", "timm_vit")
# Model config fields that the weights determine (and are checked against the config).
INFERRED_FIELDS = (
    "backbone", "hidden_dim", "num_queries", "num_classes", "num_encoder_layers",
    "num_decoder_layers", "dim_feedforward", "pre_norm", "position_embedding", "masks",
)
# Fields that no tensor shape reveals: always taken from the config.
NOT_INFERABLE_FIELDS = ("dilation", "num_heads")

Path = tuple[str, ...]  # ("params", "backbone", "body", "conv1", "kernel")


class ConversionError(ValueError):
    """A checkpoint cannot be read, recognized, or converted to the target model."""


@dataclasses.dataclass(frozen=True)
class Module:
    """A PyTorch module's place in the Flax tree and what kind of layer it is.

    kind: "conv", "bn" (frozen BatchNorm), "dense", "layernorm", "groupnorm", "embedding" (the path is
    the parameter itself), "fused_qkv" (nn.MultiheadAttention's in_proj, timm's qkv; the
    path is the attention module holding q_proj/k_proj/v_proj), "unsupported" (`path[0]`
    says why), or for a ViT's bare parameters "prefix_token" (class, distillation or
    register tokens [1, n, E], concatenated in `order` into prefix_tokens) and
    "pos_embed" ([1, P + g*g, E] -> prefix_pos_embed and the pos_embed grid).
    """

    path: tuple[str, ...]
    kind: str
    order: int = 0


IGNORED = Module((), "ignored")

# ---------------------------------------------------------------------------------------
# Key names -> modules, per layout.


def _first_match(rules: list[tuple[str, Callable[..., Module | None]]], name: str) -> Module | None:
    for pattern, build in rules:
        match = re.fullmatch(pattern, name)
        if match:
            return build(*match.groups())
    return None


BODY = ("backbone", "body")

_RESNET_BODY_RULES = [
    # torchvision / timm / official DETR names
    (r"conv1", lambda: Module(BODY + ("conv1",), "conv")),
    (r"bn1", lambda: Module(BODY + ("bn1",), "bn")),
    (r"layer(\d)\.(\d+)\.conv([123])", lambda s, b, i: Module(BODY + (f"layer{s}_{b}", f"conv{i}"), "conv")),
    (r"layer(\d)\.(\d+)\.bn([123])", lambda s, b, i: Module(BODY + (f"layer{s}_{b}", f"bn{i}"), "bn")),
    (r"layer(\d)\.(\d+)\.downsample\.0", lambda s, b: Module(BODY + (f"layer{s}_{b}", "downsample_conv"), "conv")),
    (r"layer(\d)\.(\d+)\.downsample\.1", lambda s, b: Module(BODY + (f"layer{s}_{b}", "downsample_bn"), "bn")),
    # transformers' native ResNet names (stages are 0-based there)
    (r"embedder\.embedder\.convolution", lambda: Module(BODY + ("conv1",), "conv")),
    (r"embedder\.embedder\.normalization", lambda: Module(BODY + ("bn1",), "bn")),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.([012])\.(convolution|normalization)",
        lambda s, b, j, what: Module(
            BODY + (f"layer{int(s) + 1}_{b}", ("conv" if what == "convolution" else "bn") + str(int(j) + 1)),
            "conv" if what == "convolution" else "bn",
        ),
    ),
    (
        r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(convolution|normalization)",
        lambda s, b, what: Module(
            BODY + (f"layer{int(s) + 1}_{b}", "downsample_conv" if what == "convolution" else "downsample_bn"),
            "conv" if what == "convolution" else "bn",
        ),
    ),
]


def _resnet_body_module(name: str) -> Module | None:
    return _first_match(_RESNET_BODY_RULES, name)


def _layer_path(stack: str, index: str) -> tuple[str, ...]:
    return ("transformer", f"{stack}_layer{index}")


def _official_layer_module(stack: str, index: str, name: str) -> Module | None:
    layer = _layer_path(stack, index)
    attn = {"self_attn": "self_attn", "multihead_attn": "cross_attn"}
    rules = [
        (r"(self_attn|multihead_attn)", lambda a: Module(layer + (attn[a],), "fused_qkv")),
        (r"(self_attn|multihead_attn)\.out_proj", lambda a: Module(layer + (attn[a], "out_proj"), "dense")),
        (r"linear([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"norm([123])", lambda i: Module(layer + (f"norm{i}",), "layernorm")),
    ]
    return _first_match(rules, name)


_MASK_HEAD = ("mask_head",)
# Official DETR (and transformers before 5) name the mask head's layers lay1..lay5,
# gn1..gn5, adapter1..3 and out_lay; transformers 5 names them conv1, conv2,
# fpn_stages.i.{fpn_adapter,refine} and output_conv.
_MASK_HEAD_BLOCKS = {"1": "conv1", "2": "conv2", "3": "refine1", "4": "refine2", "5": "refine3"}
_NORM_OR_CONV = {"conv": "conv", "norm": "groupnorm"}
_MASK_HEAD_RULES = [
    (r"bbox_attention\.([qk])_(?:linear|proj)", lambda p: Module(("bbox_attention", f"{p}_proj"), "dense")),
    (r"mask_head\.lay([1-5])", lambda i: Module(_MASK_HEAD + (_MASK_HEAD_BLOCKS[i], "conv"), "conv")),
    (r"mask_head\.gn([1-5])", lambda i: Module(_MASK_HEAD + (_MASK_HEAD_BLOCKS[i], "norm"), "groupnorm")),
    (r"mask_head\.adapter([123])", lambda i: Module(_MASK_HEAD + (f"adapter{i}",), "conv")),
    (r"mask_head\.(?:out_lay|output_conv)", lambda: Module(_MASK_HEAD + ("out",), "conv")),
    (r"mask_head\.(conv[12])\.(conv|norm)", lambda b, what: Module(_MASK_HEAD + (b, what), _NORM_OR_CONV[what])),
    (r"mask_head\.fpn_stages\.([012])\.fpn_adapter", lambda i: Module(_MASK_HEAD + (f"adapter{int(i) + 1}",), "conv")),
    (
        r"mask_head\.fpn_stages\.([012])\.refine\.(conv|norm)",
        lambda i, what: Module(_MASK_HEAD + (f"refine{int(i) + 1}", what), _NORM_OR_CONV[what]),
    ),
]


def _official_module(name: str) -> Module | None:
    rules = [
        (r"detr\.(.+)", _official_module),  # DETRsegm: the detector under "detr."
        *_MASK_HEAD_RULES,
        (r"backbone\.0\.body\.(.+)", _resnet_body_module),
        (r"backbone\.1\.(row|col)_embed", lambda rc: Module(("position_embedding", f"{rc}_embed"), "embedding")),
        (r"input_proj", lambda: Module(("input_proj",), "conv")),
        (r"query_embed", lambda: Module(("query_embed",), "embedding")),
        (r"class_embed", lambda: Module(("class_embed",), "dense")),
        (r"bbox_embed\.layers\.(\d+)", lambda i: Module(("bbox_embed", f"layers_{i}"), "dense")),
        (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)", _official_layer_module),
        (r"transformer\.encoder\.norm", lambda: Module(("transformer", "encoder_norm"), "layernorm")),
        (r"transformer\.decoder\.norm", lambda: Module(("transformer", "decoder_norm"), "layernorm")),
    ]
    return _first_match(rules, name)


def _huggingface_layer_module(stack: str, index: str, name: str) -> Module | None:
    layer = _layer_path(stack, index)
    attn = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}
    final_norm = "norm2" if stack == "encoder" else "norm3"
    rules = [
        (r"(self_attn|encoder_attn)\.([qkv])_proj", lambda a, p: Module(layer + (attn[a], f"{p}_proj"), "dense")),
        (r"(self_attn|encoder_attn)\.(?:out_proj|o_proj)", lambda a: Module(layer + (attn[a], "out_proj"), "dense")),
        (r"(?:mlp\.)?fc([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"self_attn_layer_norm", lambda: Module(layer + ("norm1",), "layernorm")),
        (r"encoder_attn_layer_norm", lambda: Module(layer + ("norm2",), "layernorm")),
        (r"final_layer_norm", lambda: Module(layer + (final_norm,), "layernorm")),
    ]
    return _first_match(rules, name)


def _huggingface_module(name: str) -> Module | None:
    position = {"row": "row_embed", "column": "col_embed"}
    rules = [
        (r"detr\.(.+)", _huggingface_module),  # DetrForSegmentation: the detector under "detr."
        *_MASK_HEAD_RULES,
        (r"model\.backbone\.(?:conv_encoder\.)?model\.(.+)", _resnet_body_module),
        (
            r"model\.position_embedding\.(row|column)_embeddings",
            lambda rc: Module(("position_embedding", position[rc]), "embedding"),
        ),
        (r"model\.input_projection", lambda: Module(("input_proj",), "conv")),
        (r"model\.query_position_embeddings", lambda: Module(("query_embed",), "embedding")),
        (r"class_labels_classifier", lambda: Module(("class_embed",), "dense")),
        (r"bbox_predictor\.layers\.(\d+)", lambda i: Module(("bbox_embed", f"layers_{i}"), "dense")),
        (r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", _huggingface_layer_module),
        (r"model\.decoder\.layernorm", lambda: Module(("transformer", "decoder_norm"), "layernorm")),
    ]
    return _first_match(rules, name)


def _torchvision_module(name: str) -> Module | None:
    if name == "fc":  # the ImageNet classifier: not part of DETR
        return IGNORED
    return _resnet_body_module(name)


VIT = ("backbone",)


def _vit_block(i: str, *rest: str) -> tuple[str, ...]:
    return VIT + (f"blocks_{i}",) + rest


_HF_VIT_PREFIX = r"(?:vit\.|deit\.)?"
_HF_QKV = {"query": "q", "key": "k", "value": "v", "q": "q", "k": "k", "v": "v"}


def _huggingface_vit_module(name: str) -> Module | None:
    layer = _HF_VIT_PREFIX + r"(?:encoder\.layer|layers)\.(\d+)\."
    rules = [
        (r"pooler(\..+)?|classifier|cls_classifier|distillation_classifier", lambda *_: IGNORED),
        (_HF_VIT_PREFIX + r"embeddings\.patch_embeddings\.projection", lambda: Module(VIT + ("patch_embed",), "conv")),
        # saved (Hub) names, then transformers 5's in-memory names
        (layer + r"attention\.attention\.(query|key|value)",
         lambda i, p: Module(_vit_block(i, "attn", f"{_HF_QKV[p]}_proj"), "dense")),
        (layer + r"attention\.([qkv])_proj", lambda i, p: Module(_vit_block(i, "attn", f"{p}_proj"), "dense")),
        (layer + r"attention\.(?:output\.dense|o_proj)", lambda i: Module(_vit_block(i, "attn", "out_proj"), "dense")),
        (layer + r"layernorm_before", lambda i: Module(_vit_block(i, "norm1"), "layernorm")),
        (layer + r"layernorm_after", lambda i: Module(_vit_block(i, "norm2"), "layernorm")),
        (layer + r"(?:intermediate\.dense|mlp\.fc1)", lambda i: Module(_vit_block(i, "mlp", "fc1"), "dense")),
        (layer + r"(?:output\.dense|mlp\.fc2)", lambda i: Module(_vit_block(i, "mlp", "fc2"), "dense")),
        (_HF_VIT_PREFIX + r"layernorm", lambda: Module(VIT + ("norm",), "layernorm")),
    ]
    return _first_match(rules, name)


def _huggingface_vit_parameter(key: str) -> Module | None:
    rules = [
        (_HF_VIT_PREFIX + r"embeddings\.cls_token", lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 0)),
        (_HF_VIT_PREFIX + r"embeddings\.distillation_token",
         lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 1)),
        (_HF_VIT_PREFIX + r"embeddings\.position_embeddings", lambda: Module(VIT, "pos_embed")),
        (_HF_VIT_PREFIX + r"embeddings\.mask_token", lambda: IGNORED),  # masked image modeling only
    ]
    return _first_match(rules, key)


def _unsupported(reason: str) -> Callable[..., Module]:
    return lambda *_: Module((reason,), "unsupported")


def _timm_vit_module(name: str) -> Module | None:
    rules = [
        (r"head|head_dist|attn_pool(\..+)?", lambda *_: IGNORED),
        (r"patch_embed\.proj", lambda: Module(VIT + ("patch_embed",), "conv")),
        (r"blocks\.(\d+)\.norm([12])", lambda i, n: Module(_vit_block(i, f"norm{n}"), "layernorm")),
        (r"blocks\.(\d+)\.attn\.qkv", lambda i: Module(_vit_block(i, "attn"), "fused_qkv")),
        (r"blocks\.(\d+)\.attn\.proj", lambda i: Module(_vit_block(i, "attn", "out_proj"), "dense")),
        (r"blocks\.(\d+)\.mlp\.fc([12])", lambda i, n: Module(_vit_block(i, "mlp", f"fc{n}"), "dense")),
        (r"norm", lambda: Module(VIT + ("norm",), "layernorm")),
        (r"blocks\.(\d+)\.ls[12]", _unsupported("layer scale (timm init_values): the ViT has none")),
        (r"blocks\.(\d+)\.attn\.[qk]_norm", _unsupported("qk-norm: the ViT has none")),
        (r"fc_norm", _unsupported("fc_norm (a norm after pooling, with `norm` an Identity): the ViT's "
                                  "features take the final `norm`, which this model lacks")),
        (r"norm_pre", _unsupported("norm_pre (a LayerNorm before the blocks, CLIP-style): the ViT has none")),
    ]
    return _first_match(rules, name)


def _timm_vit_parameter(key: str) -> Module | None:
    rules = [
        (r"cls_token", lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 0)),
        (r"dist_token", lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 1)),
        (r"reg_token", lambda: Module(VIT + ("prefix_tokens",), "prefix_token", 2)),
        (r"pos_embed", lambda: Module(VIT, "pos_embed")),
    ]
    return _first_match(rules, key)


MODULE_RESOLVERS = {
    "official": _official_module,
    "huggingface": _huggingface_module,
    "torchvision": _torchvision_module,
    "huggingface_vit": _huggingface_vit_module,
    "timm_vit": _timm_vit_module,
}


def _hf_family_resolver(layout: str) -> Callable[[str], Module | None]:
    """A Hugging Face DETR-family member's names (`convert_hf_detr_family`; kind "ignored":
    IGNORED), its ResNet ours."""
    def resolve(name: str) -> Module | None:
        backbone = re.fullmatch(hf_family.BACKBONE_KEY, name)
        if backbone:
            return _resnet_body_module(backbone[1])
        found = hf_family.module(layout, name)
        return None if found is None else IGNORED if Module(*found) == IGNORED else Module(*found)
    return resolve


MODULE_RESOLVERS.update({layout: _hf_family_resolver(layout) for layout in hf_family.LAYOUTS})
# Bare parameters (no module: cls_token, pos_embed), resolved from the whole key first.
PARAMETER_RESOLVERS = {
    "huggingface_vit": _huggingface_vit_parameter,
    "timm_vit": _timm_vit_parameter,
}


def detect_layout(keys: list[str]) -> str | None:
    """One of LAYOUTS, or None when the keys fit none of them."""
    keys = [k.removeprefix("detr.") for k in keys]  # a segmentation model's detector
    if any(k.startswith(("transformer.", "backbone.0.body.")) for k in keys):
        return "official"
    if hf_family.detect_layout(keys):
        return hf_family.detect_layout(keys)
    if any(k.startswith(("model.backbone.", "model.encoder.", "model.decoder.", "class_labels_classifier."))
           for k in keys):
        return "huggingface"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    if any(re.match(_HF_VIT_PREFIX + r"embeddings\.patch_embeddings\.", k) for k in keys):
        return "huggingface_vit"
    if any(k.startswith("patch_embed.proj.") for k in keys) and any(k.startswith("blocks.") for k in keys):
        return "timm_vit"
    return None


# ---------------------------------------------------------------------------------------
# Tensors -> Flax leaves.

_LEAF_NAMES = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "dense": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "layernorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "groupnorm": {"weight": ("params", "scale"), "bias": ("params", "bias")},
    "bn": {
        "weight": ("frozen_bn", "scale"), "bias": ("frozen_bn", "bias"),
        "running_mean": ("frozen_bn", "mean"), "running_var": ("frozen_bn", "var"),
    },
}


def _square_side(n: int) -> int | None:
    side = int(round(n**0.5))
    return side if side > 0 and side * side == n else None


def _map_pos_embed(module: Module, value: np.ndarray, num_prefix_tokens: int) -> list[tuple[Path, np.ndarray]] | str:
    """[1, P + g*g, E] -> prefix_pos_embed [P, E] and the pos_embed grid [g, g, E] (row-major).
    With P prefix tokens but only g*g rows (timm's no_embed_class: the prefix tokens get no
    position embedding), prefix_pos_embed is zeros."""
    if value.ndim != 3 or value.shape[0] != 1:
        return f"expected position embeddings [1, P + N, E], got shape {value.shape}"
    rows, width = value.shape[1:]
    side = _square_side(rows - num_prefix_tokens) if rows > num_prefix_tokens else None
    prefix = value[0, :num_prefix_tokens]
    if side is None and num_prefix_tokens and _square_side(rows):
        side, prefix = _square_side(rows), np.zeros((num_prefix_tokens, width), value.dtype)
    if side is None:
        return (f"{rows} positions are not {num_prefix_tokens} prefix tokens + a square grid of patches "
                "(non-square position grids are not supported)")
    leaves = [(("params",) + module.path + ("pos_embed",), value[0, -side * side:].reshape(side, side, width))]
    if num_prefix_tokens:
        leaves.append((("params",) + module.path + ("prefix_pos_embed",), prefix))
    return leaves


def _map_tensor(module: Module, param: str, value: np.ndarray,
                num_prefix_tokens: int = 0) -> list[tuple[Path, np.ndarray]] | str:
    """The Flax leaves of one PyTorch tensor, or a string saying why it cannot be mapped.
    num_prefix_tokens: the ViT's class/distillation/register tokens (kind "pos_embed")."""
    if module.kind == "unsupported":
        return module.path[0]
    if module.kind == "prefix_token":
        if value.ndim != 3 or value.shape[0] != 1:
            return f"expected a token [1, n, E], got shape {value.shape}"
        return [(("params",) + module.path, value[0])]
    if module.kind == "pos_embed":
        return _map_pos_embed(module, value, num_prefix_tokens)
    if module.kind == "embedding":
        if param != "weight":
            return f"unknown parameter {param!r} of an embedding"
        return [(("params",) + module.path, value)]
    if module.kind == "fused_qkv":
        fused = {"in_proj_weight": "kernel", "in_proj_bias": "bias", "weight": "kernel", "bias": "bias"}
        if param not in fused:
            return f"unknown parameter {param!r} of a fused attention"
        leaf = fused[param]
        if value.ndim != (2 if leaf == "kernel" else 1) or value.shape[0] % 3:
            return f"expected a fused [3E{', E' if leaf == 'kernel' else ''}] {param}, got shape {value.shape}"
        parts = np.split(value, 3, axis=0)  # PyTorch stacks q, k, v along the output dim
        if leaf == "kernel":
            parts = [p.T for p in parts]
        return [(("params",) + module.path + (f"{n}_proj", leaf), p) for n, p in zip("qkv", parts)]
    names = _LEAF_NAMES[module.kind]
    if param not in names:
        return f"unknown parameter {param!r} of a {module.kind} layer"
    collection, leaf = names[param]
    if module.kind == "conv" and leaf == "kernel":
        if value.ndim != 4:
            return f"expected a 4-D conv weight (OIHW), got shape {value.shape}"
        value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if module.kind == "dense" and leaf == "kernel":
        if value.ndim != 2:
            return f"expected a 2-D linear weight, got shape {value.shape}"
        value = value.T  # [out, in] -> [in, out]
    return [((collection,) + module.path + (leaf,), value)]


@dataclasses.dataclass
class MappedTensors:
    """Result of mapping a state dict: Flax leaves and what could not be mapped.

    leaves: {flax path: array}; sources: {flax path: the PyTorch key it came from};
    unmapped: "key: reason" for every tensor no rule covers; ignored: keys dropped on
    purpose (num_batches_tracked, the torchvision classifier).
    """

    leaves: dict[Path, np.ndarray]
    sources: dict[Path, str]
    unmapped: list[str]
    ignored: list[str]


def map_state_dict(state_dict: Mapping[str, np.ndarray], layout: str) -> MappedTensors:
    """Maps every tensor of a state dict in `layout` to Flax leaves (no model checks)."""
    resolve = MODULE_RESOLVERS[layout]
    resolve_parameter = PARAMETER_RESOLVERS.get(layout, lambda key: None)
    mapped = MappedTensors({}, {}, [], [])
    # A ViT's prefix tokens (class, distillation, registers) are one leaf, from several keys.
    num_prefix_tokens = sum(int(np.prod(value.shape[:-1])) for key, value in state_dict.items()
                            if getattr(resolve_parameter(key), "kind", None) == "prefix_token")
    prefix: list[tuple[int, str, np.ndarray]] = []
    for key, value in state_dict.items():
        module_name, _, param = key.rpartition(".")
        if param == "num_batches_tracked":
            mapped.ignored.append(key)
            continue
        module = resolve_parameter(key)
        if module is None:
            module = resolve(module_name) if module_name else None
        if module is IGNORED:
            mapped.ignored.append(key)
            continue
        if module is None:
            mapped.unmapped.append(f"{key}: no {layout} rule for this name")
            continue
        leaves = _map_tensor(module, param, value, num_prefix_tokens)
        if isinstance(leaves, str):
            mapped.unmapped.append(f"{key}: {leaves}")
            continue
        if module.kind == "prefix_token":
            prefix.append((module.order, key, leaves[0][1]))
            continue
        for path, array in leaves:
            if path in mapped.leaves:
                mapped.unmapped.append(f"{key}: maps to {'/'.join(path)}, already given by {mapped.sources[path]}")
                continue
            mapped.leaves[path] = np.ascontiguousarray(array, dtype=np.float32)
            mapped.sources[path] = key
    if prefix:  # class token, then distillation token or registers
        prefix.sort(key=lambda item: item[0])
        path = ("params",) + VIT + ("prefix_tokens",)
        mapped.leaves[path] = np.ascontiguousarray(np.concatenate([a for _, _, a in prefix]), dtype=np.float32)
        mapped.sources[path] = " + ".join(key for _, key, _ in prefix)
    return mapped


# ---------------------------------------------------------------------------------------
# What model do the tensors describe?


def _shape(leaves: Mapping[Path, np.ndarray], *path: str) -> tuple[int, ...] | None:
    array = leaves.get(path)
    return None if array is None else array.shape


def _indices(leaves: Mapping[Path, np.ndarray], parent: Path, pattern: str) -> list[tuple[str, ...]]:
    """Groups of `pattern` matched by the child names under `parent`, e.g. layer indices."""
    found = set()
    for path in leaves:
        if path[: len(parent)] == parent and len(path) > len(parent):
            match = re.fullmatch(pattern, path[len(parent)])
            if match:
                found.add(match.groups())
    return sorted(found, key=lambda g: tuple(int(x) for x in g))


def infer_backbone(leaves: Mapping[Path, np.ndarray]) -> tuple[str | None, str]:
    """(name in RESNETS or None, a description such as "depths (3, 4, 6, 3), ...")."""
    body = ("params",) + BODY
    blocks = _indices(leaves, body, r"layer(\d)_(\d+)")
    depths = tuple(sum(1 for s, _ in blocks if int(s) == stage) for stage in (1, 2, 3, 4))
    widths = tuple((_shape(leaves, *body, f"layer{s}_0", "conv1", "kernel") or (0,))[-1] for s in (1, 2, 3, 4))
    stem = (_shape(leaves, *body, "conv1", "kernel") or (0,))[-1]
    description = f"ResNet with depths {depths}, widths {widths}, stem {stem}"
    for name, spec in RESNETS.items():
        if (spec.depths, spec.widths, spec.stem_width) == (depths, widths, stem):
            return name, description
    return None, description


# ViT fields that the tensors determine beyond the variant (backbone_args when not the default).
VIT_WEIGHT_FIELDS = ("pos_grid", "num_prefix_tokens", "mlp_ratio")
# ... and those a Hugging Face model directory's config files give.
VIT_FILE_FIELDS = ("layer_norm_eps", "pixel_mean", "pixel_std")
_VIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ViT) if f.default is not dataclasses.MISSING}


def infer_vit(leaves: Mapping[Path, np.ndarray]) -> tuple[str | None, dict[str, Any], str]:
    """(name in VITS or None, {ViT field: value} the tensors give, a description such as
    "ViT with width 32, depth 2, patch size 8"). The fields: width, depth, patch_size and
    VIT_WEIGHT_FIELDS (absent tensors leave theirs out)."""
    vit = ("params",) + VIT
    fields: dict[str, Any] = {"depth": len(_indices(leaves, vit, r"blocks_(\d+)"))}
    patch = _shape(leaves, *vit, "patch_embed", "kernel")
    if patch is not None and len(patch) == 4:
        fields["patch_size"], fields["width"] = patch[0], patch[-1]
    grid = _shape(leaves, *vit, "pos_embed")
    if grid is not None:
        fields["pos_grid"] = tuple(grid[:2])
    tokens = _shape(leaves, *vit, "prefix_tokens")
    fields["num_prefix_tokens"] = 0 if tokens is None else tokens[0]
    hidden = _shape(leaves, *vit, "blocks_0", "mlp", "fc1", "kernel")
    if hidden is not None and "width" in fields:
        fields["mlp_ratio"] = hidden[-1] / fields["width"]
    description = (f"ViT with width {fields.get('width')}, depth {fields['depth']}, "
                   f"patch size {fields.get('patch_size')}")
    for name, spec in VITS.items():
        if (spec.width, spec.depth, spec.patch_size) == (fields.get("width"), fields["depth"], fields.get("patch_size")):
            return name, fields, description
    return None, fields, description


def _vit_backbone_args(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The ViT fields among VIT_WEIGHT_FIELDS + VIT_FILE_FIELDS that differ from the defaults."""
    return {k: fields[k] for k in VIT_WEIGHT_FIELDS + VIT_FILE_FIELDS
            if k in fields and fields[k] != _VIT_DEFAULTS[k]}


def infer_model(leaves: Mapping[Path, np.ndarray], layout: str) -> dict[str, Any]:
    """The model config fields (INFERRED_FIELDS) that the tensors determine.

    Fields whose tensors are absent are left out (the missing keys are reported anyway);
    "backbone" is None for a ResNet or ViT shape that matches no known backbone. A ViT
    layout gives "backbone" and "backbone_args" (pos_grid, num_prefix_tokens, mlp_ratio when
    they are not the ViT defaults); the ViT's num_heads is the variant's.
    """
    if layout in VIT_LAYOUTS:
        name, fields, _ = infer_vit(leaves)
        return {"backbone": name, "backbone_args": _vit_backbone_args(fields)}
    backbone, _ = infer_backbone(leaves)
    inferred: dict[str, Any] = {"backbone": backbone}
    if layout == "torchvision":
        return inferred
    if layout in hf_family.LAYOUTS:
        return {**inferred, **hf_family.infer_model(leaves, layout)}
    query = _shape(leaves, "params", "query_embed")
    if query is not None and len(query) == 2:
        inferred["num_queries"], inferred["hidden_dim"] = query
    classes = _shape(leaves, "params", "class_embed", "kernel")
    if classes is not None:
        inferred["num_classes"] = classes[-1] - 1
    transformer = ("params", "transformer")
    inferred["num_encoder_layers"] = len(_indices(leaves, transformer, r"encoder_layer(\d+)"))
    inferred["num_decoder_layers"] = len(_indices(leaves, transformer, r"decoder_layer(\d+)"))
    for stack in ("encoder_layer0", "decoder_layer0"):
        ffn = _shape(leaves, *transformer, stack, "ffn", "linear1", "kernel")
        if ffn is not None:
            inferred["dim_feedforward"] = ffn[-1]
            break
    inferred["pre_norm"] = ("params", "transformer", "encoder_norm", "scale") in leaves
    inferred["position_embedding"] = (
        "learned" if ("params", "position_embedding", "row_embed") in leaves else "sine"
    )
    inferred["masks"] = any(path[:2] == ("params", "mask_head") for path in leaves)
    return inferred


# ---------------------------------------------------------------------------------------
# Checks against the target model.


def expected_shapes(model_config: ml_collections.ConfigDict) -> dict[Path, tuple[int, ...]]:
    """{flax path: shape} of every variable of DETR built from the `model` config section."""
    flat = traverse_util.flatten_dict(variable_shapes(build_model(model_config)))
    return {path: leaf.shape for path, leaf in flat.items()}


def _config_mismatches(
    inferred: Mapping[str, Any], backbone_description: str, model_config, reinit_class_head: bool
) -> list[str]:
    """One line per inferred field that differs from the config (with what to do about it)."""
    problems = []
    for field, value in inferred.items():
        wanted = model_config[field]
        if value == wanted or (field == "num_classes" and reinit_class_head):
            continue
        line = f"model.{field}: checkpoint has {value!r}, config has {wanted!r}"
        if field == "backbone" and value is None:
            line = f"model.backbone: checkpoint has an unknown {backbone_description}, config has {wanted!r}"
        elif field == "num_classes":
            line += (" (to fine-tune on other classes, re-initialize the class head: "
                     "reinit_class_head=True / --reinit_class_head)")
        elif field == "num_queries":
            line += (" (the queries are trained with the decoder and are not re-initialized; set "
                     f"model.num_queries={value}: unused queries learn to predict 'no object')")
        problems.append(line)
    return problems


def _vit_mismatches(fields: Mapping[str, Any], name: str | None, description: str, model_config,
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


def _tree_problems(
    leaves: Mapping[Path, np.ndarray], sources: Mapping[Path, str], expected: Mapping[Path, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, not in the model, shape mismatches), each a sorted list of lines."""
    shapes = {p: jax.ShapeDtypeStruct(tuple(s), jnp.float32) for p, s in expected.items()}
    missing, extra, mismatched = compare_trees(shapes, leaves)
    return (
        sorted("/".join(p) for p in missing),
        sorted(f"{'/'.join(p)} (from {sources[p]})" for p in extra),
        sorted(f"{'/'.join(p)} (from {sources[p]}): checkpoint {tuple(leaves[p].shape)}, model {tuple(expected[p])}"
               for p in mismatched),
    )


def _section(title: str, lines: list[str]) -> list[str]:
    return [f"  {title} ({len(lines)}):"] + [f"    {line}" for line in lines] if lines else []


def _class_head(model_config, seed: int) -> dict[Path, np.ndarray]:
    """A freshly initialized class head (PyTorch nn.Linear init, as in DETR) as flat leaves."""
    num_logits = CLASS_CONVENTIONS[class_convention_name(model_config)].num_logits(model_config.num_classes)
    head = torch_dense(num_logits, model_config.hidden_dim, "class_embed", jnp.float32)
    params = head.init(jax.random.key(seed), jnp.zeros((1, model_config.hidden_dim), jnp.float32))["params"]
    return {("params", "class_embed", name): np.asarray(value) for name, value in params.items()}


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_config: ml_collections.ConfigDict,
    *,
    reinit_class_head: bool = False,
    seed: int = 0,
    source: str = "state dict",
    vit_settings: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    """Converts a PyTorch state dict (numpy arrays) for the model of `model_config`.

    Args:
      state_dict: {PyTorch key: array} in one of LAYOUTS (see `load_state_dict`).
      model_config: the `model` config section the variables must fit.
      reinit_class_head: replace the class head by a fresh one (PyTorch nn.Linear init,
        seeded by `seed`); needed when model_config.num_classes differs from the checkpoint.
      source: named in error messages (the file).
      vit_settings: for a ViT layout, ViT fields read beside the weights (VIT_FILE_FIELDS,
        see `hf_vit_settings`), checked against the config as the inferred ones are.
    Returns:
      (variables, metadata): variables {"params": ..., "frozen_bn": ...} of numpy float32
      arrays, the full tree of the model, or only its backbone for a torchvision ResNet or
      a ViT; metadata: layout, inferred model, contents, ignored keys, notes.
    Raises:
      ConversionError listing every problem found.
    """
    keys = list(state_dict)
    layout = detect_layout(keys)
    if layout is None:
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        raise ConversionError(
            f"{source}: not a DETR, ResNet or ViT checkpoint in a known layout ({', '.join(LAYOUTS)}): "
            f"expected keys such as 'transformer.encoder.layers.0...' (official DETR), "
            f"'model.backbone...' (Hugging Face DETR), 'conv1.weight' + 'layer1.0...' "
            f"(torchvision ResNet), 'embeddings.patch_embeddings...' (Hugging Face ViT/DeiT) or "
            f"'patch_embed.proj.weight' + 'blocks.0...' (timm ViT); found {len(keys)} keys: {shown or 'none'}"
        )
    if layout not in VIT_LAYOUTS and model_config.backbone_norm != "frozen_bn":
        raise ConversionError(
            f"{source}: PyTorch DETR and ResNet checkpoints have BatchNorm statistics, which only "
            f"model.backbone_norm='frozen_bn' holds; the config has {model_config.backbone_norm!r}")
    mapped = map_state_dict(state_dict, layout)
    leaves = dict(mapped.leaves)
    notes = []
    sources = dict(mapped.sources)
    if layout in VIT_LAYOUTS:
        vit_name, vit_fields, backbone_description = infer_vit(leaves)
        vit_fields = {**vit_fields, **(vit_settings or {})}
        inferred = {"backbone": vit_name, "backbone_args": _vit_backbone_args(vit_fields)}
        target = BACKBONES[model_config.backbone](model_config, jnp.float32) if model_config.backbone in VITS else None
        if target is not None:
            notes.append(f"the ViT's num_heads is not in the weights: the config's ({target.num_heads}) is used")
            if vit_fields["num_prefix_tokens"] and not target.num_prefix_tokens:
                # ViTDet's choice (and windowed attention's requirement): drop the class token.
                leaves = {p: a for p, a in leaves.items()
                          if p[:3] not in (("params",) + VIT + ("prefix_tokens",), ("params",) + VIT + ("prefix_pos_embed",))}
                notes.append(f"the checkpoint's {vit_fields['num_prefix_tokens']} class/distillation/register "
                             "token(s) and their position embeddings dropped: the config's ViT has num_prefix_tokens=0")
                vit_fields["num_prefix_tokens"] = 0
    else:
        inferred = infer_model(leaves, layout)
        _, backbone_description = infer_backbone(leaves)

    expected = expected_shapes(model_config)
    if layout in BACKBONE_LAYOUTS:
        expected = {p: s for p, s in expected.items() if p[1] == "backbone"}
    elif reinit_class_head:
        leaves = {p: a for p, a in leaves.items() if p[:2] != ("params", "class_embed")}
        fresh_head = _class_head(model_config, seed)
        leaves.update(fresh_head)
        sources.update({p: "re-initialized class head" for p in fresh_head})
        notes.append(
            f"class head re-initialized for {model_config.num_classes} classes (seed {seed}); "
            f"the checkpoint's head had {inferred.get('num_classes')} classes"
        )
    if layout in VIT_LAYOUTS:
        mismatches = _vit_mismatches(vit_fields, vit_name, backbone_description, model_config, target)
    else:
        mismatches = _config_mismatches(inferred, backbone_description, model_config, reinit_class_head)
    problems = _section("model config: checkpoint vs config", mismatches)
    problems += _section("checkpoint keys that cannot be mapped", mapped.unmapped)
    missing, extra, mismatched = _tree_problems(leaves, sources, expected)
    problems += _section("model variables missing from the checkpoint", missing)
    problems += _section("checkpoint variables the model does not have", extra)
    problems += _section("shape mismatches", mismatched)
    if problems:
        raise ConversionError(f"{source}: cannot convert this {layout} checkpoint to the model:\n" + "\n".join(problems))

    if "dc5" in source.lower() and not model_config.dilation:
        notes.append("the file name says DC5 but model.dilation is False: DC5 models need model.dilation=True")
    metadata = {
        "layout": layout,
        "contents": "backbone" if layout in BACKBONE_LAYOUTS else "detr",
        "inferred_model": inferred,
        "ignored_keys": mapped.ignored,
        "reinitialized": ["params/class_embed"] if reinit_class_head and layout not in BACKBONE_LAYOUTS else [],
        "notes": notes,
    }
    return traverse_util.unflatten_dict(dict(sorted(leaves.items()))), metadata


# ---------------------------------------------------------------------------------------
# Files.


def _checkpoint_file(path: pathlib.Path) -> pathlib.Path:
    """The weights file of `path`, a file or a Hugging Face model directory."""
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise ConversionError(f"{path}: directory holds neither model.safetensors nor pytorch_model.bin")
    return path


def _to_numpy(value) -> np.ndarray | None:
    import torch  # an optional extra (detr-jax[torch]), imported only to read a PyTorch file

    if not isinstance(value, torch.Tensor):
        return None
    if value.is_floating_point():
        return value.detach().to(torch.float32).cpu().numpy()
    return value.detach().cpu().numpy()


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint (.pth/.pt/.bin via torch.load, or .safetensors) as numpy.

    Unwraps {"model": ...} (official DETR) and {"state_dict": ...}, strips a DataParallel
    "module." prefix. Floating tensors become float32. Needs torch (`pip install
    detr-jax[torch]`). Loading never runs code from the file (`weights_only=True`): a file
    that is not a PyTorch checkpoint, or holds objects only a full unpickle would load, is
    refused with a ConversionError saying so.
    """
    path = _checkpoint_file(pathlib.Path(path))
    try:  # torch and safetensors are an optional extra (detr-jax[torch]), needed only here
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading PyTorch checkpoints needs torch (pip install 'detr-jax[torch]')") from e
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            # Official DETR training checkpoints also store their argparse arguments.
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (pickle, zip, runtime); name the file
        # torch's weights-only refusal advises weights_only=False, i.e. unpickling whatever
        # the file holds (arbitrary code): say what the file is instead, never pass that on.
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise _refused(path, e) from None
        raise ConversionError(f"{path}: cannot be read as a PyTorch checkpoint: {type(e).__name__}: {e}") from e
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    state_dict, not_tensors = {}, []
    for key, value in raw.items():
        array = _to_numpy(value)
        if array is None:
            not_tensors.append(f"{key} ({type(value).__name__})")
        else:
            state_dict[key] = array
    if not_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {', '.join(not_tensors)}")
    return state_dict


def _refused(path: pathlib.Path, error: Exception) -> ConversionError:
    """Why torch's weights-only load refused `path`: not a checkpoint, or not a safe one."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not (zipfile.is_zipfile(path) or head.startswith(b"\x80")):  # torch.save: a zip, or (legacy) a pickle
        return ConversionError(
            f"{path}: not a PyTorch checkpoint: neither a zip archive (torch.save) nor a pickle "
            f"(it starts with {head!r})"
        )
    needed = re.search(r"GLOBAL ([\w.]+)", str(error))
    if needed:
        return ConversionError(
            f"{path}: not a safe PyTorch checkpoint: it needs {needed[1]}, which a weights-only load "
            "refuses (unpickling it could run arbitrary code); convert a file that holds only "
            "tensors, such as a saved model.state_dict()"
        )
    return ConversionError(
        f"{path}: not a PyTorch checkpoint, or not a safe one: a weights-only load (which runs no "
        "code from the file) cannot read it"
    )


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
            if value is not None and value != _VIT_DEFAULTS[field]:
                settings[field] = value
    return settings


def target_config(
    state_dict: Mapping[str, np.ndarray], config, overrides: Mapping[str, Any] | None, source: str,
    vit_settings: Mapping[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """The config to convert for: the given one (or file, with `overrides`), else the
    defaults with the model shape inferred from the weights (and a ViT's `vit_settings`),
    then `overrides`."""
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if config is not None:
        return load_config(config, overrides)
    inferred = {}
    layout = detect_layout(list(state_dict))
    if layout is not None:
        inferred = infer_model(map_state_dict(state_dict, layout).leaves, layout)
    if layout in VIT_LAYOUTS and vit_settings:
        inferred["backbone_args"] = {**inferred["backbone_args"], **vit_settings}
    model = {field: value for field, value in inferred.items() if value is not None}
    return config_from_dict({"model": model}, source=source, overrides=overrides)


def convert_file(
    src: str | pathlib.Path,
    config: ml_collections.ConfigDict | str | pathlib.Path | None = None,
    reinit_class_head: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    """Reads and converts the PyTorch checkpoint `src` (a file, or a Hugging Face model
    directory); writes nothing (`detr-jax convert` saves the result with
    `checkpoint.save_variables`).

    Args:
      config: the config the weights must fit: a loaded config, a config file (then
        `overrides`, {"model.num_heads": 4}, are applied to it), or None: the model shape is
        inferred from the weights, num_heads and dilation come from the defaults, and
        `overrides` apply on top.
      reinit_class_head: start a new class head (fine-tuning on other classes).
      A Hugging Face ViT/DeiT's folder (of `src`, or of the file) may hold config.json and
      preprocessor_config.json: their layer_norm_eps and image_mean/std go into the
      inferred model.backbone_args (see `hf_vit_settings`).
    Returns:
      (variables, metadata): see `convert_state_dict`; the metadata also names the source
      file (and its sha256), the config file and the model config.
    Raises:
      ConversionError (every problem listed), ConfigError.
    """
    src_path = _checkpoint_file(pathlib.Path(src).absolute())
    state_dict = load_state_dict(src_path)
    vit_settings = None
    if detect_layout(list(state_dict)) == "huggingface_vit":  # its folder's config files
        vit_settings = hf_vit_settings(src_path.parent)
    config_file = None if config is None or isinstance(config, ml_collections.ConfigDict) else config
    config = target_config(state_dict, config, overrides, str(src_path), vit_settings)
    variables, metadata = convert_state_dict(
        state_dict, config.model, reinit_class_head=reinit_class_head, seed=config.seed, source=str(src_path),
        vit_settings=vit_settings,
    )
    if vit_settings:
        metadata["notes"].append(
            f"from {src_path.parent}'s config files: {', '.join(f'{k}={v!r}' for k, v in vit_settings.items())} "
            "(in model.backbone_args)")
    model = {k: config.model[k] for k in config.model.keys()}
    if metadata["contents"] == "backbone":
        model = {"backbone": config.model.backbone}
        if metadata["layout"] in VIT_LAYOUTS:
            model["backbone_args"] = dict(config.model.backbone_args)
    metadata.update(
        source=str(src_path),
        source_sha256=file_sha256(src_path),
        config_file=None if config_file is None else str(pathlib.Path(config_file).absolute()),
        model=model,
        not_inferred_from_weights=list(NOT_INFERABLE_FIELDS),
        converted_by=f"detr-jax {detr_jax.__version__}",
    )
    return variables, metadata
