"""transformers' DetrForObjectDetection / DetrForSegmentation (`huggingface`), in the saved
names and in transformers 5's in-memory ones."""

from __future__ import annotations

from detr_jax.convert.official_detr import MASK_HEAD_RULES, layer_path
from detr_jax.convert.resnet import resnet_body_module
from detr_jax.convert.rules import Module, first_match


def huggingface_layer_module(stack: str, index: str, name: str) -> Module | None:
    layer = layer_path(stack, index)
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
    return first_match(rules, name)


def huggingface_module(name: str) -> Module | None:
    position = {"row": "row_embed", "column": "col_embed"}
    rules = [
        (r"detr\.(.+)", huggingface_module),  # DetrForSegmentation: the detector under "detr."
        *MASK_HEAD_RULES,
        (r"model\.backbone\.(?:conv_encoder\.)?model\.(.+)", resnet_body_module),
        (
            r"model\.position_embedding\.(row|column)_embeddings",
            lambda rc: Module(("position_embedding", position[rc]), "embedding"),
        ),
        (r"model\.input_projection", lambda: Module(("input_proj",), "conv")),
        (r"model\.query_position_embeddings", lambda: Module(("query_embed",), "embedding")),
        (r"class_labels_classifier", lambda: Module(("class_embed",), "dense")),
        (r"bbox_predictor\.layers\.(\d+)", lambda i: Module(("bbox_embed", f"layers_{i}"), "dense")),
        (r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)", huggingface_layer_module),
        (r"model\.decoder\.layernorm", lambda: Module(("transformer", "decoder_norm"), "layernorm")),
    ]
    return first_match(rules, name)
