"""Deformable DETR (Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End
Object Detection", 2021): multi-scale features (`neck.ChannelMapper`) through a deformable
encoder and decoder (`detr_jax.models.deformable_transformer`), K sigmoid class logits
(focal loss). The `deformable_detr` entry of DETECTORS (`build_deformable_detr`), exact to
Hugging Face transformers' `DeformableDetrForObjectDetection` (and so to the official
fundamentalvision/Deformable-DETR) in its three variants:

  plain            learned queries `query_embed` [Q, 2E] (position | content) with 2-d
                   reference points sigmoid(reference_points(position))
                   (`queries.ReferencePointQueries`); one class head and one box head
                   shared by every decoder layer, boxes offset from the reference point;
  with_box_refine  a class head and a box head per layer (class_embed_{i}, bbox_embed_{i});
                   each layer's boxes are the next layer's reference boxes, detached
                   (`DeformableDecoder`, refine=True);
  two_stage        (needs with_box_refine, as the references) the queries are the top-Q
                   encoder proposals (`queries.TopKProposals`), scored and boxed by an extra
                   pair of heads, class_embed_{L} and bbox_embed_{L}; the proposals of every
                   position are the `enc` output branch, trained class-agnostically (every
                   target counts as class 0: the official criterion's `bin_targets`).

The image position encoding is the sine one with Deformable DETR's half-pixel offset
(`SinePositionEmbedding(offset=0.5)`), plus a learned `level_embed` [L, E] per level.
Settings of its own are in `model.transformer_args` (TRANSFORMER_ARGS).

Hybrid matching (H-DETR, `models.hybrid`, the official HDETR/H-Deformable-DETR) is a switch
in any variant: `num_queries_one2many` extra queries in training (learned: `query_embed`
grows to Q + Q_one2many rows; two-stage: the top-(Q + Q_one2many) proposals), kept from the
Q one-to-one queries by the self-attention mask; their predictions are the `one2many`
branch, matched against the targets repeated `k_one2many` times and weighted by
`loss.one2many_coef`. At inference only the Q one-to-one queries run. The official recipe
(H-Deformable-DETR's 12-epoch hybrid-branch configs, which also turn on DINO's mixed
selection and look-forward-twice, `model.arch="dino"` here):

    config.model.transformer_args = {"with_box_refine": True, "two_stage": True,
                                     "num_queries_one2many": 1500, "k_one2many": 6}
    config.model.num_queries = 300
    config.loss.one2many_coef = 1.0
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from detr_jax.models.backbones import BACKBONES
from detr_jax.models.deformable_transformer import DeformableDecoder, DeformableEncoder
from detr_jax.models.detectors.conditional_detr import class_head
from detr_jax.models.detr import BoxHead, embed_image
from detr_jax.models.hybrid import HYBRID_ARGS, check_hybrid_args, isolate_last, split_one2many
from detr_jax.models.neck import NECKS, flatten_levels
from detr_jax.models.position_encoding import POSITION_EMBEDDINGS, SinePositionEmbedding
from detr_jax.models.queries import ReferencePointQueries, TopKProposals
from detr_jax.models.settings import transformer_settings

# model.transformer_args: its keys and their defaults (the references' DeformableDetrConfig
# and main.py defaults).
TRANSFORMER_ARGS = {
    "with_box_refine": False,   # a box head per decoder layer, refining the references layer by layer
    "two_stage": False,         # queries from the top encoder proposals (needs with_box_refine)
    "num_feature_levels": 4,    # levels of the neck: res3..res5 and a stride-64 one
    "encoder_n_points": 4,      # sampling points per head and level, encoder
    "decoder_n_points": 4,      # the same, decoder cross-attention
    **HYBRID_ARGS,              # hybrid matching (models.hybrid): num_queries_one2many, k_one2many
}
# The sine position encoding's offset (Hugging Face's DeformableDetrSinePositionEmbedding).
POSITION_OFFSET = 0.5
# The box heads' initial width/height logit (the references' -2.0; two-stage: 0).
BOX_SIZE_BIAS = -2.0


def transformer_args(model_config) -> dict[str, Any]:
    """TRANSFORMER_ARGS updated with `model.transformer_args`; ValueError for an unknown key
    or a bad value."""
    args = transformer_settings(model_config, TRANSFORMER_ARGS)
    hybrid = check_hybrid_args(args)
    for key, default in TRANSFORMER_ARGS.items():
        if key in hybrid:
            continue
        value = args[key]
        if isinstance(default, bool):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"model.transformer_args {key}={value!r}: expected True or False")
        elif isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"model.transformer_args {key}={value!r}: expected an integer >= 1")
    if args["two_stage"] and not args["with_box_refine"]:
        raise ValueError("model.transformer_args two_stage=True needs with_box_refine=True (as the references: the "
                         "proposal heads are the box-refinement heads' extra pair)")
    return {k: bool(v) if isinstance(TRANSFORMER_ARGS[k], bool) else int(v) for k, v in args.items()} | hybrid


def _box_bias(size_logit: float) -> Callable:
    """A box head's last bias: zero offsets of the centre, `size_logit` for width and height."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray([0.0, 0.0, size_logit, size_logit], dtype)

    return init


class DeformableDETR(nn.Module):
    """The Deformable DETR detector from its parts (module docstring).

    Fields:
      backbone, position_embedding: a BACKBONES module (with the named stages the neck
        reads) and a position encoding (`mask [B, h, w] -> [B, h, w, E]`) for every level.
      neck: a multi-level neck's constructor (`neck.ChannelMapper`), instantiated as
        "input_proj", giving `num_feature_levels` levels.
      encoder, decoder: a `DeformableEncoder` and a `DeformableDecoder`.
      num_logits: C = K, the sigmoid class heads' outputs.
      num_queries: Q (learned queries, or the proposals kept in two-stage); hidden_dim: E.
      num_feature_levels, with_box_refine, two_stage: model.transformer_args'.
      num_queries_one2many, k_one2many: hybrid matching (`models.hybrid`; 0: off).
    Parameters: backbone, input_proj, level_embed [levels, E], encoder, decoder; plain:
    query_embed [Q + num_queries_one2many, 2E], reference_points, class_embed, bbox_embed; with_box_refine:
    class_embed_{i} and bbox_embed_{i} for each decoder layer i (two-stage: and i = L, the
    proposals', with enc_output, enc_output_norm, pos_trans, pos_trans_norm instead of
    query_embed and reference_points).
    """

    backbone: nn.Module
    position_embedding: nn.Module
    neck: Callable[..., nn.Module]
    encoder: nn.Module
    decoder: nn.Module
    num_logits: int
    num_queries: int = 300
    hidden_dim: int = 256
    num_feature_levels: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    num_queries_one2many: int = 0
    k_one2many: int = 6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False,
                 intermediates: bool = False, targets: dict | None = None) -> dict[str, Any]:
        """images: [B, H, W, 3] uint8 (or normalized floats); mask: [B, H, W] bool (True =
        real pixel); targets: {"labels" [B, M], "boxes" [B, M, 4], "valid" [B, M]}, read
        only in training with hybrid matching (the one2many branch's targets).

        Returns float32 predictions of every decoder layer: pred_logits [L, B, Q, K] sigmoid
        logits, pred_boxes [L, B, Q, 4] normalized cxcywh; two-stage also the branch "enc":
        {pred_logits [1, B, S, K], pred_boxes [1, B, S, 4] of every encoder position's
        proposal, class_agnostic True (`losses.SetCriterion`)}.
        With `intermediates=True` also (compute dtype unless said): backbone_stages;
        projected, pos (with the level embedding), memory: per level [B, h_l, w_l, E];
        memory_mask: per level [B, h_l, w_l] bool; valid_ratios [B, levels, 2] float32;
        decoder_states [L, B, Q, E] (each layer's output, as the heads read it);
        references: the decoder's (a tuple of L + 1 float32 [B, Q, 2 or 4], see
        `DeformableDecoder`); two-stage: proposal_indices [B, Q] (the encoder positions
        chosen). In training with num_queries_one2many > 0 also the branch "one2many"
        (`hybrid.split_one2many`: pred_logits, pred_boxes [L, B, Q_one2many, ...] and the
        targets repeated k_one2many times); decoder_states and references then cover the
        Q + Q_one2many queries. The deformable attentions' sampling locations and weights are sown into
        "intermediates" (apply with `mutable=["intermediates"]`).
        """
        deterministic = not train
        backbone_out, levels, flat, memory = self.encode(images, mask, train)

        class_heads, box_heads = self.heads()
        layers = self.decoder.num_layers
        count = self.num_queries + (self.num_queries_one2many if train else 0)
        outputs = {}
        if self.two_stage:
            proposals = TopKProposals(self.num_queries + self.num_queries_one2many, self.dtype)
            nn.share_scope(self, proposals)  # enc_output, pos_trans, ... at the detector's level, as the reference
            queries, enc = proposals(memory, flat.mask, flat.spatial_shapes, class_heads[layers], box_heads[layers],
                                     count=count)
            # Official two-stage Deformable DETR trains the proposals against class-agnostic targets.
            outputs["enc"] = {"pred_logits": enc["pred_logits"][None], "pred_boxes": enc["pred_boxes"][None],
                              "class_agnostic": jnp.asarray(True)}
        else:
            generator = ReferencePointQueries(self.num_queries + self.num_queries_one2many, self.hidden_dim, self.dtype)
            nn.share_scope(self, generator)  # query_embed and reference_points at the detector's level
            queries = generator(memory.shape[0], count=count)
        # The first Q are the one-to-one queries (two-stage: the best proposals), the rest
        # (training only) the one-to-many ones.
        one2many = max(0, queries.num_queries - self.num_queries)
        if one2many:
            queries = isolate_last(queries, one2many)
        states, references, boxes = self.decoder(memory, flat.mask, flat.spatial_shapes, flat.valid_ratios, queries,
                                                 box_heads[:layers], self.with_box_refine, deterministic)
        if self.with_box_refine:
            logits = jnp.stack([class_heads[i](states[i]) for i in range(layers)])
        else:
            logits = class_heads[0](states)
        logits = logits.astype(jnp.float32)
        if one2many:
            logits, boxes, outputs["one2many"] = split_one2many(logits, boxes, one2many, targets, self.k_one2many)
        outputs.update(pred_logits=logits, pred_boxes=boxes)
        if intermediates:
            outputs.update(self.encoder_intermediates(backbone_out, levels, flat, memory), decoder_states=states,
                           references=references)
            if self.two_stage:
                outputs["proposal_indices"] = enc["indices"][:, :queries.num_queries - one2many]
        return outputs

    def encode(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool):
        """The image through the backbone, the neck (+ the position encodings and the learned
        `level_embed`) and the deformable encoder, inside the compact call.

        Returns (backbone output, FeatureLevels, FlatLevels (pos with the level embedding),
        memory [B, S, E])."""
        backbone_out, levels, level_pos = embed_image(images, mask, self.backbone, self.position_embedding, self.neck,
                                                      self.dtype, train)
        if len(levels.features) != self.num_feature_levels:
            raise ValueError(f"the neck gave {len(levels.features)} levels, model.transformer_args "
                             f"num_feature_levels is {self.num_feature_levels}")
        level_embed = self.param("level_embed", nn.initializers.normal(1.0), (self.num_feature_levels, self.hidden_dim))
        pos = tuple(p + level_embed[level] for level, p in enumerate(level_pos))
        flat = flatten_levels(levels, pos)
        memory = self.encoder(flat.src.astype(self.dtype), flat.pos.astype(self.dtype), flat.mask,
                              flat.spatial_shapes, flat.valid_ratios, not train)
        return backbone_out, levels, flat, memory

    @staticmethod
    def encoder_intermediates(backbone_out, levels, flat, memory) -> dict:
        """The intermediates of `encode` (see `__call__`): backbone_stages, projected, pos,
        memory, memory_mask per level, valid_ratios."""
        def per_level(x):  # [B, S, ...] -> per level [B, h_l, w_l, ...]
            return tuple(x[:, s:s + h * w].reshape(x.shape[0], h, w, *x.shape[2:])
                         for (h, w), s in zip(flat.spatial_shapes, flat.level_start_index))

        return dict(backbone_stages=backbone_out.stages, projected=levels.features, pos=per_level(flat.pos),
                    memory=per_level(memory), memory_mask=levels.masks, valid_ratios=flat.valid_ratios)

    def heads(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """(class heads, box heads), one per decoder layer (+ the proposals' in two-stage):
        the same pair L times without box refinement, cloned with it (as the references),
        initialized as the references (class bias logit(0.01), box heads ending in zeros
        but for the width/height bias BOX_SIZE_BIAS of the first, 0 in two-stage)."""
        count = self.decoder.num_layers + (1 if self.two_stage else 0)

        def box_head(name, size_logit):
            return BoxHead(self.hidden_dim, dtype=self.dtype, zero_last=True, last_bias_init=_box_bias(size_logit),
                           name=name)

        if not self.with_box_refine:
            return ([class_head(self.num_logits, self.dtype)] * count,
                    [box_head("bbox_embed", BOX_SIZE_BIAS)] * count)
        return ([class_head(self.num_logits, self.dtype, name=f"class_embed_{i}") for i in range(count)],
                [box_head(f"bbox_embed_{i}", BOX_SIZE_BIAS if i == 0 and not self.two_stage else 0.0)
                 for i in range(count)])


def multi_level_neck(model_config, dtype: Any, arch: str, **settings) -> Callable[..., nn.Module]:
    """`model.neck` for a multi-scale member `arch`, its `settings` (num_levels, in_stages)
    set from the member's model.transformer_args; ValueError if the neck has no such fields
    (it makes one level) or model.neck_args sets them too."""
    m = model_config
    neck = NECKS[m.neck](m, dtype)
    neck_class = getattr(neck, "func", neck)
    names = sorted(settings)
    if not (dataclasses.is_dataclass(neck_class) and set(names) <= {f.name for f in dataclasses.fields(neck_class)}):
        raise ValueError(f"model.neck={m.neck!r} makes one level; {arch} needs a multi-level neck with the fields "
                         f"{', '.join(names)} (model.neck='channel_mapper')")
    if set(names) & set(m.neck_args):
        raise ValueError(f"model.neck_args {', '.join(sorted(set(names) & set(m.neck_args)))}: {arch} sets it from "
                         "model.transformer_args num_feature_levels")
    return functools.partial(neck, **settings)


def build_deformable_detr(model_config, dtype: Any, num_logits: int) -> DeformableDETR:
    """Deformable DETR of the `model` config section computing in `dtype`, with `num_logits`
    (K) sigmoid class outputs; its own settings from model.transformer_args
    (TRANSFORMER_ARGS). model.position_embedding "sine" is Deformable DETR's (with the
    half-pixel offset); model.neck must be a multi-level neck with a `num_levels` field
    (ChannelMapper: "channel_mapper"), which num_feature_levels sets. Post-norm only
    (model.pre_norm=True is a ValueError)."""
    m = model_config
    args = transformer_args(m)
    if m.pre_norm:
        raise ValueError("model.pre_norm=True: deformable_detr is post-norm only (as its reference)")
    neck = multi_level_neck(m, dtype, "deformable_detr", num_levels=args["num_feature_levels"])
    if m.position_embedding == "sine":
        position_embedding = SinePositionEmbedding(num_pos_feats=m.hidden_dim // 2, offset=POSITION_OFFSET)
    else:
        position_embedding = POSITION_EMBEDDINGS[m.position_embedding](m, dtype)
    layer_args = dict(num_heads=m.num_heads, dim_feedforward=m.dim_feedforward, dropout=m.dropout, dtype=dtype)
    return DeformableDETR(
        backbone=BACKBONES[m.backbone](m, dtype),
        position_embedding=position_embedding,
        neck=neck,
        encoder=DeformableEncoder(num_layers=m.num_encoder_layers, num_points=args["encoder_n_points"], **layer_args),
        decoder=DeformableDecoder(num_layers=m.num_decoder_layers, num_points=args["decoder_n_points"], **layer_args),
        num_logits=num_logits,
        num_queries=m.num_queries,
        hidden_dim=m.hidden_dim,
        num_feature_levels=args["num_feature_levels"],
        with_box_refine=args["with_box_refine"],
        two_stage=args["two_stage"],
        num_queries_one2many=args["num_queries_one2many"],
        k_one2many=args["k_one2many"],
        dtype=dtype,
    )
