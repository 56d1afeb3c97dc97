"""The official repositories' checkpoints of DETR-family members: key names -> our
parameter paths (the same paths as the members' Hugging Face layouts), and the model they
describe. `detr_jax.convert.layouts` dispatches here; `tensors` and `converter` do the
tensor work.

  official_conditional_detr  Atten4Vis/ConditionalDETR (`ConditionalDETR_r50_epoch50.pth`,
      ...; the torch.hub models of DeppMeng/ConditionalDETR): {"model": state dict, ...}.
  official_dab_detr  IDEA-Research/DAB-DETR (`DAB_DETR/R50/checkpoint.pth`, ...), the same.
  official_deformable_detr, official_deformable_detr_box_refine  fundamentalvision/
      Deformable-DETR (`r50_deformable_detr-checkpoint.pth`, `..._single_scale(_dc5)...`,
      `..._plus_iterative_bbox_refinement...`, `..._plus_plus_two_stage...`): the same
      {"model": ...}; below ("Deformable DETR").

Where the names come from: the models' code (models/transformer.py, conditional_detr.py,
DABDETR.py of the two repositories) and transformers' conversion scripts, whose rename
tables map every official name to Hugging Face's:
convert_conditional_detr_original_pytorch_checkpoint_to_pytorch.py (huggingface/
transformers 09cb93d) and convert_dab_detr_original_pytorch_checkpoint_to_pytorch.py
(e7b4076). The names, with the shapes of hidden size E, F = dim_feedforward, Q queries,
K classes:

  backbone.0.body.*              the torchvision ResNet (FrozenBatchNorm2d): resnet's rules
  backbone.1.{row,col}_embed     the learned position embedding, if any [50, E/2]
  input_proj                     1x1 conv [E, C, 1, 1]
  query_embed                    [Q, E] (Conditional DETR)
  refpoint_embed                 [Q, 4] anchor boxes, unsigmoided (DAB-DETR)
  class_embed                    [K, E] (sigmoid classes: no "no object" logit)
  bbox_embed.layers.{0,1,2}      the box MLP; DAB-DETR's is our decoder's bbox_embed
  transformer.encoder.layers.{i}.self_attn.in_proj_{weight,bias}  fused q/k/v [3E, E], [3E]
      (nn.MultiheadAttention: split into q_proj/k_proj/v_proj, as the scripts' read_in_q_k_v)
  transformer.encoder.layers.{i}.{self_attn.out_proj,linear1,linear2,norm1,norm2}
  transformer.encoder.layers.{i}.activation  DAB-DETR's PReLU slope [1]
  transformer.encoder.query_scale.layers.{0,1}  DAB-DETR's encoder position scale MLP
  transformer.decoder.layers.{i}.{sa,ca}_{qcontent,qpos,kcontent,kpos,v}_proj, ca_qpos_sine_proj
      the conditional attentions' projections [E, E] (ca_qpos_proj in layer 0 only: the
      official decoders set it to None in the others); self_attn.out_proj,
      cross_attn.out_proj [E, E] (their MultiheadAttention has no in_proj), linear1,
      linear2, norm1..3, and DAB-DETR's activation
  transformer.decoder.norm       the final LayerNorm
  transformer.decoder.{query_scale,ref_point_head}.layers.{0,1}; DAB-DETR's ref_anchor_head
  transformer.decoder.bbox_embed.layers.*  DAB-DETR: the same tensors as bbox_embed (tied by
      `self.transformer.decoder.bbox_embed = self.bbox_embed`): ignored, as Hugging Face's
      tied copy `model.decoder.bbox_embed` is.

Refused with a reason: DAB-DETR's `transformer.patterns` (num_patterns > 0, the "-pat3"
models) and the segmentation heads (`bbox_attention`, `mask_head`; the detector is then
under `detr.`). What no tensor shows is not checked: the position encoding's temperature
(DAB-DETR's pe_temperatureH/W, 20 as ours by default; transformers' script converts
"dab-detr-resnet-50-dc5" with 10), random_refpoints_xy (training only).

Deformable DETR. Told apart from official DETR, Conditional DETR and DAB-DETR (all
`transformer.*` too) by `transformer.level_embed` or the deformable attention's
`transformer.encoder.layers.{i}.self_attn.sampling_offsets`, which none of them has;
box refinement (with or without two-stage) by the tied box heads `transformer.decoder.
bbox_embed.*`, which the official model sets only `--with_box_refine`. The names come from
transformers' convert_deformable_detr_to_pytorch.py (huggingface/transformers 9a67324;
the table is the same at 07ae0e5): its `rename_key` and `read_in_q_k_v` map every
official name to Hugging Face's, cross-checked with the official models/deformable_detr.py,
deformable_transformer.py and ops/modules/ms_deform_attn.py (fundamentalvision/
Deformable-DETR 48092c5). `_DEFORMABLE_TO_HF` is that table, one official module per row;
the Hugging Face name it gives is resolved by the `huggingface_deformable_detr(_box_refine)`
rules, so the paths are theirs by construction:

  backbone.0.body.*                        -> model.backbone.conv_encoder.model.*
  input_proj.{l}.{0,1} (conv, GroupNorm)    -> model.input_proj.{l}.{0,1}
  query_embed [Q, 2E] (not two-stage)       -> model.query_position_embeddings
  transformer.level_embed [L, E]            -> model.level_embed (a bare parameter)
  transformer.{reference_points, enc_output, enc_output_norm, pos_trans, pos_trans_norm}
                                            -> model.* (reference_points: not two-stage;
                                               the other four: two-stage only)
  transformer.encoder.layers.{i}.self_attn.{sampling_offsets,attention_weights,value_proj,
      output_proj}                          -> the same under model.encoder.layers.{i}
  transformer.encoder.layers.{i}.{norm1, norm2, linear1, linear2}
                                            -> self_attn_layer_norm, final_layer_norm, fc1, fc2
  transformer.decoder.layers.{i}.cross_attn.*  -> encoder_attn.* (MSDeformAttn's names)
  transformer.decoder.layers.{i}.self_attn.in_proj_{weight,bias}  nn.MultiheadAttention's
      fused q/k/v [3E, E]: split into self_attn.{q,k,v}_proj (read_in_q_k_v: q, k, v rows)
  transformer.decoder.layers.{i}.self_attn.out_proj  -> the same
  transformer.decoder.layers.{i}.{norm1, norm2, norm3, linear1, linear2}
                                            -> encoder_attn_layer_norm (norm1 follows the
                                               cross-attention), self_attn_layer_norm (norm2
                                               follows the self-attention), final_layer_norm,
                                               fc1, fc2
  class_embed.{i}, bbox_embed.{i}.layers.{j}  -> the same (one per decoder layer, and one
                                               more for the proposals when two-stage)
  transformer.decoder.bbox_embed.{i}.layers.{j} (box refinement), transformer.decoder.
      class_embed.{i} (two-stage)           -> model.decoder.*: tied copies of the heads

Dropped: only tied copies, as the Hugging Face layouts drop them (converted to the same
place and found equal): the plain model's `class_embed.{i}` and `bbox_embed.{i}.*` (one
module repeated per layer), `transformer.decoder.bbox_embed.*` and `transformer.decoder.
class_embed.*`. Beyond the script's table: the learned position embedding
`backbone.1.{row,col}_embed` (official DETR's rule; the released models use the sine one).
Refused with a reason: two-stage without box refinement (`transformer.decoder.class_embed`
without `transformer.decoder.bbox_embed`; our model, as transformers', needs
with_box_refine for two_stage) and a segmentation head. What no tensor shows is not
checked: the sampling points per head and level (n_points; the tensors give heads x levels
x points), the heads, two_stage_num_proposals (the config's model.num_queries).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from detr_jax.convert import huggingface_detr_family as hf_family
from detr_jax.convert.official_detr import layer_path, official_layer_module, official_module
from detr_jax.convert.rules import IGNORED, Module, Path, first_match, unsupported

CONDITIONAL = "official_conditional_detr"
DAB = "official_dab_detr"
DEFORMABLE = "official_deformable_detr"
DEFORMABLE_REFINE = "official_deformable_detr_box_refine"
LAYOUTS = (CONDITIONAL, DAB, DEFORMABLE, DEFORMABLE_REFINE)
# The Hugging Face layout of the same member: its rules give the same paths, its inference serves.
HF_LAYOUT = {CONDITIONAL: hf_family.CONDITIONAL, DAB: hf_family.DAB, DEFORMABLE: hf_family.DEFORMABLE,
             DEFORMABLE_REFINE: hf_family.DEFORMABLE_REFINE}

# Official DETR has no ca_qpos_sine_proj: this tells the family from it (both are `transformer.*`).
_CONDITIONAL_DECODER = re.compile(r"transformer\.decoder\.layers\.\d+\.ca_qpos_sine_proj\.")
# What DAB-DETR has and Conditional DETR has not (its decoder layers are Conditional DETR's).
_DAB_ONLY = ("refpoint_embed.", "transformer.encoder.query_scale.", "transformer.decoder.ref_anchor_head.",
             "transformer.decoder.bbox_embed.")


# What Deformable DETR has and official DETR, Conditional DETR and DAB-DETR have not.
_DEFORMABLE = re.compile(r"transformer\.level_embed$|transformer\.encoder\.layers\.\d+\.self_attn\.sampling_offsets\.")


def detect_layout(keys: list[str]) -> str | None:
    """One of LAYOUTS, or None when the keys are no official family member's read here
    (`keys` without a segmentation model's `detr.` prefix)."""
    if any(_DEFORMABLE.match(k) for k in keys):
        refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in keys)
        return DEFORMABLE_REFINE if refine else DEFORMABLE
    if not any(_CONDITIONAL_DECODER.match(k) for k in keys):
        return None
    return DAB if any(k.startswith(_DAB_ONLY) for k in keys) else CONDITIONAL


def _rerooted(stack: str, index: str, name: str, root: Path) -> Module | None:
    """Official DETR's rule for a transformer layer's module (self_attn, self_attn.out_proj,
    linear1/2, norm1..3: the same names here), moved from its ("transformer",
    "<stack>_layer{i}") to `root`."""
    module = official_layer_module(stack, index, name)
    return None if module is None else Module(root + module.path[len(layer_path(stack, index)):], module.kind)


def _prelu(root: Path) -> tuple[str, Callable[[], Module]]:
    """DAB-DETR's `activation` (nn.PReLU, one slope) of a layer at `root`."""
    return r"activation", lambda: Module(root + ("ffn", "prelu"), "embedding")


def _encoder_layer(layout: str, index: str, name: str) -> Module | None:
    root = (f"encoder_layer{index}",)
    extra = [_prelu(root)] if layout == DAB else []
    return _rerooted("encoder", index, name, root) or first_match(extra, name)


def _decoder_layer(layout: str, index: str, name: str) -> Module | None:
    """DETR's names (official_detr), the conditional projections sa_*/ca_* (named as in
    Hugging Face's saved Conditional DETR: its rule), the cross-attention's out_proj."""
    root = ("decoder", f"layer{index}")
    extra = [(r"cross_attn\.out_proj", lambda: Module(root + ("cross_attn", "out_proj"), "dense"))]
    if layout == DAB:
        extra.append(_prelu(root))
    if name.startswith(("sa_", "ca_")):
        return hf_family.conditional_decoder_layer(index, name)
    return _rerooted("decoder", index, name, root) or first_match(extra, name)


def _layer_rules(layout: str) -> list:
    return [
        (r"transformer\.encoder\.layers\.(\d+)\.(.+)", lambda i, n: _encoder_layer(layout, i, n)),
        (r"transformer\.decoder\.layers\.(\d+)\.(.+)", lambda i, n: _decoder_layer(layout, i, n)),
    ]


# Named as official DETR's (the backbone body, the learned position embedding, the input
# projection, the class head): its rules give the paths.
_AS_OFFICIAL_DETR = r"(backbone\.0\.body\..+|backbone\.1\.(?:row|col)_embed|input_proj|class_embed)"
_SEGMENTATION = unsupported("a segmentation head: Conditional DETR, DAB-DETR and Deformable DETR are converted as "
                            "detectors only (model.masks is not supported for them)")
_COMMON_RULES = [
    (_AS_OFFICIAL_DETR, official_module),
    (r"(?:bbox_attention|mask_head)\..+", _SEGMENTATION),
    (r"transformer\.decoder\.norm", lambda: Module(("decoder", "norm"), "layernorm")),
    (r"transformer\.decoder\.(query_scale|ref_point_head)\.layers\.(\d+)",
     lambda m, j: hf_family.mlp(("decoder", m))(j)),
]

_RULES = {
    CONDITIONAL: [
        *_COMMON_RULES,
        *_layer_rules(CONDITIONAL),
        (r"(query_embed|bbox_embed\.layers\.\d+)", official_module),
    ],
    DAB: [
        *_COMMON_RULES,
        *_layer_rules(DAB),
        (r"refpoint_embed", lambda: Module(("refpoint_embed",), "embedding")),
        (r"transformer\.encoder\.query_scale\.layers\.(\d+)", hf_family.mlp(("encoder_query_scale",))),
        (r"transformer\.decoder\.ref_anchor_head\.layers\.(\d+)", hf_family.mlp(("decoder", "ref_anchor_head"))),
        (r"transformer\.decoder\.bbox_embed\.layers\.\d+", lambda: IGNORED),  # the tied copy of bbox_embed
        (r"bbox_embed\.layers\.(\d+)", hf_family.mlp(("decoder", "bbox_embed"))),
        (r"transformer\.patterns", unsupported("DAB-DETR's pattern embeddings (num_patterns > 0) are not supported")),
    ],
}


_MS_DEFORM_ATTN = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
# Deformable DETR: (official module name, its Hugging Face name), transformers'
# convert_deformable_detr_to_pytorch.py `rename_key` (plus its "model." prefix for all but
# the heads) written out one module per row.
_DEFORMABLE_TO_HF = [
    (r"backbone\.0\.body\.(.+)", r"model.backbone.conv_encoder.model.\1"),
    (r"input_proj\.(\d+)\.([01])", r"model.input_proj.\1.\2"),
    (r"query_embed", "model.query_position_embeddings"),
    (r"transformer\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)", r"model.\1"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\." + _MS_DEFORM_ATTN, r"model.encoder.layers.\1.self_attn.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm1", r"model.encoder.layers.\1.self_attn_layer_norm"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm2", r"model.encoder.layers.\1.final_layer_norm"),
    (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.linear([12])", r"model.\1.layers.\2.fc\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\." + _MS_DEFORM_ATTN,
     r"model.decoder.layers.\1.encoder_attn.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj", r"model.decoder.layers.\1.self_attn.out_proj"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1", r"model.decoder.layers.\1.encoder_attn_layer_norm"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2", r"model.decoder.layers.\1.self_attn_layer_norm"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3", r"model.decoder.layers.\1.final_layer_norm"),
    (r"transformer\.decoder\.((?:class_embed|bbox_embed)\.\d+(?:\.layers\.\d+)?)", r"model.decoder.\1"),
    (r"(class_embed\.\d+|bbox_embed\.\d+\.layers\.\d+)", r"\1"),
]


def deformable_hf_name(name: str) -> str | None:
    """The Hugging Face name of an official Deformable DETR module (`_DEFORMABLE_TO_HF`), or
    None when the table has no row for it."""
    for pattern, template in _DEFORMABLE_TO_HF:
        if match := re.fullmatch(pattern, name):
            return match.expand(template)
    return None


_TWO_STAGE_ONLY = unsupported("two-stage Deformable DETR without box refinement (transformer.decoder.class_embed "
                              "without transformer.decoder.bbox_embed) is not supported: two_stage needs "
                              "with_box_refine")


def _deformable_module(layout: str, name: str) -> Module | None:
    """The modules the table leaves to others (the decoder's fused self-attention, as
    `read_in_q_k_v`; the learned position embedding; refusals), then the table's Hugging
    Face name under the Hugging Face layout's rules."""
    special = [
        (r"transformer\.decoder\.layers\.(\d+)\.self_attn",
         lambda i: Module(("decoder", f"layer{i}", "self_attn"), "fused_qkv")),
        (r"backbone\.1\.(?:row|col)_embed", lambda: official_module(name)),
        (r"(?:bbox_attention|mask_head)\..+", _SEGMENTATION),
    ]
    if layout == DEFORMABLE:
        special.append((r"transformer\.decoder\.class_embed\.\d+", _TWO_STAGE_ONLY))
    found = first_match(special, name)
    if found is not None:
        return found
    hf_name = deformable_hf_name(name)
    return None if hf_name is None else hf_family.module(HF_LAYOUT[layout], hf_name)


def module(layout: str, name: str) -> Module | None:
    """Where the PyTorch module `name` of a `layout` checkpoint goes, or None when no rule
    covers it. A segmentation model's detector (under `detr.`) is read as the detector."""
    if name.startswith("detr."):
        name = name[len("detr."):]
    if layout in (DEFORMABLE, DEFORMABLE_REFINE):
        return _deformable_module(layout, name)
    return first_match(_RULES[layout], name)


def parameter(layout: str, key: str) -> Module | None:
    """A bare parameter (no module of its own): Deformable DETR's `transformer.level_embed`,
    as the Hugging Face layout's `model.level_embed`."""
    if layout in (DEFORMABLE, DEFORMABLE_REFINE) and key.removeprefix("detr.") == "transformer.level_embed":
        return hf_family.parameter(HF_LAYOUT[layout], "model.level_embed")
    return None


def infer_model(leaves: Mapping[Path, np.ndarray], layout: str) -> dict:
    """The model config fields the tensors (our paths) determine, besides the backbone: as
    `huggingface_detr_family.infer_model` for the member's Hugging Face layout, whose paths
    these are (arch, num_queries, hidden_dim, num_classes, layer counts, dim_feedforward,
    position_embedding; pre_norm and masks False; Deformable DETR's neck and
    transformer_args)."""
    return hf_family.infer_model(leaves, HF_LAYOUT[layout])
