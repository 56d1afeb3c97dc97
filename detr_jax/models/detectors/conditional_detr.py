"""Conditional DETR (Meng et al., 2021): DETR's backbone, neck and encoder, the conditional
decoder (`detr_jax.models.conditional_decoder`) and boxes predicted as offsets from each
query's 2-d reference point; K sigmoid class logits (focal loss). The `conditional_detr`
entry of DETECTORS (`build_conditional_detr`), exact to Hugging Face transformers'
`ConditionalDetrForObjectDetection` (and so to the official Atten4Vis/ConditionalDETR).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from detr_jax.models.backbones import BACKBONES
from detr_jax.models.conditional_decoder import ConditionalDecoder, inverse_sigmoid
from detr_jax.models.detr import BoxHead, embed_image
from detr_jax.models.neck import NECKS, flatten_levels
from detr_jax.models.position_encoding import POSITION_EMBEDDINGS
from detr_jax.models.queries import LearnedQueries
from detr_jax.models.settings import transformer_settings
from detr_jax.models.transformer import EncoderLayer, torch_linear_kernel_init

# The class head's bias starts at the logit of this probability (the references' focal-loss
# prior: every class unlikely at first, so the loss of the many unmatched queries is small).
PRIOR_PROB = 0.01


def class_head(num_logits: int, dtype: Any, prior_prob: float = PRIOR_PROB, name: str = "class_embed") -> nn.Dense:
    """The sigmoid class head (`class_embed` unless named otherwise): PyTorch's Linear kernel
    init, bias logit(prior_prob)."""
    return nn.Dense(num_logits, kernel_init=torch_linear_kernel_init,
                    bias_init=nn.initializers.constant(-math.log((1 - prior_prob) / prior_prob)),
                    dtype=dtype, name=name)


class ConditionalDETR(nn.Module):
    """The Conditional DETR detector from its parts; the skeleton of its descendants, which
    override `encode` and `decode` (DAB-DETR).

    Fields:
      backbone, position_embedding: as DETR's (a BACKBONES and a POSITION_EMBEDDINGS module).
      decoder: a `ConditionalDecoder` (or the descendant's).
      neck: the one-level neck's constructor (`neck.NECKS`), instantiated as "input_proj".
      num_logits: C = K, the sigmoid class head's outputs.
      num_queries, hidden_dim, num_heads, num_encoder_layers, dim_feedforward, dropout: Q,
        E and DETR's post-norm encoder (`EncoderLayer`).
    Parameters: backbone, position_embedding (learned only), input_proj, query_embed [Q, E]
    (the query position embeddings), encoder_layer{i}, decoder, class_embed, bbox_embed.
    """

    backbone: nn.Module
    position_embedding: nn.Module
    decoder: nn.Module
    neck: Callable[..., nn.Module]
    num_logits: int
    num_queries: int = 300
    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False,
                 intermediates: bool = False, targets: dict | None = None) -> dict[str, Any]:
        """images: [B, H, W, 3] uint8 (or normalized floats); mask: [B, H, W] bool (True =
        real pixel); targets: unused (the queries do not depend on them).

        Returns float32 predictions of every decoder layer:
          pred_logits [L, B, Q, K] sigmoid logits, pred_boxes [L, B, Q, 4] normalized cxcywh.
        With `intermediates=True` also (in the compute dtype): backbone_stages, projected
        [B, h, w, E], pos [B, h, w, E], memory [B, h, w, E], memory_mask [B, h, w] bool,
        decoder_states [L, B, Q, E] (after the final norm), and the decoder's references
        (`decode`).
        """
        del targets
        deterministic = not train
        backbone_out, levels, level_pos = embed_image(images, mask, self.backbone, self.position_embedding, self.neck,
                                                      self.dtype, train)
        src, feature_mask = levels.features[0], levels.masks[0]
        batch, h, w, _ = src.shape
        flat = flatten_levels(levels, level_pos)
        pos, memory_mask = flat.pos.astype(self.dtype), flat.mask
        memory = self.encode(flat.src, pos, memory_mask, deterministic)
        hs, boxes, references = self.decode(memory, pos, memory_mask, deterministic)
        logits = class_head(self.num_logits, self.dtype)(hs)
        outputs = {"pred_logits": logits.astype(jnp.float32), "pred_boxes": boxes}
        if intermediates:
            outputs.update(backbone_stages=backbone_out.stages, projected=src, pos=pos.reshape(batch, h, w, -1),
                           memory=memory.reshape(batch, h, w, -1), memory_mask=feature_mask, decoder_states=hs,
                           **references)
        return outputs

    def encode(self, src, pos, memory_mask, deterministic):
        """DETR's encoder: src, pos [B, S, E], memory_mask [B, S] bool -> memory [B, S, E]."""
        for i in range(self.num_encoder_layers):
            src = EncoderLayer(self.num_heads, self.dim_feedforward, self.dropout, dtype=self.dtype,
                               name=f"encoder_layer{i}")(src, pos, memory_mask, deterministic)
        return src

    def decode(self, memory, pos, memory_mask, deterministic):
        """The learned queries through the decoder and the box head: memory, pos [B, S, E],
        memory_mask [B, S] -> (states [L, B, Q, E], boxes [L, B, Q, 4] float32,
        {"reference_points": [B, Q, 2] normalized (x, y), float32, the same for every layer})."""
        queries = LearnedQueries(self.num_queries, self.hidden_dim, self.dtype)
        nn.share_scope(self, queries)  # its query_embed is the detector's, as in the reference
        hs, reference = self.decoder(memory, pos, memory_mask, queries(memory.shape[0]), deterministic)
        box_head = BoxHead(self.hidden_dim, dtype=self.dtype, zero_last=True, name="bbox_embed")
        boxes = box_head(hs, reference=inverse_sigmoid(reference))
        return hs, boxes, {"reference_points": reference}


def build_conditional_family(detector: type, decoder: type, position_embedding: nn.Module, model_config,
                             dtype: Any, num_logits: int) -> nn.Module:
    """A `detector` (ConditionalDETR or a descendant) with its `decoder` class (fields
    num_layers, num_heads, dim_feedforward, dropout, dtype) of the `model` config section,
    computing in `dtype` with `num_logits` (K) sigmoid class outputs; post-norm only (as the
    references: model.pre_norm=True is a ValueError)."""
    m = model_config
    transformer_settings(m, {})
    if m.pre_norm:
        raise ValueError(f"model.pre_norm=True: {detector.__name__} is post-norm only (as its reference)")
    return detector(
        backbone=BACKBONES[m.backbone](m, dtype),
        position_embedding=position_embedding,
        decoder=decoder(num_layers=m.num_decoder_layers, num_heads=m.num_heads, dim_feedforward=m.dim_feedforward,
                        dropout=m.dropout, dtype=dtype),
        neck=NECKS[m.neck](m, dtype),
        num_logits=num_logits,
        num_queries=m.num_queries,
        hidden_dim=m.hidden_dim,
        num_heads=m.num_heads,
        num_encoder_layers=m.num_encoder_layers,
        dim_feedforward=m.dim_feedforward,
        dropout=m.dropout,
        dtype=dtype,
    )


def build_conditional_detr(model_config, dtype: Any, num_logits: int) -> ConditionalDETR:
    """Conditional DETR of the `model` config section computing in `dtype`, with
    `num_logits` (K) sigmoid class outputs."""
    position_embedding = POSITION_EMBEDDINGS[model_config.position_embedding](model_config, dtype)
    return build_conditional_family(ConditionalDETR, ConditionalDecoder, position_embedding, model_config, dtype,
                                    num_logits)
