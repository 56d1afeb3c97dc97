"""The checkpoint layouts: which one a state dict's keys are, each layout's rules (module
names -> our paths), and the model a layout's converted tensors describe."""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import numpy as np

from detr_jax.convert import huggingface_detr_family as hf_family
from detr_jax.convert import huggingface_rt_detr
from detr_jax.convert import official_detr_family as official_family
from detr_jax.convert import official_dino
from detr_jax.convert.huggingface_detr import huggingface_module
from detr_jax.convert.leaves import indices, shape
from detr_jax.convert.official_detr import official_module
from detr_jax.convert.resnet import infer_backbone, torchvision_module
from detr_jax.convert.rules import Path
from detr_jax.convert.vit import (HF_VIT_PREFIX, huggingface_vit_module, huggingface_vit_parameter, infer_vit,
                                  timm_vit_module, timm_vit_parameter, vit_backbone_args)

LAYOUTS = ("official", "huggingface", "torchvision", "huggingface_vit", "timm_vit", *hf_family.LAYOUTS,
           *official_family.LAYOUTS, *official_dino.LAYOUTS, *huggingface_rt_detr.LAYOUTS)
# Layouts that hold only an ImageNet backbone: converted to the backbone subtree.
BACKBONE_LAYOUTS = ("torchvision", "huggingface_vit", "timm_vit")
VIT_LAYOUTS = ("huggingface_vit", "timm_vit")

MODULE_RESOLVERS = {
    "official": official_module,
    "huggingface": huggingface_module,
    "torchvision": torchvision_module,
    "huggingface_vit": huggingface_vit_module,
    "timm_vit": timm_vit_module,
}


MODULE_RESOLVERS.update({layout: functools.partial(hf_family.module, layout) for layout in hf_family.LAYOUTS})
MODULE_RESOLVERS.update({layout: functools.partial(official_family.module, layout)
                         for layout in official_family.LAYOUTS})
MODULE_RESOLVERS[official_dino.LAYOUT] = functools.partial(official_dino.module, official_dino.LAYOUT)
MODULE_RESOLVERS.update({layout: huggingface_rt_detr.module for layout in huggingface_rt_detr.LAYOUTS})
# Bare parameters (no module: cls_token, pos_embed), resolved from the whole key first.
PARAMETER_RESOLVERS = {
    "huggingface_vit": huggingface_vit_parameter,
    "timm_vit": timm_vit_parameter,
}
PARAMETER_RESOLVERS.update({layout: functools.partial(hf_family.parameter, layout) for layout in hf_family.LAYOUTS})
PARAMETER_RESOLVERS.update({layout: functools.partial(official_family.parameter, layout)
                            for layout in official_family.LAYOUTS})
PARAMETER_RESOLVERS[official_dino.LAYOUT] = functools.partial(official_dino.parameter, official_dino.LAYOUT)
# Keys a layout's checkpoints may lack because they are tied copies of others, saved once:
# state dict -> {missing key: the key it copies}.
TIED_COPIES = {layout: functools.partial(hf_family.tied_copies, layout) for layout in hf_family.LAYOUTS}


def detect_layout(keys: list[str]) -> str | None:
    """One of LAYOUTS, or None when the keys fit none of them."""
    keys = [k.removeprefix("detr.") for k in keys]  # a segmentation model's detector
    # Before Hugging Face DETR's: RT-DETR's keys are `model.backbone.*`, `model.decoder.*` too.
    if huggingface_rt_detr.detect_layout(keys):
        return huggingface_rt_detr.detect_layout(keys)
    # Before Deformable DETR's: DINO's keys are a Deformable DETR's and more.
    if official_dino.detect_layout(keys):
        return official_dino.LAYOUT
    # Before official DETR's: the official family members' keys are `transformer.*` too.
    if official_family.detect_layout(keys):
        return official_family.detect_layout(keys)
    if any(k.startswith(("transformer.", "backbone.0.body.")) for k in keys):
        return "official"
    if hf_family.detect_layout(keys):
        return hf_family.detect_layout(keys)
    if any(k.startswith(("model.backbone.", "model.encoder.", "model.decoder.", "class_labels_classifier."))
           for k in keys):
        return "huggingface"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    if any(re.match(HF_VIT_PREFIX + r"embeddings\.patch_embeddings\.", k) for k in keys):
        return "huggingface_vit"
    if any(k.startswith("patch_embed.proj.") for k in keys) and any(k.startswith("blocks.") for k in keys):
        return "timm_vit"
    return None


def infer_model(leaves: Mapping[Path, np.ndarray], layout: str) -> dict[str, Any]:
    """The model config fields (converter.INFERRED_FIELDS) that the tensors determine.

    Fields whose tensors are absent are left out (the missing keys are reported anyway);
    "backbone" is None for a ResNet or ViT shape that matches no known backbone. A ViT
    layout gives "backbone" and "backbone_args" (pos_grid, num_prefix_tokens, mlp_ratio when
    they are not the ViT defaults); the ViT's num_heads is the variant's.
    """
    if layout in VIT_LAYOUTS:
        name, fields, _ = infer_vit(leaves)
        return {"backbone": name, "backbone_args": vit_backbone_args(fields)}
    backbone, _ = infer_backbone(leaves)
    inferred: dict[str, Any] = {"backbone": backbone}
    if layout == "torchvision":
        return inferred
    if layout in hf_family.LAYOUTS:
        return {**inferred, **hf_family.infer_model(leaves, layout)}
    if layout in official_family.LAYOUTS:
        return {**inferred, **official_family.infer_model(leaves, layout)}
    if layout == official_dino.LAYOUT:
        return {**inferred, **official_dino.infer_model(leaves)}
    if layout in huggingface_rt_detr.LAYOUTS:
        return {**inferred, **huggingface_rt_detr.infer_model(leaves)}
    query = shape(leaves, "params", "query_embed")
    if query is not None and len(query) == 2:
        inferred["num_queries"], inferred["hidden_dim"] = query
    classes = shape(leaves, "params", "class_embed", "kernel")
    if classes is not None:
        inferred["num_classes"] = classes[-1] - 1
    transformer = ("params", "transformer")
    inferred["num_encoder_layers"] = len(indices(leaves, transformer, r"encoder_layer(\d+)"))
    inferred["num_decoder_layers"] = len(indices(leaves, transformer, r"decoder_layer(\d+)"))
    for stack in ("encoder_layer0", "decoder_layer0"):
        ffn = shape(leaves, *transformer, stack, "ffn", "linear1", "kernel")
        if ffn is not None:
            inferred["dim_feedforward"] = ffn[-1]
            break
    inferred["pre_norm"] = ("params", "transformer", "encoder_norm", "scale") in leaves
    inferred["position_embedding"] = (
        "learned" if ("params", "position_embedding", "row_embed") in leaves else "sine"
    )
    inferred["masks"] = any(path[:2] == ("params", "mask_head") for path in leaves)
    return inferred
