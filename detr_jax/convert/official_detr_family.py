"""The official repositories' checkpoints of DETR-family members: key names -> our
parameter paths (the same paths as the members' Hugging Face layouts), and the model they
describe. `detr_jax.convert.layouts` dispatches here; `tensors` and `converter` do the
tensor work.

  official_conditional_detr  Atten4Vis/ConditionalDETR (`ConditionalDETR_r50_epoch50.pth`,
      ...; the torch.hub models of DeppMeng/ConditionalDETR): {"model": state dict, ...}.
  official_dab_detr  IDEA-Research/DAB-DETR (`DAB_DETR/R50/checkpoint.pth`, ...), the same.

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
LAYOUTS = (CONDITIONAL, DAB)
# The Hugging Face layout of the same member: its rules give the same paths, its inference serves.
HF_LAYOUT = {CONDITIONAL: hf_family.CONDITIONAL, DAB: hf_family.DAB}

# Official DETR has no ca_qpos_sine_proj: this tells the family from it (both are `transformer.*`).
_CONDITIONAL_DECODER = re.compile(r"transformer\.decoder\.layers\.\d+\.ca_qpos_sine_proj\.")
# What DAB-DETR has and Conditional DETR has not (its decoder layers are Conditional DETR's).
_DAB_ONLY = ("refpoint_embed.", "transformer.encoder.query_scale.", "transformer.decoder.ref_anchor_head.",
             "transformer.decoder.bbox_embed.")


def detect_layout(keys: list[str]) -> str | None:
    """One of LAYOUTS, or None when the keys are no official family member's read here
    (`keys` without a segmentation model's `detr.` prefix)."""
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
_SEGMENTATION = unsupported("a segmentation head: Conditional DETR and DAB-DETR are converted as detectors only "
                            "(model.masks is not supported for them)")
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


def module(layout: str, name: str) -> Module | None:
    """Where the PyTorch module `name` of a `layout` checkpoint goes, or None when no rule
    covers it. A segmentation model's detector (under `detr.`) is read as the detector."""
    if name.startswith("detr."):
        name = name[len("detr."):]
    return first_match(_RULES[layout], name)


def infer_model(leaves: Mapping[Path, np.ndarray], layout: str) -> dict:
    """The model config fields the tensors (our paths) determine, besides the backbone: as
    `huggingface_detr_family.infer_model` for the member's Hugging Face layout, whose paths
    these are (arch, num_queries, hidden_dim, num_classes, layer counts, dim_feedforward,
    position_embedding; pre_norm and masks False)."""
    return hf_family.infer_model(leaves, HF_LAYOUT[layout])
