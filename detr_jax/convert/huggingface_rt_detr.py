"""Hugging Face transformers' RT-DETR and RT-DETRv2 checkpoints (`RTDetrForObjectDetection`,
`RTDetrV2ForObjectDetection`; `RTDetrModel` without the `model.` prefix for the parts it
has): key names -> our parameter paths (`models.detectors.rt_detr`), and the model they
describe.

  huggingface_rt_detr     v1: the ResNet-vd backbone (`model.backbone.model.*`,
      `RTDetrResNetBackbone`'s names, the rules of `detr_jax.convert.resnet`; frozen
      BatchNorms), the hybrid encoder with its input projections
      (`model.encoder_input_proj.{l}.{0,1}`, `model.encoder.*`, under our `encoder`; AIFI as
      `encoder.aifi.{i}` in memory, `encoder.encoder.{i}` as saved), the
      decoder's input projections (`model.decoder_input_proj.{l}.{0,1}`), the query
      selection (`model.enc_output.{0,1}`, `enc_score_head`, `enc_bbox_head`), the
      denoising label embedding, the decoder (`model.decoder.layers.{i}.*` as Deformable
      DETR's, `model.decoder.query_pos_head`) and its per-layer heads
      (`model.decoder.{class,bbox}_embed.{i}`). Conv-BNs outside the backbone are trainable
      BatchNorms (scale, bias in params; running statistics in batch_stats).
  huggingface_rt_detr_v2  v2: the same names, told apart by the decoder attentions'
      `n_points_scale` buffers (1 / P per sampling point; ignored: decoder_n_points is set
      in the config), and the top-level `{class,bbox}_embed.{i}` copies of the decoder's
      heads that a model in memory has (saved once by transformers: the decoder's).

Neither the number of queries, the heads, the sampling points, v2's offset scale and
sampling method nor the denoising settings are in the tensors: they are the config's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from detr_jax.convert.huggingface_detr_family import deformable_decoder_layer, encoder_layer, mlp
from detr_jax.convert.resnet import resnet_body_module
from detr_jax.convert.rules import IGNORED, Module, Path, first_match

LAYOUT = "huggingface_rt_detr"
LAYOUT_V2 = "huggingface_rt_detr_v2"
LAYOUTS = (LAYOUT, LAYOUT_V2)
ENCODER = ("encoder",)
_CONV_NORM = {"conv": "conv", "norm": "batchnorm"}


def detect_layout(keys: list[str]) -> str | None:
    """One of LAYOUTS, or None when the keys are no Hugging Face RT-DETR's."""
    if not any(k.startswith(("model.enc_score_head.", "model.encoder_input_proj.")) for k in keys):
        return None
    return LAYOUT_V2 if any(k.endswith(".encoder_attn.n_points_scale") for k in keys) else LAYOUT


def _conv_norm(path: tuple[str, ...]):
    """A `RTDetrConvNormLayer` (`.conv`, `.norm`) -> our ConvNorm at `path`."""
    return lambda what: Module(path + (what,), _CONV_NORM[what])


def _sequential_conv_norm(path: tuple[str, ...], index: str) -> Module:
    """An nn.Sequential(Conv2d, BatchNorm2d)'s module `index` (0, 1) -> our ConvNorm at `path`."""
    return _conv_norm(path)(("conv", "norm")[int(index)])


def encoder_module(name: str) -> Module | None:
    """`[model.]encoder_input_proj.*` and `[model.]encoder.*` -> our HybridEncoder's modules,
    or None."""
    csp = r"encoder\.(fpn|pan)_blocks\.(\d+)\."
    return first_match([
        (r"encoder_input_proj\.(\d+)\.([01])", lambda l, i: _sequential_conv_norm(ENCODER + (f"input_proj{l}",), i)),
        # transformers 5's name in memory, and the one it saves (and the Hub's)
        (r"encoder\.(?:aifi|encoder)\.(\d+)\.layers\.(\d+)\.(.+)",
         lambda i, j, rest: encoder_layer(ENCODER + (f"aifi{i}", f"layer{j}"), rest)),
        (r"encoder\.(lateral|downsample)_convs\.(\d+)\.(conv|norm)",
         lambda kind, i, what: _conv_norm(ENCODER + (f"{kind}_conv{i}",))(what)),
        (csp + r"conv([123])\.(conv|norm)",
         lambda kind, i, j, what: _conv_norm(ENCODER + (f"{kind}_block{i}", f"conv{j}"))(what)),
        (csp + r"bottlenecks\.(\d+)\.conv([12])\.(conv|norm)",
         lambda kind, i, k, j, what: _conv_norm(ENCODER + (f"{kind}_block{i}", f"bottleneck{k}", f"conv{j}"))(what)),
    ], name.removeprefix("model."))


def module(name: str) -> Module | None:
    """Where the PyTorch module `name` of an RT-DETR checkpoint goes, or None when no rule
    covers it. Names as `RTDetrForObjectDetection` has them (`model.` first) or `RTDetrModel`."""
    return first_match([
        (r"(?:model\.)?backbone\.model\.(.+)", resnet_body_module),
        (r"((?:model\.)?encoder(?:_input_proj)?\..+)", encoder_module),
        (r"(?:model\.)?decoder_input_proj\.(\d+)\.([01])",
         lambda l, i: _sequential_conv_norm((f"decoder_input_proj{l}",), i)),
        (r"(?:model\.)?denoising_class_embed", lambda: Module(("denoising_class_embed",), "embedding")),
        (r"(?:model\.)?enc_output\.0", lambda: Module(("enc_output",), "dense")),
        (r"(?:model\.)?enc_output\.1", lambda: Module(("enc_output_norm",), "layernorm")),
        (r"(?:model\.)?enc_score_head", lambda: Module(("enc_score_head",), "dense")),
        (r"(?:model\.)?enc_bbox_head\.layers\.(\d+)", mlp(("enc_bbox_head",))),
        (r"(?:model\.)?decoder\.layers\.\d+\.encoder_attn", lambda: IGNORED),  # v2's n_points_scale
        (r"(?:model\.)?decoder\.layers\.(\d+)\.(.+)", deformable_decoder_layer),
        (r"(?:model\.)?decoder\.query_pos_head\.layers\.(\d+)", mlp(("decoder", "query_pos_head"))),
        # The decoder's heads; a v2 model in memory has copies at the top level.
        (r"(?:model\.decoder\.)?class_embed\.(\d+)", lambda i: Module((f"class_embed_{i}",), "dense")),
        (r"(?:model\.decoder\.)?bbox_embed\.(\d+)\.layers\.(\d+)", lambda i, j: mlp((f"bbox_embed_{i}",))(j)),
    ], name)


def _count(leaves: Mapping[Path, np.ndarray], pattern: str) -> int:
    """How many distinct groups of `pattern` match the joined parameter paths."""
    return len({m.groups() for p in leaves if (m := re.fullmatch(pattern, "/".join(p)))})


def infer_model(leaves: Mapping[Path, np.ndarray]) -> dict:
    """The model config fields the tensors (our paths) determine, besides the backbone: arch
    "rt_detr", hidden_dim and num_classes (the proposals' class head), num_encoder_layers
    (AIFI's), num_decoder_layers, dim_feedforward (the decoder's), pre_norm and masks
    (False), and transformer_args: num_feature_levels, expansion, num_blocks, num_denoising
    0 when there is no denoising embedding, and encoder_hidden_dim / encoder_dim_feedforward
    where they differ from the decoder's."""
    inferred = {"arch": "rt_detr", "pre_norm": False, "masks": False}
    params = "params/"
    classes = leaves.get(("params", "enc_score_head", "kernel"))
    if classes is not None and classes.ndim == 2:
        inferred["hidden_dim"], inferred["num_classes"] = classes.shape
    inferred["num_encoder_layers"] = _count(leaves, params + r"encoder/aifi0/layer(\d+)/.*")
    inferred["num_decoder_layers"] = _count(leaves, params + r"decoder/layer(\d+)/.*")
    ffn = leaves.get(("params", "decoder", "layer0", "ffn", "linear1", "kernel"))
    if ffn is not None:
        inferred["dim_feedforward"] = ffn.shape[-1]
    args = {"num_feature_levels": _count(leaves, params + r"decoder_input_proj(\d+)/.*"),
            "num_blocks": _count(leaves, params + r"encoder/fpn_block0/bottleneck(\d+)/.*")}
    if ("params", "denoising_class_embed") not in leaves:
        args["num_denoising"] = 0
    width = leaves.get(("params", "encoder", "input_proj0", "conv", "kernel"))
    if width is not None:
        width = width.shape[-1]
        if width != inferred.get("hidden_dim"):
            args["encoder_hidden_dim"] = width
        hidden = leaves.get(("params", "encoder", "fpn_block0", "conv1", "conv", "kernel"))
        if hidden is not None:
            args["expansion"] = hidden.shape[-1] / width
    encoder_ffn = leaves.get(("params", "encoder", "aifi0", "layer0", "ffn", "linear1", "kernel"))
    if encoder_ffn is not None and encoder_ffn.shape[-1] != inferred.get("dim_feedforward"):
        args["encoder_dim_feedforward"] = encoder_ffn.shape[-1]
    inferred["transformer_args"] = args
    return inferred
