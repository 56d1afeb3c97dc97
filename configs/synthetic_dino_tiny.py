"""DINO on the built-in synthetic shapes: synthetic_deformable_tiny's data, schedule and tiny
multi-scale backbone (resnet_tiny without dilation, GroupNorm, from scratch; levels of
stride 8, 16, 32 and 64) and its 2 + 3 deformable layers of width 128 with 8 heads, with
`model.arch="dino"`: 30 queries from the encoder's top proposals (mixed query selection),
look-forward-twice, contrastive denoising (dn_number 100: 100 // data.max_boxes = 12 groups
of 2 x 8 queries, label noise 0.5, box noise 1.0), and DINO's loss defaults: the sigmoid
class convention with the focal loss (alpha 0.25), matching costs class 2 / L1 5 / GIoU 2,
loss weights class 1 / L1 5 / GIoU 2 on every branch. Everything trains at one lr, as
synthetic_tiny (official DINO gives the sampling offsets no lr of their own).

    detr-jax train --config configs/synthetic_dino_tiny.py --workdir workdirs/synthetic_dino_tiny
"""

from detr_jax.config.loading import load_config, resolve_config_path


def get_config():
    config = load_config(resolve_config_path("synthetic_deformable_tiny"))
    config.model.arch = "dino"
    config.model.transformer_args = {"num_feature_levels": 4, "dn_number": 100, "dn_label_noise_ratio": 0.5,
                                     "dn_box_noise_scale": 1.0}
    config.loss.update(class_coef=1.0, bbox_coef=5.0, giou_coef=2.0, focal_alpha=0.25)
    config.loss.matcher_args = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}
    config.train.param_rules = ()
    return config
