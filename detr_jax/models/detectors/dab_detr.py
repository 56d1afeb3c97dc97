"""DAB-DETR (Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR",
2022): Conditional DETR's decoder layers with 4-d anchor boxes as queries, refined by the
box head in every layer; the `dab_detr` entry of DETECTORS (`build_dab_detr`), exact to
Hugging Face transformers' `DabDetrForObjectDetection` with its defaults.

What it adds to Conditional DETR's parts (`detr_jax.models.conditional_decoder`):
- queries are learned anchor boxes `refpoint_embed` [Q, 4] (sigmoid: normalized cxcywh);
  the decoder contents start at zero;
- each layer's query position is ref_point_head(the sine embedding of its anchor, 4 x E/2
  channels), its cross-attention position the (x, y) half of that embedding times
  query_scale(content) (1 in the first layer), width/height-modulated: the x channels x
  w_ref / w, the y channels x h_ref / h, with (w_ref, h_ref) = sigmoid(ref_anchor_head(
  content));
- box refinement: after each layer the (shared) box head predicts the next anchor as an
  offset from the current one, from the layer's raw output; the next layer gets it
  detached (gradient-free), the loss of the next layer's boxes sees it undetached;
- the encoder scales the image position encoding by query_scale(memory) before each layer;
- the image position encoding is the sine one with temperature 20; FFNs use a PReLU.

HF's defaults and only those: query_dim 4, random_refpoints_xy False, keep_query_pos
False, num_patterns 0, one box head shared by all layers (bbox_embed_diff_each_layer
False), height/width-modulated attention (decoder_modulate_hw_attn True), query_scale_type
"cond_elewise", temperature_height = temperature_width = 20, post-norm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from detr_jax.models.conditional_decoder import ConditionalDecoder, ConditionalDecoderLayer, inverse_sigmoid, sine_embedding
from detr_jax.models.detectors.conditional_detr import ConditionalDETR, build_conditional_family
from detr_jax.models.detr import MLP, BoxHead
from detr_jax.models.position_encoding import SinePositionEmbedding
from detr_jax.models.queries import AnchorBoxQueries, QueryState
from detr_jax.models.transformer import EncoderLayer, layer_norm

# The image position encoding's temperature (HF's temperature_height/width defaults).
POSITION_TEMPERATURE = 20.0


class DABDecoder(ConditionalDecoder):
    """DAB-DETR's decoder (the module docstring), with ConditionalDecoder's fields: anchors
    in, refined anchors and boxes out.

    Parameters: layer{i} (ConditionalDecoderLayer with PReLU FFNs, the first with
    q_pos_proj), norm (the final LayerNorm), query_scale, ref_point_head, ref_anchor_head
    (2-layer MLPs) and bbox_embed (the box head, shared by the layers and the outputs).
    """

    @nn.compact
    def __call__(self, memory, pos, memory_mask, queries: QueryState, deterministic: bool = True):
        """memory, pos: [B, S, E]; memory_mask: [B, S] bool (True = real); queries: content
        [B, Q, E] and reference [B, Q, 4] normalized cxcywh anchors, float32
        (`queries.AnchorBoxQueries`).

        Returns (states [L, B, Q, E] each layer's output through the final LayerNorm;
        references [L + 1, B, Q, 4] float32, the anchors each layer reads and (last) the
        last layer's refinement; boxes [L, B, Q, 4] float32, each layer's predictions,
        offsets from its anchors).
        """
        embed = memory.shape[-1]
        query_scale = MLP(embed, embed, 2, self.dtype, name="query_scale")
        ref_point_head = MLP(embed, embed, 2, self.dtype, name="ref_point_head")
        ref_anchor_head = MLP(embed, 2, 2, self.dtype, name="ref_anchor_head")
        bbox_embed = BoxHead(embed, dtype=self.dtype, zero_last=True, name="bbox_embed")
        norm = layer_norm("norm", self.dtype)
        tgt, reference = queries.content, queries.reference
        references, states = [reference], []
        for i in range(self.num_layers):
            sine = sine_embedding(reference, embed // 2)  # [B, Q, 2E]: y, x, w, h
            query_pos = ref_point_head(sine.astype(self.dtype))
            position = sine[..., :embed] * (1.0 if i == 0 else query_scale(tgt).astype(jnp.float32))
            size = jax.nn.sigmoid(ref_anchor_head(tgt).astype(jnp.float32))  # (w, h) the attention expects
            modulation = jnp.repeat(jnp.stack([size[..., 1] / reference[..., 3], size[..., 0] / reference[..., 2]],
                                              axis=-1), embed // 2, axis=-1)
            layer = ConditionalDecoderLayer(self.num_heads, self.dim_feedforward, self.dropout, use_query_pos=i == 0,
                                            dtype=self.dtype, prelu=True, name=f"layer{i}")
            tgt = layer(tgt, memory, pos, query_pos, (position * modulation).astype(self.dtype), memory_mask,
                        deterministic)
            refined = bbox_embed(tgt, reference=inverse_sigmoid(reference))
            references.append(refined)
            # The next layer reads the refinement detached; the loss of its boxes sees it undetached.
            reference = jax.lax.stop_gradient(refined)
            states.append(norm(tgt))
        states, references = jnp.stack(states), jnp.stack(references)
        return states, bbox_embed(states, reference=inverse_sigmoid(references[:-1])), references


class DABDETR(ConditionalDETR):
    """The DAB-DETR detector: ConditionalDETR's fields and call (`decoder` a DABDecoder),
    its own encoder and queries.

    Parameters: backbone, input_proj, encoder_query_scale, encoder_layer{i} (PReLU FFNs),
    refpoint_embed [Q, 4] (the anchors' logits), decoder, class_embed. Intermediates:
    reference_boxes [L + 1, B, Q, 4] (DABDecoder's references).
    """

    def encode(self, src, pos, memory_mask, deterministic):
        """src, pos [B, S, E], memory_mask [B, S] -> memory [B, S, E]; each layer's position
        encoding scaled by encoder_query_scale(its input)."""
        query_scale = MLP(self.hidden_dim, self.hidden_dim, 2, self.dtype, name="encoder_query_scale")
        for i in range(self.num_encoder_layers):
            layer = EncoderLayer(self.num_heads, self.dim_feedforward, self.dropout, dtype=self.dtype, prelu=True,
                                 name=f"encoder_layer{i}")
            src = layer(src, pos * query_scale(src), memory_mask, deterministic)
        return src

    def decode(self, memory, pos, memory_mask, deterministic):
        """The anchor queries through the DABDecoder -> (states, boxes, {"reference_boxes"})."""
        queries = AnchorBoxQueries(self.num_queries, self.hidden_dim, self.dtype)
        nn.share_scope(self, queries)  # its refpoint_embed is the detector's, as in the reference
        states, boxes, references = self.decoder(memory, pos, memory_mask, queries(memory.shape[0]), deterministic)
        return states, boxes, {"reference_boxes": references}


def build_dab_detr(model_config, dtype: Any, num_logits: int) -> DABDETR:
    """DAB-DETR of the `model` config section computing in `dtype`, with `num_logits` (K)
    sigmoid class outputs. Its image position encoding is DAB-DETR's own (sine, temperature
    20): model.position_embedding must be "sine"."""
    m = model_config
    if m.position_embedding != "sine":
        raise ValueError(f"model.position_embedding={m.position_embedding!r}: dab_detr has the sine encoding only")
    position_embedding = SinePositionEmbedding(num_pos_feats=m.hidden_dim // 2, temperature=POSITION_TEMPERATURE)
    return build_conditional_family(DABDETR, DABDecoder, position_embedding, m, dtype, num_logits)
