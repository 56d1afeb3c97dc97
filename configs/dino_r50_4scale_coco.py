"""DINO-4scale R50 on COCO 2017, the official recipe (IDEA-Research/DINO
config/DINO/DINO_4scale.py + coco_transformer.py, run by scripts/DINO_train*.sh: 49.0 AP at
12 epochs).

Multi-scale features res3..res5 plus a stride-64 level (`model.neck="channel_mapper"`, 4
levels; `num_feature_levels: 5` is DINO_5scale's res2..res5 + one), 6 + 6 deformable layers
of width 256 with 8 heads, 4 sampling points per head and level, FFN 2048, dropout 0.0, 900
queries (mixed query selection from the encoder's top-900 proposals); contrastive denoising
with dn_number 100, label noise 0.5, box noise 1.0 (the config file says 0.4, every training
script passes dn_box_noise_scale=1.0); the sigmoid class convention with the focal loss
(alpha 0.25), matching costs class 2 / L1 5 / GIoU 2, loss weights class 1 / L1 5 / GIoU 2 on
every branch (every decoder layer, the `dn` groups, the `enc` proposals: interm_loss_coef
1). AdamW lr 1e-4, weight decay 1e-4, gradient clipping 0.1, batch 16 (2 per GPU on 8 GPUs),
12 epochs with the lr dropped x0.1 at epoch 11; the backbone at lr 1e-5 (0.1 x lr; its stem
and layer1 frozen, as official: `param_dict_type="default"` gives the sampling offsets no
lr of their own, unlike Deformable DETR).

Data: TFDS `coco/2017` (needs the `tfds` extra and the prepared dataset); for a COCO folder
use `--config.data.dataset=coco_folder --config.data.coco_dir=/path/to/coco`. Official
DINO checkpoints convert with `detr-jax convert` (`detr_jax.convert.official_dino`).
"""

from detr_jax.config import base_config

# Official DINO's lr groups: its backbone's stem and layer1 frozen and the rest at
# lr_backbone = 0.1 x lr.
PARAM_RULES = (
    (r"backbone/body/(conv1|bn1|layer1_\d+)/.*", None),
    (r"backbone/.*", 0.1),
)


def get_config():
    config = base_config()
    config.model.update(arch="dino", neck="channel_mapper", hidden_dim=256, num_heads=8, num_encoder_layers=6,
                        num_decoder_layers=6, dim_feedforward=2048, dropout=0.0, num_queries=900)
    config.model.transformer_args = {"num_feature_levels": 4, "encoder_n_points": 4, "decoder_n_points": 4,
                                     "dn_number": 100, "dn_label_noise_ratio": 0.5, "dn_box_noise_scale": 1.0}
    config.loss.update(class_coef=1.0, bbox_coef=5.0, giou_coef=2.0, focal_alpha=0.25, aux_loss=True)
    config.loss.matcher_args = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}
    config.train.update(lr=1e-4, weight_decay=1e-4, clip_max_norm=0.1, param_rules=PARAM_RULES, batch_size=16,
                        epochs=12, lr_drop_epoch=11)
    config.data.dataset = "tfds"
    config.data.tfds_name = "coco/2017"
    return config
