"""Deformable DETR-R50 on COCO 2017, the official recipe (fundamentalvision/Deformable-DETR:
AP 44.5 single-scale plain, 46.2 with box refinement, 46.9 two-stage, at 50 epochs).

Multi-scale features res3..res5 plus a stride-64 level (`model.neck="channel_mapper"`, 4
levels), 6 + 6 deformable layers of width 256 with 8 heads, 4 sampling points per head and
level, FFN 1024, dropout 0.1, 300 queries; the sigmoid class convention with the focal loss
(alpha 0.25), matching costs class 2 / L1 5 / GIoU 2 and loss weights class 2 / L1 5 /
GIoU 2, every decoder layer supervised. AdamW lr 2e-4, weight decay 1e-4, gradient
clipping 0.1, batch 32 over all devices, 50 epochs with the lr dropped x0.1 at epoch 40;
the backbone (stem and layer1 frozen, as official) and the deformable attentions'
`sampling_offsets` and the queries' `reference_points` at 0.1 x lr (2e-5).

The variants are `model.transformer_args` switches:

    --config.model.transformer_args="{'with_box_refine': True}"                      # + box refinement
    --config.model.transformer_args="{'with_box_refine': True, 'two_stage': True}"   # two-stage

Data: TFDS `coco/2017` (needs the `tfds` extra and the prepared dataset); for a COCO folder
use `--config.data.dataset=coco_folder --config.data.coco_dir=/path/to/coco`.
"""

from detr_jax.config import base_config

# Official Deformable DETR's lr groups: its backbone's stem and layer1 frozen and the rest at
# lr_backbone, its "linear projections" (sampling offsets, reference points) at 0.1 x lr.
PARAM_RULES = (
    (r"backbone/body/(conv1|bn1|layer1_\d+)/.*", None),
    (r"backbone/.*", 0.1),
    (r".*/sampling_offsets/.*", 0.1),
    (r"reference_points/.*", 0.1),
)


def get_config():
    config = base_config()
    config.model.update(arch="deformable_detr", neck="channel_mapper", dim_feedforward=1024, num_queries=300)
    config.model.transformer_args = {"with_box_refine": False, "two_stage": False, "num_feature_levels": 4,
                                     "encoder_n_points": 4, "decoder_n_points": 4}
    config.loss.update(class_coef=2.0, bbox_coef=5.0, giou_coef=2.0, focal_alpha=0.25)
    config.loss.matcher_args = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}
    config.train.update(lr=2e-4, param_rules=PARAM_RULES, batch_size=32, epochs=50, lr_drop_epoch=40)
    config.data.dataset = "tfds"
    config.data.tfds_name = "coco/2017"
    return config
