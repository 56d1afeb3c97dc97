"""Official IDEA-Research/DINO checkpoints (`checkpoint0011_4scale.pth`, `..._5scale.pth`,
...: {"model": state dict, ...}): key names -> our `dino` parameter paths, and the model
they describe. `detr_jax.convert.layouts` dispatches here.

DINO is Deformable DETR's code grown (IDEA-Research/DINO models/dino/dino.py,
deformable_transformer.py, ops/modules/ms_deform_attn.py), so most of its names are
official Deformable DETR's and go through that table (`official_detr_family.
deformable_hf_name`, the rules of the box-refinement layout), to the same paths as our
Deformable DETR's:

  backbone.0.body.*, input_proj.{l}.{0,1}, transformer.level_embed, transformer.{enc_output,
  enc_output_norm}, transformer.encoder.layers.{i}.*, transformer.decoder.layers.{i}.*
  (norm1 follows the cross-attention, norm2 the self-attention; the self-attention's fused
  in_proj split into q/k/v)

and DINO's own (E hidden size, Q queries, K classes):

  transformer.tgt_embed [Q, E]            -> tgt_embed (mixed query selection's content)
  label_enc [K' + 1, E]                   -> label_enc (denoising label embedding; K' is
                                             dn_labelbook_size, which must equal K here)
  transformer.decoder.ref_point_head.layers.{0,1}  -> decoder/ref_point_head/layers_{j}
  transformer.decoder.norm                -> decoder/norm
  class_embed.{i}, bbox_embed.{i}.layers.{j}  -> class_embed, bbox_embed/layers_{j}: one
      head shared by every decoder layer (the official dec_pred_{class,bbox}_embed_share
      defaults: the checkpoint holds the same tensors once per layer)
  transformer.decoder.{class,bbox}_embed.{i}  tied copies of the former (dropped once found equal)
  transformer.enc_out_class_embed, transformer.enc_out_bbox_embed.layers.{j}
                                          -> enc_out_class_embed, enc_out_bbox_embed (the
                                             proposals' heads; two_stage_*_share False)

Unshared heads (dec_pred_*_share False: tensors differing between layers) are reported as
keys mapping to a path already given. Refused with a reason: the options the released
models do not use and our model lacks (two_stage_learn_wh, two_stage_pat_embed,
two_stage_add_query_num's refpoint_embed, decoder_sa_type "ca_label"'s label_embedding,
the segmentation heads). What no tensor shows is not checked: n_points (the tensors give
heads x levels x points), the heads, dn settings (model.transformer_args).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from detr_jax.convert import huggingface_detr_family as hf_family
from detr_jax.convert import official_detr_family as official_family
from detr_jax.convert.rules import Module, Path, first_match, unsupported

LAYOUT = "official_dino"
LAYOUTS = (LAYOUT,)

# What DINO has and official Deformable DETR, Conditional DETR and DAB-DETR have not (the
# latter two have a ref_point_head too).
_DINO = re.compile(r"label_enc\.weight$|transformer\.tgt_embed\.weight$|transformer\.enc_out_class_embed\.")
_HEAD = r"(?:transformer\.decoder\.)?"  # the decoder's tied copy of a head, or the head

_RULES = [
    (r"transformer\.tgt_embed", lambda: Module(("tgt_embed",), "embedding")),
    (r"label_enc", lambda: Module(("label_enc",), "embedding")),
    (r"transformer\.decoder\.ref_point_head\.layers\.(\d+)", hf_family.mlp(("decoder", "ref_point_head"))),
    (r"transformer\.decoder\.norm", lambda: Module(("decoder", "norm"), "layernorm")),
    (_HEAD + r"class_embed\.\d+", lambda: Module(("class_embed",), "dense")),
    (_HEAD + r"bbox_embed\.\d+\.layers\.(\d+)", hf_family.mlp(("bbox_embed",))),
    (r"transformer\.enc_out_class_embed", lambda: Module(("enc_out_class_embed",), "dense")),
    (r"transformer\.enc_out_bbox_embed\.layers\.(\d+)", hf_family.mlp(("enc_out_bbox_embed",))),
    (r"transformer\.two_stage_wh_embedding", unsupported("DINO's two_stage_learn_wh is not supported")),
    (r"refpoint_embed|transformer\.refpoint_embed",
     unsupported("DINO without two-stage proposals or with two_stage_add_query_num is not supported")),
    (r"label_embedding|transformer\.decoder\.layers\.\d+\.label_embedding",
     unsupported("DINO's decoder_sa_type 'ca_label' is not supported")),
    (r"(?:bbox_attention|mask_head)\..+", unsupported("a segmentation head: DINO is converted as a detector only")),
]


def detect_layout(keys: list[str]) -> str | None:
    """LAYOUT when the keys are an official DINO's, else None."""
    return LAYOUT if any(_DINO.match(k) for k in keys) else None


def module(layout: str, name: str) -> Module | None:
    """Where the PyTorch module `name` goes (DINO's rules, then official Deformable DETR's
    table under the box-refinement layout), or None when no rule covers it."""
    del layout
    found = first_match(_RULES, name)
    if found is not None:
        return found
    if re.fullmatch(r"transformer\.pat_embed_for_2stage", name):
        return unsupported("DINO's two_stage_pat_embed is not supported")()
    return official_family.module(official_family.DEFORMABLE_REFINE, name)


def parameter(layout: str, key: str) -> Module | None:
    """The bare parameters: transformer.level_embed (as Deformable DETR's) and the refused
    transformer.pat_embed_for_2stage."""
    del layout
    if key == "transformer.pat_embed_for_2stage":
        return unsupported("DINO's two_stage_pat_embed is not supported")()
    return official_family.parameter(official_family.DEFORMABLE_REFINE, key)


def infer_model(leaves: Mapping[Path, np.ndarray]) -> dict:
    """The model config fields the tensors (our paths) determine, besides the backbone:
    arch "dino", neck "channel_mapper", num_queries (tgt_embed's rows), hidden_dim and
    num_classes (class_embed), the layer counts, dim_feedforward, position_embedding "sine",
    pre_norm and masks False, transformer_args num_feature_levels (level_embed's rows)."""
    inferred = {"arch": "dino", "neck": "channel_mapper", "pre_norm": False, "masks": False,
                "position_embedding": "sine"}
    query = leaves.get(("params", "tgt_embed"))
    if query is not None and query.ndim == 2:
        inferred["num_queries"] = query.shape[0]
    classes = leaves.get(("params", "class_embed", "kernel"))
    if classes is not None and classes.ndim == 2:
        inferred["hidden_dim"], inferred["num_classes"] = classes.shape
    count = hf_family._count  # noqa: SLF001 (the family's helper)
    inferred["num_encoder_layers"] = count(leaves, r"params/encoder/layer(\d+)/.*")
    inferred["num_decoder_layers"] = count(leaves, r"params/decoder/layer(\d+)/.*")
    ffn = leaves.get(("params", "decoder", "layer0", "ffn", "linear1", "kernel"))
    if ffn is not None:
        inferred["dim_feedforward"] = ffn.shape[-1]
    levels = leaves.get(("params", "level_embed"))
    if levels is not None and levels.ndim == 2:
        inferred["transformer_args"] = {"num_feature_levels": levels.shape[0]}
    return inferred
