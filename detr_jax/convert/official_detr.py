"""facebookresearch/detr checkpoints (`official`): `backbone.0.body.*`, `transformer.*` with
fused `in_proj_weight`, the mask head of DETRsegm."""

from __future__ import annotations

from detr_jax.convert.resnet import resnet_body_module
from detr_jax.convert.rules import Module, first_match


def layer_path(stack: str, index: str) -> tuple[str, ...]:
    return ("transformer", f"{stack}_layer{index}")


def official_layer_module(stack: str, index: str, name: str) -> Module | None:
    layer = layer_path(stack, index)
    attn = {"self_attn": "self_attn", "multihead_attn": "cross_attn"}
    rules = [
        (r"(self_attn|multihead_attn)", lambda a: Module(layer + (attn[a],), "fused_qkv")),
        (r"(self_attn|multihead_attn)\.out_proj", lambda a: Module(layer + (attn[a], "out_proj"), "dense")),
        (r"linear([12])", lambda i: Module(layer + ("ffn", f"linear{i}"), "dense")),
        (r"norm([123])", lambda i: Module(layer + (f"norm{i}",), "layernorm")),
    ]
    return first_match(rules, name)


MASK_HEAD = ("mask_head",)
# Official DETR (and transformers before 5) name the mask head's layers lay1..lay5,
# gn1..gn5, adapter1..3 and out_lay; transformers 5 names them conv1, conv2,
# fpn_stages.i.{fpn_adapter,refine} and output_conv.
_MASK_HEAD_BLOCKS = {"1": "conv1", "2": "conv2", "3": "refine1", "4": "refine2", "5": "refine3"}
_NORM_OR_CONV = {"conv": "conv", "norm": "groupnorm"}
MASK_HEAD_RULES = [
    (r"bbox_attention\.([qk])_(?:linear|proj)", lambda p: Module(("bbox_attention", f"{p}_proj"), "dense")),
    (r"mask_head\.lay([1-5])", lambda i: Module(MASK_HEAD + (_MASK_HEAD_BLOCKS[i], "conv"), "conv")),
    (r"mask_head\.gn([1-5])", lambda i: Module(MASK_HEAD + (_MASK_HEAD_BLOCKS[i], "norm"), "groupnorm")),
    (r"mask_head\.adapter([123])", lambda i: Module(MASK_HEAD + (f"adapter{i}",), "conv")),
    (r"mask_head\.(?:out_lay|output_conv)", lambda: Module(MASK_HEAD + ("out",), "conv")),
    (r"mask_head\.(conv[12])\.(conv|norm)", lambda b, what: Module(MASK_HEAD + (b, what), _NORM_OR_CONV[what])),
    (r"mask_head\.fpn_stages\.([012])\.fpn_adapter", lambda i: Module(MASK_HEAD + (f"adapter{int(i) + 1}",), "conv")),
    (
        r"mask_head\.fpn_stages\.([012])\.refine\.(conv|norm)",
        lambda i, what: Module(MASK_HEAD + (f"refine{int(i) + 1}", what), _NORM_OR_CONV[what]),
    ),
]


def official_module(name: str) -> Module | None:
    rules = [
        (r"detr\.(.+)", official_module),  # DETRsegm: the detector under "detr."
        *MASK_HEAD_RULES,
        (r"backbone\.0\.body\.(.+)", resnet_body_module),
        (r"backbone\.1\.(row|col)_embed", lambda rc: Module(("position_embedding", f"{rc}_embed"), "embedding")),
        (r"input_proj", lambda: Module(("input_proj",), "conv")),
        (r"query_embed", lambda: Module(("query_embed",), "embedding")),
        (r"class_embed", lambda: Module(("class_embed",), "dense")),
        (r"bbox_embed\.layers\.(\d+)", lambda i: Module(("bbox_embed", f"layers_{i}"), "dense")),
        (r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)", official_layer_module),
        (r"transformer\.encoder\.norm", lambda: Module(("transformer", "encoder_norm"), "layernorm")),
        (r"transformer\.decoder\.norm", lambda: Module(("transformer", "decoder_norm"), "layernorm")),
    ]
    return first_match(rules, name)
