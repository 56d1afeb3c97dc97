"""Hugging Face transformers' DETR-family checkpoints: key names -> our parameter paths,
and the model they describe. `detr_jax.convert.layouts` dispatches here (layouts,
detection, inference); `tensors` and `converter` do the tensor work (transposes, BatchNorm
statistics, the checks against the target model).

  huggingface_conditional_detr  `ConditionalDetrForObjectDetection`, in transformers 5's
      names (`model.decoder.layers.{i}.self_attn.q_content_proj`, `encoder_attn.
      q_pos_sine_proj`, `o_proj`, `mlp.fc1`) or the saved names of earlier versions and the
      Hub (`sa_qcontent_proj`, `ca_qpos_sine_proj`, `self_attn.out_proj`, `fc1`). The
      official Atten4Vis/ConditionalDETR layout (fused `in_proj_weight`, `transformer.*`)
      is `official_detr_family`'s.
  huggingface_dab_detr  `DabDetrForObjectDetection` (`model.query_refpoint_embeddings`,
      `self_attn.self_attn_query_content_proj`, `cross_attn.cross_attn_query_pos_sine_proj`,
      `mlp.activation_fn` (PReLU), ...); `model.decoder.bbox_embed`, tied to
      `bbox_predictor`, is ignored. The official IDEA-Research/DAB-DETR layout is
      `official_detr_family`'s.
  huggingface_deformable_detr  `DeformableDetrForObjectDetection` without box refinement
      (`model.level_embed`, `model.input_proj.{l}.{0,1}` (conv, GroupNorm),
      `model.encoder.layers.{i}.self_attn.sampling_offsets`, `model.query_position_embeddings`,
      `model.reference_points`): one class head and one box head for every decoder layer,
      `class_embed.{i}` and `bbox_embed.{i}` tied copies of each other (all that are present
      must be equal).
  huggingface_deformable_detr_box_refine  the same with_box_refine (and two_stage: the
      proposal layers `model.enc_output`, `model.pos_trans` and their norms, and the heads
      `{class,bbox}_embed.{L}`): a head per layer, `class_embed.{i}` -> class_embed_{i},
      `bbox_embed.{i}` -> bbox_embed_{i}; `model.decoder.{class,bbox}_embed.{i}`, tied
      copies of them (the ones transformers 5 keeps when it saves), go to the same place.
      The official fundamentalvision/Deformable-DETR layout (`transformer.*`, fused
      decoder self-attention `in_proj_weight`; plain, box-refine and two-stage) is
      `official_detr_family`'s, converted to these layouts' paths.

The ResNet body (`model.backbone[.conv_encoder].model.*`, native or timm names) goes to
the ResNet rules of `detr_jax.convert.resnet`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from detr_jax.convert.resnet import resnet_body_module
from detr_jax.convert.rules import IGNORED, Module, Path, first_match

CONDITIONAL = "huggingface_conditional_detr"
DAB = "huggingface_dab_detr"
DEFORMABLE = "huggingface_deformable_detr"
DEFORMABLE_REFINE = "huggingface_deformable_detr_box_refine"
LAYOUTS = (CONDITIONAL, DAB, DEFORMABLE, DEFORMABLE_REFINE)
ARCHS = {CONDITIONAL: "conditional_detr", DAB: "dab_detr", DEFORMABLE: "deformable_detr",
         DEFORMABLE_REFINE: "deformable_detr"}
QUERIES = {CONDITIONAL: "query_embed", DAB: "refpoint_embed"}  # [Q, E] or [Q, 4]: the queries' parameter


def detect_layout(keys: list[str]) -> str | None:
    """One of LAYOUTS, or None when the keys are no DETR-family member's read here."""
    if any(re.search(r"\.(?:encoder_attn\.q_pos_sine_proj|ca_qpos_sine_proj)\.", k) for k in keys):
        return CONDITIONAL
    if any(".cross_attn.cross_attn_query_pos_sine_proj." in k for k in keys):
        return DAB
    if "model.level_embed" in keys and any(re.match(r"model\.encoder\.layers\.\d+\.self_attn\.sampling_offsets\.", k)
                                           for k in keys):
        return DEFORMABLE_REFINE if any(k.startswith("model.decoder.bbox_embed.") for k in keys) else DEFORMABLE
    return None


def mlp(path: Path) -> Callable[[str], Module]:
    """An MLP's `layers.{j}` -> our `layers_{j}`."""
    return lambda j: Module(path + (f"layers_{j}",), "dense")


# Earlier transformers' (and the Hub's) names of the conditional attentions' projections, which are
# the official Atten4Vis/ConditionalDETR and IDEA-Research/DAB-DETR names too (official_detr_family).
_SAVED_PROJECTIONS = {"qcontent": "q_content", "qpos": "q_pos", "kcontent": "k_content", "kpos": "k_pos", "v": "v",
                      "qpos_sine": "q_pos_sine"}


def _encoder_layer(index: str, name: str) -> Module | None:
    return encoder_layer((f"encoder_layer{index}",), name)


def encoder_layer(layer: Path, name: str) -> Module | None:
    """A post-norm encoder layer's module `name` (transformers' DETR-family names) -> our
    `EncoderLayer` at `layer`."""
    return first_match([
        (r"self_attn\.([qkv])_proj", lambda p: Module(layer + ("self_attn", f"{p}_proj"), "dense")),
        (r"self_attn\.(?:o|out)_proj", lambda: Module(layer + ("self_attn", "out_proj"), "dense")),
        (r"(?:mlp\.)?fc([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"self_attn_layer_norm", lambda: Module(layer + ("norm1",), "layernorm")),
        (r"final_layer_norm", lambda: Module(layer + ("norm2",), "layernorm")),
        (r"activation_fn", lambda: Module(layer + ("ffn", "prelu"), "embedding")),
    ], name)


def conditional_decoder_layer(index: str, name: str) -> Module | None:
    """`model.decoder.layers.{index}.<name>` -> our decoder layer's module (transformers 5's
    names or the saved ones; the saved `sa_*`/`ca_*` projections are the official names,
    which official_detr_family reads with this rule)."""
    layer = ("decoder", f"layer{index}")
    attention = {"self_attn": "self_attn", "encoder_attn": "cross_attn", "sa": "self_attn", "ca": "cross_attn"}
    return first_match([
        (r"(self_attn|encoder_attn)\.(q_content|q_pos|k_content|k_pos|v|q_pos_sine)_proj",
         lambda a, p: Module(layer + (attention[a], f"{p}_proj"), "dense")),
        (r"(self_attn|encoder_attn)\.(?:o|out)_proj", lambda a: Module(layer + (attention[a], "out_proj"), "dense")),
        (r"(sa|ca)_(qcontent|qpos|kcontent|kpos|v|qpos_sine)_proj",
         lambda a, p: Module(layer + (attention[a], f"{_SAVED_PROJECTIONS[p]}_proj"), "dense")),
        (r"(?:mlp\.)?fc([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"self_attn_layer_norm", lambda: Module(layer + ("norm1",), "layernorm")),
        (r"encoder_attn_layer_norm", lambda: Module(layer + ("norm2",), "layernorm")),
        (r"final_layer_norm", lambda: Module(layer + ("norm3",), "layernorm")),
    ], name)


_DAB_PROJECTIONS = {"query_content": "q_content", "query_pos": "q_pos", "key_content": "k_content",
                    "key_pos": "k_pos", "value": "v", "query_pos_sine": "q_pos_sine"}


def _dab_decoder_layer(index: str, name: str) -> Module | None:
    layer = ("decoder", f"layer{index}")
    norm = {"self_attn.self_attn": "norm1", "cross_attn.cross_attn": "norm2", "mlp.final": "norm3"}
    return first_match([
        (r"(self_attn|cross_attn)\.\1_(query_content|query_pos|key_content|key_pos|value|query_pos_sine)_proj",
         lambda a, p: Module(layer + (a, f"{_DAB_PROJECTIONS[p]}_proj"), "dense")),
        (r"(self_attn|cross_attn)\.\1\.output_proj", lambda a: Module(layer + (a, "out_proj"), "dense")),
        (r"(self_attn\.self_attn|cross_attn\.cross_attn|mlp\.final)_layer_norm", lambda n: Module(layer + (norm[n],), "layernorm")),
        (r"mlp\.fc([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"mlp\.activation_fn", lambda: Module(layer + ("ffn", "prelu"), "embedding")),
    ], name)


_DEFORMABLE_ATTENTION = r"(sampling_offsets|attention_weights|value_proj|output_proj)"


def _deformable_encoder_layer(index: str, name: str) -> Module | None:
    layer = ("encoder", f"layer{index}")
    return first_match([
        (r"self_attn\." + _DEFORMABLE_ATTENTION, lambda p: Module(layer + ("self_attn", p), "dense")),
        (r"(?:mlp\.)?fc([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"self_attn_layer_norm", lambda: Module(layer + ("norm1",), "layernorm")),
        (r"final_layer_norm", lambda: Module(layer + ("norm2",), "layernorm")),
    ], name)


def deformable_decoder_layer(index: str, name: str) -> Module | None:
    """`model.decoder.layers.{index}.<name>` of a deformable decoder (Deformable DETR's,
    RT-DETR's) -> our `DeformableDecoderLayer`'s module."""
    layer = ("decoder", f"layer{index}")
    return first_match([
        (r"self_attn\.([qkv])_proj", lambda p: Module(layer + ("self_attn", f"{p}_proj"), "dense")),
        (r"self_attn\.(?:o|out)_proj", lambda: Module(layer + ("self_attn", "out_proj"), "dense")),
        (r"encoder_attn\." + _DEFORMABLE_ATTENTION, lambda p: Module(layer + ("cross_attn", p), "dense")),
        (r"(?:mlp\.)?fc([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"self_attn_layer_norm", lambda: Module(layer + ("norm1",), "layernorm")),
        (r"encoder_attn_layer_norm", lambda: Module(layer + ("norm2",), "layernorm")),
        (r"final_layer_norm", lambda: Module(layer + ("norm3",), "layernorm")),
    ], name)


_POSITION = {"row": "row_embed", "column": "col_embed"}
_COMMON_RULES = [
    (r"model\.backbone\.(?:conv_encoder\.)?model\.(.+)", resnet_body_module),
    (r"model\.position_embedding\.(row|column)_embeddings", lambda rc: Module(("position_embedding", _POSITION[rc]),
                                                                        "embedding")),
    (r"model\.input_projection", lambda: Module(("input_proj",), "conv")),
    (r"model\.encoder\.layers\.(\d+)\.(.+)", _encoder_layer),
    (r"model\.decoder\.layernorm", lambda: Module(("decoder", "norm"), "layernorm")),
    (r"model\.decoder\.(query_scale|ref_point_head)\.layers\.(\d+)", lambda m, j: mlp(("decoder", m))(j)),
]

_DEFORMABLE_RULES = [
    *_COMMON_RULES[:2],  # the ResNet body, learned position embeddings
    (r"model\.input_proj\.(\d+)\.0", lambda level: Module(("input_proj", f"conv{level}"), "conv")),
    (r"model\.input_proj\.(\d+)\.1", lambda level: Module(("input_proj", f"norm{level}"), "groupnorm")),
    (r"model\.encoder\.layers\.(\d+)\.(.+)", _deformable_encoder_layer),
    (r"model\.decoder\.layers\.(\d+)\.(.+)", deformable_decoder_layer),
    (r"model\.query_position_embeddings", lambda: Module(("query_embed",), "embedding")),
    (r"model\.(reference_points|enc_output|pos_trans)", lambda m: Module((m,), "dense")),
    (r"model\.(enc_output_norm|pos_trans_norm)", lambda m: Module((m,), "layernorm")),
]

_RULES = {
    CONDITIONAL: [
        *_COMMON_RULES,
        (r"model\.query_position_embeddings", lambda: Module(("query_embed",), "embedding")),
        (r"model\.decoder\.layers\.(\d+)\.(.+)", conditional_decoder_layer),
        (r"class_labels_classifier", lambda: Module(("class_embed",), "dense")),
        (r"bbox_predictor\.layers\.(\d+)", mlp(("bbox_embed",))),
    ],
    DAB: [
        *_COMMON_RULES,
        (r"model\.query_refpoint_embeddings", lambda: Module(("refpoint_embed",), "embedding")),
        (r"model\.encoder\.query_scale\.layers\.(\d+)", mlp(("encoder_query_scale",))),
        (r"model\.decoder\.layers\.(\d+)\.(.+)", _dab_decoder_layer),
        (r"model\.decoder\.ref_anchor_head\.layers\.(\d+)", mlp(("decoder", "ref_anchor_head"))),
        (r"model\.decoder\.bbox_embed\.layers\.\d+", lambda: IGNORED),
        (r"class_embed", lambda: Module(("class_embed",), "dense")),
        (r"bbox_predictor\.layers\.(\d+)", mlp(("decoder", "bbox_embed"))),
    ],
    DEFORMABLE: [
        *_DEFORMABLE_RULES,
        (r"class_embed\.\d+", lambda: Module(("class_embed",), "dense")),
        (r"bbox_embed\.\d+\.layers\.(\d+)", mlp(("bbox_embed",))),
    ],
    DEFORMABLE_REFINE: [
        *_DEFORMABLE_RULES,
        (r"(?:model\.decoder\.)?class_embed\.(\d+)", lambda i: Module((f"class_embed_{i}",), "dense")),
        (r"(?:model\.decoder\.)?bbox_embed\.(\d+)\.layers\.(\d+)", lambda i, j: mlp((f"bbox_embed_{i}",))(j)),
    ],
}


def module(layout: str, name: str) -> Module | None:
    """Where the PyTorch module `name` of a `layout` checkpoint goes, or None when no rule
    covers it."""
    return first_match(_RULES[layout], name)


def tied_copies(layout: str, state_dict: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{key: the key it is a tied copy of} for the keys a checkpoint lacks because
    transformers 5 saves tied weights once: a box-refine model that is not two-stage ties
    its class heads class_embed.{i} to class_embed.0 (its `_tied_weights_keys`; the box
    heads stay per layer), so its own saves hold class_embed.0 alone (official Deformable
    DETR's checkpoints, and transformers' loads of them, have one head per layer)."""
    if layout != DEFORMABLE_REFINE or any(k.startswith("model.enc_output.") for k in state_dict):
        return {}
    layers = {m.group(1) for k in state_dict if (m := re.match(r"model\.decoder\.layers\.(\d+)\.", k))}
    return {f"class_embed.{i}.{p}": f"class_embed.0.{p}" for i in range(1, len(layers)) for p in ("weight", "bias")
            if f"class_embed.{i}.{p}" not in state_dict and f"class_embed.0.{p}" in state_dict}


def parameter(layout: str, key: str) -> Module | None:
    """A bare parameter (an nn.Parameter, no module of its own) of a `layout` checkpoint:
    Deformable DETR's level embedding."""
    return Module(("level_embed",), "parameter") if layout in (DEFORMABLE, DEFORMABLE_REFINE) and \
        key == "model.level_embed" else None


def _count(leaves: Mapping[Path, np.ndarray], pattern: str) -> int:
    """How many distinct groups of `pattern` match the joined parameter paths."""
    return len({m.groups() for p in leaves if (m := re.fullmatch(pattern, "/".join(p)))})


def infer_model(leaves: Mapping[Path, np.ndarray], layout: str) -> dict:
    """The model config fields the tensors (our paths) determine, besides the backbone:
    arch, num_queries, hidden_dim, num_classes (K: the sigmoid head's width),
    num_encoder_layers, num_decoder_layers, dim_feedforward, position_embedding, and
    pre_norm and masks (both False: the family members here have neither); Deformable DETR
    also neck and transformer_args (`_infer_deformable`)."""
    inferred = {"arch": ARCHS[layout], "pre_norm": False, "masks": False}
    if layout in (DEFORMABLE, DEFORMABLE_REFINE):
        return {**inferred, **_infer_deformable(leaves, layout)}
    query = leaves.get(("params", QUERIES[layout]))
    if query is not None and query.ndim == 2:
        inferred["num_queries"] = query.shape[0]
    classes = leaves.get(("params", "class_embed", "kernel"))
    if classes is not None and classes.ndim == 2:
        inferred["hidden_dim"], inferred["num_classes"] = classes.shape
    inferred["num_encoder_layers"] = _count(leaves, r"params/encoder_layer(\d+)/.*")
    inferred["num_decoder_layers"] = _count(leaves, r"params/decoder/layer(\d+)/.*")
    ffn = leaves.get(("params", "decoder", "layer0", "ffn", "linear1", "kernel"))
    if ffn is not None:
        inferred["dim_feedforward"] = ffn.shape[-1]
    inferred["position_embedding"] = "learned" if ("params", "position_embedding", "row_embed") in leaves else "sine"
    return inferred


def _infer_deformable(leaves: Mapping[Path, np.ndarray], layout: str) -> dict:
    """Deformable DETR's fields: neck "channel_mapper", transformer_args with_box_refine (the
    layout), two_stage (the proposal layers are there) and num_feature_levels (level_embed's
    rows); num_queries from query_embed [Q, 2E] (two-stage has no such tensor: the config's
    model.num_queries is the number of proposals kept). The sampling points per head and
    level are not inferred: the tensors give heads x levels x points, and the heads are
    not in them."""
    refine = layout == DEFORMABLE_REFINE
    inferred = {"neck": "channel_mapper"}
    query = leaves.get(("params", "query_embed"))
    if query is not None and query.ndim == 2:
        inferred["num_queries"] = query.shape[0]
    classes = leaves.get(("params", "class_embed_0" if refine else "class_embed", "kernel"))
    if classes is not None and classes.ndim == 2:
        inferred["hidden_dim"], inferred["num_classes"] = classes.shape
    inferred["num_encoder_layers"] = _count(leaves, r"params/encoder/layer(\d+)/.*")
    inferred["num_decoder_layers"] = _count(leaves, r"params/decoder/layer(\d+)/.*")
    ffn = leaves.get(("params", "decoder", "layer0", "ffn", "linear1", "kernel"))
    if ffn is not None:
        inferred["dim_feedforward"] = ffn.shape[-1]
    inferred["position_embedding"] = "learned" if ("params", "position_embedding", "row_embed") in leaves else "sine"
    args = {"with_box_refine": refine, "two_stage": ("params", "enc_output", "kernel") in leaves}
    levels = leaves.get(("params", "level_embed"))
    if levels is not None and levels.ndim == 2:
        args["num_feature_levels"] = levels.shape[0]
    inferred["transformer_args"] = args
    return inferred
