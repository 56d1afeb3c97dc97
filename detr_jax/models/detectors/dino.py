"""DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes for End-to-End
Object Detection", ICLR 2023): Deformable DETR with box refinement and two-stage proposals
plus three training-time mechanisms. The `dino` entry of DETECTORS (`build_dino`), exact to
the official IDEA-Research/DINO (`models/dino/dino.py`, `deformable_transformer.py`,
`dn_components.py`; config/DINO/DINO_4scale.py and DINO_5scale.py) given the same weights
and, in training, the same denoising draws (tests/test_parity_dino.py).

What it shares with Deformable DETR (it subclasses `DeformableDETR` and reuses `encode`):
the backbone, the multi-level neck (`neck.ChannelMapper`: res3..res5 + one stride-64 level
for 4 scales, res2..res5 + one for 5 scales), the deformable encoder, the encoder proposals
(`queries.TopKProposals`) and the decoder (`DeformableDecoder`). What it switches on:

  mixed query selection  the top-Q encoder proposals (ranked by their largest class logit)
                 give the reference boxes, detached; the content queries are learned
                 (`tgt_embed` [Q, E]); `TopKProposals(select_by_max=True, mixed=True)`;
  query positions from the boxes  every decoder layer's query position is `ref_point_head`
                 (an MLP 2E -> E -> E) of the sine embedding of its reference box; a
                 LayerNorm `norm` on the decoder's outputs before the heads
                 (`DeformableDecoder(position_from_reference=True, final_norm=True)`);
  look-forward-twice  layer i's boxes refine the un-detached boxes of layer i - 1
                 (`DeformableDecoder(look_forward_twice=True)`);
  contrastive denoising  in training, `models.denoising.contrastive_denoising` groups of
                 noised ground truth (label embedding `label_enc` [K + 1, E]) in front of the
                 matching queries, kept apart by the self-attention mask; their predictions are
                 the `dn` branch, matched by construction (`target_to_query`).

Heads as the official defaults (`dec_pred_class_embed_share`, `dec_pred_bbox_embed_share`:
one `class_embed` and one `bbox_embed` for every decoder layer; `two_stage_*_share` False:
the proposals have their own `enc_out_class_embed`, `enc_out_bbox_embed`). Box heads end in
zeros (no size bias), class heads start at logit(0.01). The `enc` branch is the official
`interm_outputs`: the logits and (un-detached) boxes of the Q selected proposals, trained
against the targets with their classes (not class-agnostically, unlike Deformable DETR).
The image position encoding is DINO's sine one: temperature 20, no half-pixel offset.
Sigmoid focal class convention. References' logits are clipped at eps 1e-3 (DINO's
`inverse_sigmoid`).

Hybrid matching (H-DETR, `models.hybrid`) is a switch: `num_queries_one2many` extra
queries in training, from the top-(Q + Q_one2many) proposals (their learned content
`tgt_embed` grows to Q + Q_one2many rows; the best Q are the one-to-one queries, exactly
those chosen at inference), after the denoising and one-to-one queries, seeing only each
other (and seen by neither: the denoising and one-to-one outputs are those without the
switch); their predictions are the `one2many` branch, matched against the targets repeated
`k_one2many` times, weighted by `loss.one2many_coef`. The `enc` branch stays the Q
one-to-one proposals. Official H-Deformable-DETR's hybrid-branch recipe is this model
without denoising (its `--mixed_selection --look_forward_twice` two-stage Deformable
DETR); the H-DETR paper's DINO results add it to DINO as here (no official code: the
isolation from the denoising queries is ours). For example (H-Deformable-DETR's 12-epoch
configs: 300 + 1500 queries, k = 6, lambda 1):

    config.model.num_queries = 300
    config.model.transformer_args = {"dn_number": 100, "num_queries_one2many": 1500, "k_one2many": 6}
    config.loss.one2many_coef = 1.0

Where the denoising part's fixed shapes differ from the official `prepare_for_cdn` (groups
sized by data.max_boxes, not by the batch's largest target count; zero objects) see
`models.denoising`: both coincide when the batch's largest count equals data.max_boxes and
dn_number >= 50.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from detr_jax.models.backbones import BACKBONES
from detr_jax.models.conditional_decoder import inverse_sigmoid
from detr_jax.models.deformable_transformer import DeformableDecoder, DeformableEncoder
from detr_jax.models.denoising import DenoisingNoise, contrastive_denoising
from detr_jax.models.detectors.conditional_detr import class_head
from detr_jax.models.detectors.deformable_detr import DeformableDETR, _box_bias, multi_level_neck
from detr_jax.models.detr import BoxHead
from detr_jax.models.hybrid import HYBRID_ARGS, check_hybrid_args, isolate_last, split_one2many
from detr_jax.models.position_encoding import POSITION_EMBEDDINGS, SinePositionEmbedding
from detr_jax.models.queries import TopKProposals
from detr_jax.models.settings import transformer_settings

# model.transformer_args: its keys and their defaults (config/DINO/DINO_4scale.py, with the
# training scripts' override dn_box_noise_scale=1.0).
TRANSFORMER_ARGS = {
    "num_feature_levels": 4,      # 4 scales (res3..res5 + one); 5: res2..res5 + one (DINO_5scale)
    "encoder_n_points": 4,
    "decoder_n_points": 4,
    "dn_number": 100,             # denoising queries per kind (0: no denoising)
    "dn_label_noise_ratio": 0.5,
    "dn_box_noise_scale": 1.0,
    **HYBRID_ARGS,                # hybrid matching (models.hybrid): num_queries_one2many, k_one2many
}
# DINO's image position encoding (pe_temperatureH = pe_temperatureW = 20, normalized, no offset).
POSITION_TEMPERATURE = 20.0
# DINO's inverse_sigmoid clipping (util/misc.py).
INVERSE_SIGMOID_EPS = 1e-3
# The neck's stages for each number of levels (the official return_interm_indices).
IN_STAGES = {4: ("res3", "res4", "res5"), 5: ("res2", "res3", "res4", "res5")}


def transformer_args(model_config) -> dict[str, Any]:
    """TRANSFORMER_ARGS updated with `model.transformer_args`; ValueError for an unknown key
    or a bad value."""
    args = transformer_settings(model_config, TRANSFORMER_ARGS)
    args.update(check_hybrid_args(args))
    for key in ("num_feature_levels", "encoder_n_points", "decoder_n_points", "dn_number"):
        value = args[key]
        low = 0 if key == "dn_number" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"model.transformer_args {key}={value!r}: expected an integer >= {low}")
    for key in ("dn_label_noise_ratio", "dn_box_noise_scale"):
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or value < 0:
            raise ValueError(f"model.transformer_args {key}={value!r}: expected a number >= 0")
    return {k: float(v) if isinstance(TRANSFORMER_ARGS[k], float) else int(v) for k, v in args.items()}


class DINO(DeformableDETR):
    """The DINO detector from its parts (module docstring); DeformableDETR's fields (with
    box refinement and two-stage always on) plus the denoising settings.

    Fields besides DeformableDETR's:
      dn_number: denoising queries of each kind (the official dn_number; G = max(1,
        dn_number // data.max_boxes) groups); 0 turns denoising off.
      dn_label_noise_ratio, dn_box_noise_scale: the official ones.
      num_queries_one2many, k_one2many: hybrid matching (`models.hybrid`; 0: off).
    Parameters: backbone, input_proj, level_embed, encoder, decoder (its layers,
    ref_point_head, norm), enc_output, enc_output_norm, tgt_embed [Q, E], label_enc
    [K + 1, E] (row K unused: padded denoising slots get zeros, as the official), class_embed,
    bbox_embed (shared by every decoder layer), enc_out_class_embed, enc_out_bbox_embed.
    """

    with_box_refine: bool = True
    two_stage: bool = True
    dn_number: int = 100
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 1.0
    num_queries_one2many: int = 0
    k_one2many: int = 6

    @nn.compact
    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False,
                 intermediates: bool = False, targets: dict | None = None,
                 denoising_noise: DenoisingNoise | None = None) -> dict[str, Any]:
        """images: [B, H, W, 3] uint8 (or normalized floats); mask: [B, H, W] bool (True =
        real pixel); targets (training): {"labels" [B, M], "boxes" [B, M, 4], "valid" [B, M]}
        make the denoising queries when dn_number > 0, with the draws `denoising_noise` or,
        without them, drawn from the "queries" rng stream.

        Returns float32 predictions of every decoder layer for the Q matching queries:
        pred_logits [L, B, Q, K] sigmoid logits, pred_boxes [L, B, Q, 4] normalized cxcywh;
        "enc": {pred_logits [1, B, Q, K], pred_boxes [1, B, Q, 4]} the selected proposals;
        with targets and denoising also "dn": {pred_logits [L, B, Qdn, K], pred_boxes [L, B,
        Qdn, 4], target_to_query [B, G * M]}; in training with num_queries_one2many > 0
        also "one2many" (`hybrid.split_one2many`). With `intermediates=True` also
        DeformableDETR's (decoder_states [L, B, Qdn + Q (+ Q_one2many), E], references over
        all queries) and proposal_indices [B, Q].
        """
        deterministic = not train
        backbone_out, levels, flat, memory = self.encode(images, mask, train)
        layers = self.decoder.num_layers
        class_embed = class_head(self.num_logits, self.dtype, name="class_embed")
        bbox_embed = self._box_head("bbox_embed")
        enc_class = class_head(self.num_logits, self.dtype, name="enc_out_class_embed")
        enc_box = self._box_head("enc_out_bbox_embed")
        proposals = TopKProposals(self.num_queries + self.num_queries_one2many, self.dtype, select_by_max=True,
                                  mixed=True)
        nn.share_scope(self, proposals)  # enc_output, enc_output_norm, tgt_embed at the detector's level
        queries, enc = proposals(memory, flat.mask, flat.spatial_shapes, enc_class, enc_box,
                                 count=self.num_queries + (self.num_queries_one2many if train else 0))
        # The best Q are the one-to-one queries, the rest (training only) the one-to-many ones.
        one2many = max(0, queries.num_queries - self.num_queries)
        enc["indices"] = enc["indices"][:, :queries.num_queries - one2many]
        selected = enc["indices"][..., None]
        outputs = {"enc": {"pred_logits": jnp.take_along_axis(enc["pred_logits"], selected, axis=1)[None],
                           "pred_boxes": jnp.take_along_axis(enc["pred_boxes"], selected, axis=1)[None]}}

        label_enc = self.param("label_enc", nn.initializers.normal(1.0), (self.num_logits + 1, self.hidden_dim))
        dn = None
        if targets is not None and self.dn_number > 0:
            # The official pads denoising slots with zeros, never reading label_enc's last row.
            table = jnp.concatenate([label_enc[:self.num_logits], jnp.zeros((1, self.hidden_dim), label_enc.dtype)])
            draws = dict(noise=denoising_noise) if denoising_noise is not None else dict(rng=self.make_rng("queries"))
            dn = contrastive_denoising(
                targets, table, num_classes=self.num_logits, num_queries=queries.num_queries,
                num_denoising=self.dn_number, label_noise_ratio=self.dn_label_noise_ratio,
                box_noise_scale=self.dn_box_noise_scale, padded_box=0.5, **draws)
            # The official feeds its decoder the boxes' logits (eps 1e-3) and takes their sigmoid.
            boxes = jax.nn.sigmoid(inverse_sigmoid(dn.queries.reference, INVERSE_SIGMOID_EPS))
            dn = dn.replace(queries=dn.queries.replace(content=dn.queries.content.astype(self.dtype), reference=boxes))
            queries = dn.prepend(queries)
        if one2many:
            queries = isolate_last(queries, one2many)
        states, references, boxes = self.decoder(memory, flat.mask, flat.spatial_shapes, flat.valid_ratios, queries,
                                                 [bbox_embed] * layers, True, deterministic)
        logits = class_embed(states).astype(jnp.float32)
        num_dn = 0 if dn is None else dn.num_dn_queries
        matching_logits, matching_boxes = logits[:, :, num_dn:], boxes[:, :, num_dn:]
        if one2many:
            matching_logits, matching_boxes, outputs["one2many"] = split_one2many(
                matching_logits, matching_boxes, one2many, targets, self.k_one2many)
        outputs.update(pred_logits=matching_logits, pred_boxes=matching_boxes)
        if dn is not None:
            outputs["dn"] = {"pred_logits": logits[:, :, :num_dn], "pred_boxes": boxes[:, :, :num_dn],
                             "target_to_query": dn.target_to_query}
        if intermediates:
            outputs.update(self.encoder_intermediates(backbone_out, levels, flat, memory), decoder_states=states,
                           references=references, proposal_indices=enc["indices"])
        return outputs

    def _box_head(self, name: str) -> BoxHead:
        return BoxHead(self.hidden_dim, dtype=self.dtype, zero_last=True, last_bias_init=_box_bias(0.0), name=name)


def build_dino(model_config, dtype: Any, num_logits: int) -> DINO:
    """DINO of the `model` config section computing in `dtype`, with `num_logits` (K)
    sigmoid class outputs; its own settings from model.transformer_args (TRANSFORMER_ARGS).
    model.position_embedding "sine" is DINO's (temperature 20, no offset); model.neck must
    be "channel_mapper" (its stages and levels are set from num_feature_levels: 4 or 5).
    Post-norm only (model.pre_norm=True is a ValueError)."""
    m = model_config
    args = transformer_args(m)
    if m.pre_norm:
        raise ValueError("model.pre_norm=True: dino is post-norm only (as its reference)")
    levels = args["num_feature_levels"]
    if levels not in IN_STAGES:
        raise ValueError(f"model.transformer_args num_feature_levels={levels}: dino has 4 or 5 scales")
    neck = multi_level_neck(m, dtype, "dino", num_levels=levels, in_stages=IN_STAGES[levels])
    if m.position_embedding == "sine":
        position_embedding = SinePositionEmbedding(num_pos_feats=m.hidden_dim // 2, temperature=POSITION_TEMPERATURE)
    else:
        position_embedding = POSITION_EMBEDDINGS[m.position_embedding](m, dtype)
    layer_args = dict(num_heads=m.num_heads, dim_feedforward=m.dim_feedforward, dropout=m.dropout, dtype=dtype)
    return DINO(
        backbone=BACKBONES[m.backbone](m, dtype),
        position_embedding=position_embedding,
        neck=neck,
        encoder=DeformableEncoder(num_layers=m.num_encoder_layers, num_points=args["encoder_n_points"], **layer_args),
        decoder=DeformableDecoder(num_layers=m.num_decoder_layers, num_points=args["decoder_n_points"],
                                  position_from_reference=True, final_norm=True, look_forward_twice=True,
                                  inverse_sigmoid_eps=INVERSE_SIGMOID_EPS, **layer_args),
        num_logits=num_logits,
        num_queries=m.num_queries,
        hidden_dim=m.hidden_dim,
        num_feature_levels=levels,
        dn_number=args["dn_number"],
        dn_label_noise_ratio=args["dn_label_noise_ratio"],
        dn_box_noise_scale=args["dn_box_noise_scale"],
        num_queries_one2many=args["num_queries_one2many"],
        k_one2many=args["k_one2many"],
        dtype=dtype,
    )
