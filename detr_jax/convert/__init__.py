"""PyTorch checkpoints -> Flax variables of our detectors, one file per source family
(official_detr, huggingface_detr, huggingface_detr_family, huggingface_rt_detr,
official_detr_family, resnet: torchvision, vit: Hugging Face and timm), over shared rules
(rules), tensor mapping (tensors) and checks (converter).

These layouts are recognized from the key names:
  official     facebookresearch/detr (`detr-r50-e632da11.pth`, ...): {"model": state dict} with
               `backbone.0.body.*`, `transformer.*` (fused attention `in_proj_weight`),
               `class_embed`, `bbox_embed`, `query_embed`, `input_proj`, and for the learned
               position embedding `backbone.1.{row,col}_embed`.
  huggingface  transformers' DetrForObjectDetection: as saved by `save_pretrained` or on the
               Hub (`model.backbone.conv_encoder.model.*` with timm/torchvision backbone names
               or the native ResNet's `embedder`/`encoder.stages` names, `out_proj`, `fc1`), or
               as in memory in transformers 5 (`model.backbone.model.*`, `o_proj`, `mlp.fc1`).
  torchvision  an ImageNet ResNet-50/101 (`conv1.weight`, `layer1.0.conv1.weight`, `fc.*`
               ignored): converted to the backbone subtree only, to start training from.
  huggingface_vit  transformers' ViTModel / ViTForImageClassification / DeiTModel /
               DeiTForImageClassification(WithTeacher), with or without the `vit.`/`deit.`
               prefix, in the saved names (`encoder.layer.{i}.attention.attention.query`,
               `intermediate.dense`, ...) or transformers 5's in-memory ones (`layers.{i}.
               attention.q_proj`, `mlp.fc1`, ...); `pooler`, classifiers and `mask_token`
               ignored. A model directory's preprocessor_config.json (image_mean/std) and
               config.json (layer_norm_eps) are read too. Backbone subtree only.
  timm_vit     timm's VisionTransformer (and VisionTransformerDistilled): `cls_token`,
               `dist_token`, `reg_token` (registers: more prefix tokens), `pos_embed`,
               `patch_embed.proj`, `blocks.{i}.attn.qkv` (fused q/k/v), `norm`; `head`,
               `head_dist` ignored; layer scale, qk-norm, fc_norm and norm_pre are refused
               (the ViT has none). Backbone subtree only.
  huggingface_<member>  transformers' DETR-family members (ConditionalDetrForObjectDetection,
               ...): the layouts of `huggingface_detr_family`, which names their
               modules and infers their model (model.arch included).
  huggingface_rt_detr, huggingface_rt_detr_v2  transformers' RTDetrForObjectDetection and
               RTDetrV2ForObjectDetection (`model.enc_score_head`, `model.encoder_input_proj`;
               v2 by its attentions' `n_points_scale`): `huggingface_rt_detr`, which names
               their modules and infers their model.
  official_<member>  the official repositories' checkpoints of those members
               (Atten4Vis/ConditionalDETR, IDEA-Research/DAB-DETR, fundamentalvision/
               Deformable-DETR): {"model": state dict} with `transformer.*` as official
               DETR's, told apart by the conditional decoder's `ca_qpos_sine_proj` (DAB-DETR:
               `refpoint_embed`, ...) and Deformable DETR's `transformer.level_embed` /
               `sampling_offsets` (box refinement and two-stage: `transformer.decoder.
               bbox_embed`); the layouts of `official_detr_family`, converted to the same
               variables as the Hugging Face layout of the member.

Tensors are mapped one by one: conv kernels OIHW -> HWIO, linear weights [out, in] ->
[in, out], the fused attention in_proj (timm: qkv) split into q/k/v, BatchNorm weight/bias/
running_mean/running_var -> frozen_bn scale/bias/mean/var (`num_batches_tracked` ignored),
LayerNorm weight/bias -> scale/bias; a ViT's class/distillation/register tokens become
`prefix_tokens` [P, E] and its [1, P + g*g, E] position embeddings `prefix_pos_embed` [P, E]
and the `pos_embed` grid [g, g, E]. The model shape is inferred from the tensors and
checked against the target config; every problem (config mismatch, unmapped key, missing
key, shape mismatch) is reported at once.
"""

from detr_jax.convert.checkpoint_files import load_state_dict
from detr_jax.convert.converter import convert_file, convert_state_dict, target_config
from detr_jax.convert.errors import ConversionError
from detr_jax.convert.layouts import LAYOUTS, detect_layout
from detr_jax.convert.tensors import map_state_dict

__all__ = ["LAYOUTS", "ConversionError", "convert_file", "convert_state_dict", "detect_layout", "load_state_dict",
           "map_state_dict", "target_config"]
