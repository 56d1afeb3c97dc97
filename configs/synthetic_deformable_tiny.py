"""Deformable DETR on the built-in synthetic shapes: synthetic_tiny's data and schedule with
`model.arch="deformable_detr"`, a tiny multi-scale backbone (resnet_tiny without dilation,
GroupNorm, trained from scratch: levels of stride 8, 16, 32 and 64), 2 + 3 deformable
layers of width 128 with 8 heads, 30 queries, and the member's loss defaults (official
Deformable DETR's): the sigmoid class convention with the focal loss (alpha 0.25),
matching costs class 2 / L1 5 / GIoU 2, loss weights class 2 / L1 5 / GIoU 2. As the
official recipe, the deformable attentions' sampling offsets and the queries' reference
points train at 0.1 x lr. Box refinement and two-stage are switches:

    detr-jax train --config configs/synthetic_deformable_tiny.py \\
        --workdir workdirs/synthetic_deformable_tiny \\
        --config.model.transformer_args="{'with_box_refine': True, 'two_stage': True}"
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_tiny"))
    config.model.update(arch="deformable_detr", neck="channel_mapper", dilation=False, num_queries=30)
    config.model.transformer_args = {"num_feature_levels": 4}
    config.loss.update(class_coef=2.0, bbox_coef=5.0, giou_coef=2.0, focal_alpha=0.25)
    config.loss.matcher_args = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}
    config.train.param_rules = ((r".*/sampling_offsets/.*", 0.1), (r"reference_points/.*", 0.1))
    return config
