"""RT-DETR (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024) and
RT-DETRv2 (Lv et al., 2024): the `rt_detr` entry of DETECTORS (`build_rt_detr`), exact to
Hugging Face transformers' `RTDetrForObjectDetection` and `RTDetrV2ForObjectDetection`.

  backbone       a ResNet-vd (`resnet18_vd` .. `resnet101_vd`, frozen BatchNorm); its stages
                 res3..res5 (strides 8, 16, 32) are the encoder's input;
  hybrid encoder `hybrid_encoder.HybridEncoder` (`encoder`): input projections, AIFI on the
                 coarsest level, CCFM fusion, 3 levels of width encoder_hidden_dim;
  decoder input  each level through a 1x1 conv-BN (`decoder_input_proj{l}`), and levels past
                 the third through 3x3 stride-2 conv-BNs, the first of the encoder's coarsest
                 level, each next of the one before (official lyuwenyu/RT-DETR; Hugging Face
                 reads the encoder's coarsest level for every extra level: the same with one
                 extra level, different from two on);
  query selection every position of the flat levels is a proposal (`queries.TopKProposals`
                 with select_by_max and memory_content): `enc_output` + `enc_output_norm`,
                 then `enc_score_head` (K logits) and `enc_bbox_head` (an MLP whose box is
                 relative to the position's anchor, `queries.encoder_proposals`: Hugging
                 Face's `generate_anchors`, 0.05 * 2^level wide); the Q positions with the
                 largest class logit are the queries, their features (detached) the
                 content, their boxes (detached) the references;
  decoder        `DeformableDecoder` with position_from_reference and position_head "box"
                 (`query_pos_head`, an MLP 4 -> 2E -> E of the reference box), box
                 refinement with a class and a box head per layer (`class_embed_{i}`,
                 `bbox_embed_{i}`), no final norm, the references' logits clipped at 1e-5;
  denoising      in training (targets given, num_denoising > 0): `models.denoising`
                 contrastive groups (label embedding `denoising_class_embed` [K + 1, E],
                 padded slots box 0) in front of the matching queries; their predictions
                 are the `dn` branch, matched by construction.

Outputs as DINO's: pred_logits/pred_boxes of every decoder layer, the `enc` branch (the Q
selected proposals' logits and un-detached boxes: Hugging Face's enc_topk_logits,
enc_topk_bboxes) and `dn`. Sigmoid class convention.

RT-DETRv2 is a switch of the decoder's deformable cross-attention
(`MultiScaleDeformableAttention`), in model.transformer_args: decoder_n_points per level (a
list), decoder_offset_scale, decoder_sampling "discrete" (its deployment option); with
the defaults a v2 checkpoint is the v1 model.

Padding: the references have none (their images are resized to 640x640); here the pixel
mask is honoured where the family's shared parts do, which changes nothing on unpadded
images: the anchors are normalized by each image's real extent on its level, the
deformable samples scaled by the levels' valid ratios, padded memory masked out of the
cross-attention and of the proposals. The CNN parts (backbone, CCFM) and AIFI see the
zeroed padding as any CNN does (keep buckets tight).

Images: uint8 pixels are rescaled to [0, 1] (RT-DETR's preprocessing: no mean/std
normalization); floats are taken as already rescaled. The encoder's and the decoder input's
BatchNorms are trainable (`models.batch_norm`): running statistics (`batch_stats`) in
inference, the batch's in training, where a step applies the model with
`mutable=["batch_stats"]` and keeps what it updates.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from detr_jax.models.backbones import BACKBONES
from detr_jax.models.conditional_decoder import inverse_sigmoid
from detr_jax.models.deformable_attention import SAMPLING_METHODS, points_per_level
from detr_jax.models.deformable_transformer import DeformableDecoder
from detr_jax.models.denoising import DenoisingNoise, contrastive_denoising
from detr_jax.models.detectors.conditional_detr import class_head
from detr_jax.models.detr import BoxHead, zero_padding
from detr_jax.models.batch_norm import batch_norm
from detr_jax.models.hybrid_encoder import ACTIVATIONS, ConvNorm, build_hybrid_encoder
from detr_jax.models.neck import FeatureLevels, flatten_levels
from detr_jax.models.queries import TopKProposals
from detr_jax.models.resnet import downsample_mask
from detr_jax.models.settings import transformer_settings
from detr_jax.models.transformer import xavier_uniform

# The backbone stages the hybrid encoder reads (Hugging Face's out_indices [2, 3, 4]).
IN_STAGES = ("res3", "res4", "res5")
# model.transformer_args: its keys and their defaults (Hugging Face's RTDetrConfig and
# RTDetrV2Config, official rtdetr_r50vd).
TRANSFORMER_ARGS = {
    "num_feature_levels": 3,          # decoder levels: the encoder's 3, more from stride-2 conv-BNs
    "encode_levels": (2,),            # the levels AIFI refines (encode_proj_layers)
    "encoder_hidden_dim": None,       # the encoder's width (None: model.hidden_dim; R101: 384)
    "encoder_dim_feedforward": None,  # AIFI's feed-forward (None: model.dim_feedforward; R101: 2048)
    "expansion": 1.0,                 # CSP layers' hidden width / encoder width (hidden_expansion; R18, R34: 0.5)
    "num_blocks": 3,                  # RepVGG blocks per CSP layer
    "activation": "silu",             # the CCFM's (activation_function)
    "encoder_activation": "gelu",     # AIFI's feed-forward's (encoder_activation_function)
    "decoder_n_points": 4,            # sampling points per head and level; a list: per level (v2)
    "decoder_offset_scale": 0.5,      # v2's offset scale (v1: 0.5)
    "decoder_sampling": "bilinear",   # v2's method: "bilinear" (its "default") or "discrete"
    "num_denoising": 100,             # denoising queries (0: none)
    "label_noise_ratio": 0.5,
    "box_noise_scale": 1.0,
}
# Hugging Face's RT-DETR inverse_sigmoid clipping.
INVERSE_SIGMOID_EPS = 1e-5


def _integer(value, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and value >= 0


def transformer_args(model_config) -> dict[str, Any]:
    """TRANSFORMER_ARGS updated with `model.transformer_args`, lists as tuples; ValueError for
    an unknown key or a bad value."""
    args = transformer_settings(model_config, TRANSFORMER_ARGS)

    def bad(key, expected):
        return ValueError(f"model.transformer_args {key}={args[key]!r}: expected {expected}")

    for key, low in (("num_feature_levels", len(IN_STAGES)), ("num_blocks", 1), ("num_denoising", 0)):
        if not _integer(args[key], low):
            raise bad(key, f"an integer >= {low}")
    for key in ("encoder_hidden_dim", "encoder_dim_feedforward"):
        if args[key] is not None and not _integer(args[key], 1):
            raise bad(key, "None or a positive integer")
    for key in ("expansion", "decoder_offset_scale", "label_noise_ratio", "box_noise_scale"):
        if not _number(args[key]):
            raise bad(key, "a number >= 0")
    for key in ("activation", "encoder_activation"):
        if args[key] not in ACTIVATIONS:
            raise bad(key, f"one of {sorted(ACTIVATIONS)}")
    if args["decoder_sampling"] not in SAMPLING_METHODS:
        raise bad("decoder_sampling", f"one of {SAMPLING_METHODS}")
    levels = args["encode_levels"]
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__") or \
            not all(_integer(l, 0) and l < len(IN_STAGES) for l in levels):
        raise bad("encode_levels", f"a list of level indices < {len(IN_STAGES)}")
    args["encode_levels"] = tuple(int(l) for l in levels)
    if not _integer(args["decoder_n_points"], 1):
        try:
            args["decoder_n_points"] = points_per_level(tuple(args["decoder_n_points"]), args["num_feature_levels"])
        except (TypeError, ValueError):
            raise bad("decoder_n_points", f"a positive integer or {args['num_feature_levels']} of them (one per "
                      "decoder level)") from None
    return args


class RTDETR(nn.Module):
    """The RT-DETR detector from its parts (module docstring).

    Fields:
      backbone: a BACKBONES module with the stages IN_STAGES (a ResNet-vd).
      encoder: a `HybridEncoder` (3 levels); decoder: a `DeformableDecoder`
        (position_from_reference, position_head "box").
      num_logits: C = K, the sigmoid class heads' outputs.
      num_queries: Q; hidden_dim: E, the decoder's width.
      num_feature_levels: the decoder's levels (3: the encoder's; more: stride-2 conv-BNs).
      num_denoising, label_noise_ratio, box_noise_scale: contrastive denoising's (the
        references' num_denoising, G = max(1, num_denoising // data.max_boxes) groups).
    Parameters: backbone, encoder, decoder_input_proj{l} (conv, norm), enc_output,
    enc_output_norm, enc_score_head, enc_bbox_head, denoising_class_embed [K + 1, E] (with
    num_denoising > 0; row K embeds padded slots and gets no gradient), decoder (its layers and query_pos_head), class_embed_{i}, bbox_embed_{i} per decoder
    layer; batch_stats of the encoder's and decoder_input_proj's BatchNorms.
    """

    backbone: nn.Module
    encoder: nn.Module
    decoder: nn.Module
    num_logits: int
    num_queries: int = 300
    hidden_dim: int = 256
    num_feature_levels: int = 3
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, mask: jnp.ndarray, train: bool = False,
                 intermediates: bool = False, targets: dict | None = None,
                 denoising_noise: DenoisingNoise | None = None) -> dict[str, Any]:
        """images: [B, H, W, 3] uint8 (or floats rescaled to [0, 1]); mask: [B, H, W] bool
        (True = real pixel); targets (training): {"labels" [B, M], "boxes" [B, M, 4], "valid"
        [B, M]} make the denoising queries when num_denoising > 0, with the draws
        `denoising_noise` or, without them, drawn from the "queries" rng stream.

        Returns float32 predictions of every decoder layer for the Q matching queries:
        pred_logits [L, B, Q, K] sigmoid logits, pred_boxes [L, B, Q, 4] normalized cxcywh;
        "enc": {pred_logits [1, B, Q, K], pred_boxes [1, B, Q, 4]} the selected proposals;
        with targets and denoising also "dn": {pred_logits [L, B, Qdn, K], pred_boxes [L, B,
        Qdn, 4], target_to_query [B, G * M]}. With `intermediates=True` also
        backbone_stages; memory, memory_mask: the decoder's input levels [B, h_l, w_l, E]
        and their masks; valid_ratios [B, levels, 2]; decoder_states [L, B, Qdn + Q, E];
        references (`DeformableDecoder`'s, over all queries); proposal_indices [B, Q].
        """
        if jnp.issubdtype(images.dtype, jnp.integer):
            images = images.astype(jnp.float32) / 255.0
        backbone_out = self.backbone(zero_padding(images, mask, self.dtype), mask, train)
        levels = self.encoder([backbone_out.stages[s] for s in IN_STAGES], train)
        levels = self.decoder_levels(levels, train)
        masks = tuple(downsample_mask(mask, level.shape[1], level.shape[2]) for level in levels)
        flat = flatten_levels(FeatureLevels(levels, masks))
        memory = flat.src

        enc_class = class_head(self.num_logits, self.dtype, self.prior_prob, name="enc_score_head")
        enc_box = BoxHead(self.hidden_dim, dtype=self.dtype, name="enc_bbox_head")
        proposals = TopKProposals(self.num_queries, self.dtype, select_by_max=True, memory_content=True)
        nn.share_scope(self, proposals)  # enc_output, enc_output_norm at the detector's level, as the reference
        queries, enc = proposals(memory, flat.mask, flat.spatial_shapes, enc_class, enc_box)
        selected = enc["indices"][..., None]
        outputs = {"enc": {"pred_logits": jnp.take_along_axis(enc["pred_logits"], selected, axis=1)[None],
                           "pred_boxes": jnp.take_along_axis(enc["pred_boxes"], selected, axis=1)[None]}}

        dn = None
        if self.num_denoising > 0:
            table = self.param("denoising_class_embed", xavier_uniform, (self.num_logits + 1, self.hidden_dim))
        if targets is not None and self.num_denoising > 0:
            draws = dict(noise=denoising_noise) if denoising_noise is not None else dict(rng=self.make_rng("queries"))
            dn = contrastive_denoising(
                targets, table, num_classes=self.num_logits, num_queries=queries.num_queries,
                num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale, **draws)
            # The reference feeds its decoder the boxes' logits (eps 1e-5) and takes their sigmoid.
            boxes = jax.nn.sigmoid(inverse_sigmoid(dn.queries.reference, INVERSE_SIGMOID_EPS))
            dn = dn.replace(queries=dn.queries.replace(content=dn.queries.content.astype(self.dtype), reference=boxes))
            queries = dn.prepend(queries)

        layers = self.decoder.num_layers
        box_heads = [BoxHead(self.hidden_dim, dtype=self.dtype, zero_last=True, name=f"bbox_embed_{i}")
                     for i in range(layers)]
        states, references, boxes = self.decoder(memory, flat.mask, flat.spatial_shapes, flat.valid_ratios, queries,
                                                 box_heads, True, not train)
        logits = jnp.stack([class_head(self.num_logits, self.dtype, self.prior_prob, name=f"class_embed_{i}")(states[i])
                            for i in range(layers)]).astype(jnp.float32)
        num_dn = 0 if dn is None else dn.num_dn_queries
        outputs.update(pred_logits=logits[:, :, num_dn:], pred_boxes=boxes[:, :, num_dn:])
        if dn is not None:
            outputs["dn"] = {"pred_logits": logits[:, :, :num_dn], "pred_boxes": boxes[:, :, :num_dn],
                             "target_to_query": dn.target_to_query}
        if intermediates:
            outputs.update(backbone_stages=backbone_out.stages, memory=levels, memory_mask=masks,
                           valid_ratios=flat.valid_ratios, decoder_states=states, references=references,
                           proposal_indices=enc["indices"])
        return outputs

    @property
    def prior_prob(self) -> float:
        """The class heads' initial probability, 1 / (K + 1) (Hugging Face's default)."""
        return 1.0 / (self.num_logits + 1)

    def decoder_levels(self, levels: tuple[jnp.ndarray, ...], train: bool) -> tuple[jnp.ndarray, ...]:
        """The encoder's levels [B, h_l, w_l, C] -> the decoder's num_feature_levels levels
        [B, h_l, w_l, E] (module docstring), inside the compact call; train: the BatchNorms
        normalize with the batch's statistics and update their running ones."""
        norm = functools.partial(batch_norm, dtype=self.dtype, train=train)

        def conv_norm(kernel, stride, level):
            return ConvNorm(self.hidden_dim, kernel, stride, norm=norm, dtype=self.dtype,
                            name=f"decoder_input_proj{level}")

        out = [conv_norm(1, 1, l)(level) for l, level in enumerate(levels)]
        extra = levels[-1]
        for l in range(len(levels), self.num_feature_levels):
            extra = conv_norm(3, 2, l)(extra)
            out.append(extra)
        return tuple(out)


def build_rt_detr(model_config, dtype: Any, num_logits: int) -> RTDETR:
    """RT-DETR of the `model` config section computing in `dtype`, with `num_logits` (K)
    sigmoid class outputs; its own settings from model.transformer_args (TRANSFORMER_ARGS).
    model.hidden_dim, num_heads, dim_feedforward, dropout serve the encoder and the decoder
    (unless encoder_hidden_dim, encoder_dim_feedforward say otherwise);
    num_encoder_layers is AIFI's. model.neck, neck_args and position_embedding are not
    RT-DETR's (its hybrid encoder is its neck, AIFI's encoding is fixed): left at their
    defaults, else a ValueError; so is model.pre_norm=True."""
    m = model_config
    args = transformer_args(m)
    if m.pre_norm:
        raise ValueError("model.pre_norm=True: rt_detr is post-norm only (as its reference)")
    if m.neck != "input_proj" or m.neck_args or m.position_embedding != "sine":
        raise ValueError(f"model.neck={m.neck!r}, neck_args={dict(m.neck_args)!r}, position_embedding="
                         f"{m.position_embedding!r}: rt_detr's neck is its hybrid encoder (model.transformer_args) "
                         "and its position encoding fixed; leave these at 'input_proj', {}, 'sine'")
    encoder = build_hybrid_encoder(
        args["encoder_hidden_dim"] or m.hidden_dim, m.num_heads, args["encoder_dim_feedforward"] or m.dim_feedforward,
        m.num_encoder_layers, m.dropout, args["encode_levels"], expansion=args["expansion"],
        num_blocks=args["num_blocks"], activation=args["activation"],
        encoder_activation=args["encoder_activation"], dtype=dtype)
    decoder = DeformableDecoder(
        num_layers=m.num_decoder_layers, num_heads=m.num_heads, dim_feedforward=m.dim_feedforward, dropout=m.dropout,
        num_points=args["decoder_n_points"], offset_scale=args["decoder_offset_scale"],
        sampling=args["decoder_sampling"], position_from_reference=True, position_head="box",
        inverse_sigmoid_eps=INVERSE_SIGMOID_EPS, dtype=dtype)
    return RTDETR(
        backbone=BACKBONES[m.backbone](m, dtype),
        encoder=encoder,
        decoder=decoder,
        num_logits=num_logits,
        num_queries=m.num_queries,
        hidden_dim=m.hidden_dim,
        num_feature_levels=args["num_feature_levels"],
        num_denoising=args["num_denoising"],
        label_noise_ratio=float(args["label_noise_ratio"]),
        box_noise_scale=float(args["box_noise_scale"]),
        dtype=dtype,
    )
